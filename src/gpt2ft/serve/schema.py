"""The request bodies of /v1/chat/completions and /v1/completions.

Their sampling fields are derived from the one sampling schema (gpt2ft.sampling.OPTIONS, each option
with an `api` name): the type (strict: "0.5" is not a number, "yes" is not true), the range and help
in the OpenAPI document, and the verdict of sampling.check — so the server refuses exactly what the
CLI and the chat REPL refuse. `options()` maps a request onto SamplingConfig's fields.
"""
from __future__ import annotations

import json
from typing import Annotated, ClassVar, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from ..errors import UserError
from ..sampling import OPTIONS, Option, check

SAMPLING_FIELDS: dict[str, Option] = {o.api: o for o in OPTIONS.values() if o.api}
"""Request field -> the sampling option it sets."""
OPENAI_DEFAULTS = {"temperature": 1.0, "max_tokens": None}
"""Where the API's defaults are OpenAI's, not the CLI's (max_tokens None: what the context and
--max-tokens allow)."""
_SCHEMA_DEFAULT = object()


def _checked(name: str):
    """sampling.check as a pydantic validator (its UserError becomes a validation error)."""

    def validate(value):
        try:
            return check(name, value)
        except UserError as e:
            raise ValueError(str(e)) from None

    return AfterValidator(validate)


def api_accepts(opt: Option) -> str:
    """Option.accepts with JSON's word for "none": "an integer in [0, 2^64 - 1], or null"."""
    return opt.accepts.replace(f", or {opt.none}", ", or null") if opt.none else opt.accepts


def _bounds(opt: Option) -> dict:
    """The option's range as JSON Schema keywords (for the OpenAPI document and its fuzzers)."""
    r = opt.range
    if r is None:
        from ..sampling import MAX_STOP_STRINGS

        return {"maxItems": MAX_STOP_STRINGS} if opt.kind is list else {}
    out = {}
    if r.lo is not None:
        out["exclusiveMinimum" if r.lo_open else "minimum"] = r.lo
    if r.hi is not None:
        out["exclusiveMaximum" if r.hi_open else "maximum"] = r.hi
    return out


def option_field(opt: Option, default=_SCHEMA_DEFAULT):
    """The type of a request field that sets `opt`: strict, checked by sampling.check, with the
    option's help and bounds; null means the field's default (as in OpenAI's API)."""
    kind = Union[str, list[str]] if opt.kind is list else opt.kind
    default = opt.default if default is _SCHEMA_DEFAULT else default
    extra = {"description": f"{opt.help}; {api_accepts(opt)}", "json_schema_extra": _bounds(opt)}
    info = Field(default_factory=list, **extra) if isinstance(default, list) else Field(default, **extra)
    return Annotated[Optional[Annotated[kind, _checked(opt.name)]], info]


class _Request(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, extra="ignore", strict=True)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Request):
    include_usage: bool = False


_Sampling = create_model("Sampling", __base__=_Request, **{
    api: option_field(opt, OPENAI_DEFAULTS.get(api, _SCHEMA_DEFAULT))
    for api, opt in SAMPLING_FIELDS.items() if api != "logprobs"})  # logprobs differs between the two
_Logprobs = option_field(OPTIONS["logprobs"])
_ChatMaxTokens = option_field(OPTIONS["max_new_tokens"], None)
_TextMaxTokens = option_field(OPTIONS["max_new_tokens"], 16)  # OpenAI's default for completions


class _Common(_Sampling):
    model: str
    n: int = Field(1, ge=1, description="choices per prompt (at most `gpt2ft serve --max-n`)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    FIELDS: ClassVar[dict[str, Option]] = SAMPLING_FIELDS

    def options(self) -> dict:
        """SamplingConfig's fields as this request sets them (a null field: the field's default)."""
        out = {}
        for api, opt in self.FIELDS.items():
            value = getattr(self, api)
            out[opt.name] = value if value is not None else type(self).model_fields[api].get_default(
                call_default_factory=True)
        return out

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: _ChatMaxTokens
    logprobs: bool = False
    top_logprobs: _Logprobs
    FIELDS: ClassVar[dict[str, Option]] = {**{a: o for a, o in SAMPLING_FIELDS.items() if a != "logprobs"},
                                           "max_completion_tokens": OPTIONS["max_new_tokens"],
                                           "top_logprobs": OPTIONS["logprobs"]}

    def options(self) -> dict:
        out = super().options()
        out["max_new_tokens"] = self.max_completion_tokens or self.max_tokens
        if not self.logprobs:
            out["logprobs"] = None
        elif out["logprobs"] is None:
            out["logprobs"] = 0  # the chosen tokens' log-probabilities only
        return out


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        description='text or token ids, or a list of them; "" or [] starts from <|endoftext|>')
    echo: bool = False
    logprobs: _Logprobs
    max_tokens: _TextMaxTokens


# ----- validation errors as one sentence -------------------------------------------------------------
_UNIONS = {"prompt": "a string, a list of strings, a list of token ids or a list of such lists",
           "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts"}
_UNION_TAGS = {"str", "int", "float", "bool", "function-after"}
_TYPES = {"bool_type": "true or false", "int_type": "an integer", "float_type": "a number",
          "string_type": "a string", "list_type": "a list", "model_type": "a JSON object",
          "model_attributes_type": "a JSON object"}


def _shown(value) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validation_message(err: dict, fields: dict[str, Option]) -> tuple[str, str | None]:
    """(message, param) of pydantic's first error in a request; `fields` are the request's sampling fields."""
    # the body's path, without pydantic's names of the union members it tried ("str", "list[int]")
    loc = [str(x) for x in err.get("loc", ()) if x != "body" and str(x) not in _UNION_TAGS and "[" not in str(x)]
    kind = err.get("type")
    if kind == "json_invalid":
        return f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})", None
    if not loc:
        if kind == "missing" or err.get("input") in (None, b""):
            return ("the request body is empty: send a JSON object with `model` and `messages` (chat) or "
                    "`prompt` (completions), with Content-Type: application/json"), None
        return (f"the request body must be a JSON object (Content-Type: application/json), not "
                f"{_shown(err.get('input'))}"), None
    if loc[0] in fields:
        opt = fields[loc[0]]
        return f"{loc[0]} must be {api_accepts(opt)}, not {_shown(err.get('input'))}", loc[0]
    param = ".".join(loc)
    if kind == "missing":
        return f"{param}: a required field is missing", param
    if loc[-1] in _UNIONS:
        return f"{param} must be {_UNIONS[loc[-1]]}, not {_shown(err.get('input'))}", param
    if kind in _TYPES:
        return f"{param} must be {_TYPES[kind]}, not {_shown(err.get('input'))}", param
    return f"{param}: {err.get('msg', 'invalid value')} (got {_shown(err.get('input'))})", param
