"""The request bodies of /v1/chat/completions and /v1/completions.

Their sampling fields are derived from the one sampling schema (gpt2ft.sampling.OPTIONS, each option
with an `api` name): the type (strict: "0.5" is not a number, "yes" is not true), the range and help
in the OpenAPI document, and the verdict of sampling.check — so the server refuses exactly what the
CLI and the chat REPL refuse. `options()` maps a request onto SamplingConfig's fields.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, create_model

from ..errors import UserError
from ..sampling import MAX_BIAS, MAX_LOGIT_BIASES, OPTIONS, Option, check

SAMPLING_FIELDS: dict[str, Option] = {o.api: o for o in OPTIONS.values() if o.api}
"""Request field -> the sampling option it sets."""
OPENAI_DEFAULTS = {"temperature": 1.0, "max_tokens": None}
"""Where the API's defaults are OpenAI's, not the CLI's (max_tokens None: what the context and
--max-tokens allow)."""
_SCHEMA_DEFAULT = object()


def api_options() -> list[dict]:
    """GET /v1/sampling: every option a request may set (Option.describe), with the default a chat request
    gets when it leaves the field out (OpenAI's where they differ from the CLI's)."""
    out = []
    for opt in OPTIONS.values():
        if opt.api:
            d = opt.describe()
            if opt.api in OPENAI_DEFAULTS:
                d["default"] = OPENAI_DEFAULTS[opt.api]
                d["optional"] = d["optional"] or d["default"] is None
            out.append(d)
    return out


def _checked(name: str, zero_ok: bool = False):
    """sampling.check as a pydantic validator (its UserError becomes a validation error)."""

    def validate(value):
        if zero_ok and value == 0 and not isinstance(value, bool):
            return 0
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

        return {"maxItems": MAX_STOP_STRINGS} if opt.kind is list else {}  # logit_bias: its type's
    out = {}
    if r.lo is not None:
        out["exclusiveMinimum" if r.lo_open else "minimum"] = r.lo
    if r.hi is not None:
        out["exclusiveMaximum" if r.hi_open else "maximum"] = r.hi
    return out


_BIAS = Annotated[float, Field(ge=-MAX_BIAS, le=MAX_BIAS)]
_TOKEN_ID = Annotated[str, Field(pattern=r"^(0|[1-9][0-9]{0,9})$")]  # JSON object keys are strings; one spelling a token
_KINDS = {list: Union[str, list[str]], dict: Annotated[dict[_TOKEN_ID, _BIAS], Field(max_length=MAX_LOGIT_BIASES)]}


def option_field(opt: Option, default=_SCHEMA_DEFAULT, zero_ok: bool = False):
    """The type of a request field that sets `opt`: strict, checked by sampling.check, with the
    option's help and bounds; null means the field's default (as in OpenAI's API). zero_ok: 0 is
    also accepted (the request gives it a meaning of its own)."""
    kind = _KINDS.get(opt.kind, opt.kind)
    default = opt.default if default is _SCHEMA_DEFAULT else default
    extra = {"description": f"{opt.help}; {api_accepts(opt)}", "json_schema_extra": _bounds(opt)}
    if zero_ok:
        extra["json_schema_extra"] = {**extra["json_schema_extra"], "minimum": 0}
        extra["description"] += " (0 with echo: the prompt scored, nothing generated)"
    mutable = isinstance(default, (list, dict))
    info = Field(default_factory=type(default), **extra) if mutable else Field(default, **extra)
    return Annotated[Optional[Annotated[kind, _checked(opt.name, zero_ok)]], info]


def nullable(kind, default, **field):
    """A field that OpenAI's API declares "or null": null means the default."""
    return Annotated[kind, BeforeValidator(lambda v: default if v is None else v), Field(default, **field)]


class _Request(BaseModel):
    # every field is honoured or refused: an unknown one is a 400 naming it (validation_message)
    model_config = ConfigDict(allow_inf_nan=False, extra="forbid", strict=True, populate_by_name=True)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class CalledFunction(_Request):
    name: str
    arguments: str = Field(description="the arguments as JSON text")


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant's calls (rendered as their JSON)")
    tool_call_id: str | None = Field(None, description="a tool message: the call it answers")
    refusal: str | None = Field(None, description="an assistant's refusal (rendered as its content)")

    def text(self) -> str:
        """The content as the template renders it (an assistant's refusal when it has no content); an
        assistant's tool calls as their JSON text."""
        if isinstance(self.content, list):
            text = "".join(p.text for p in self.content)
        else:
            text = self.content if self.content is not None else self.refusal or ""  # a refusal is what it said
        calls = "\n".join(json.dumps({"name": c.function.name, "arguments": _json_or_text(c.function.arguments)})
                          for c in self.tool_calls or [])
        return "\n".join(t for t in (text, calls) if t)


def _json_or_text(arguments: str):
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


class Prediction(_Request):
    """OpenAI's predicted output (it only speeds up OpenAI's decoding)."""

    type: Literal["content"]
    content: Union[str, list[TextPart]]


_FLAG = nullable(bool, False)
_N = nullable(int, 1, ge=1, description="choices per prompt (at most `gpt2ft serve --max-n`)")


class StreamOptions(_Request):
    include_usage: _FLAG


# ----- structured outputs: what the reply must match (serve.structured makes one grammar of them) ------
class TextResponseFormat(_Request):
    type: Literal["text"]


class JSONObjectFormat(_Request):
    type: Literal["json_object"]


class JSONSchema(_Request):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="the JSON Schema (none: any object)")
    strict: bool | None = Field(None, description="accepted; the output always matches the schema")


class JSONSchemaFormat(_Request):
    type: Literal["json_schema"]
    json_schema: JSONSchema


ResponseFormat = Annotated[Union[TextResponseFormat, JSONObjectFormat, JSONSchemaFormat], Field(discriminator="type")]


class FunctionDef(_Request):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = Field(None, description="accepted; not shown to the model (the prompt templates "
                                                      "have no place for tool definitions): a forced call's "
                                                      "arguments are constrained to `parameters`")
    parameters: dict[str, Any] | None = Field(None, description="the arguments' JSON Schema (none: no arguments)")
    strict: bool | None = Field(None, description="accepted; the arguments always match the schema")


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


class StructuredOutputs(_Request):
    """vLLM's newer form of its guided_* fields (one of them)."""

    json_: Union[dict[str, Any], str, None] = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, description="Lark, or GBNF (when it has ::=)")
    json_object: bool | None = None


_Sampling = create_model("Sampling", __base__=_Request, **{
    api: option_field(opt, OPENAI_DEFAULTS.get(api, _SCHEMA_DEFAULT))
    for api, opt in SAMPLING_FIELDS.items() if api != "logprobs"})  # logprobs differs between the two
_Logprobs = option_field(OPTIONS["logprobs"])
_ChatMaxTokens = option_field(OPTIONS["max_new_tokens"], None)
_TextMaxTokens = option_field(OPTIONS["max_new_tokens"], 16, zero_ok=True)  # OpenAI's default; 0: echo only
_IGNORED = "accepted and ignored (metadata)"
METADATA_FIELDS = ("user", "safety_identifier", "prompt_cache_key", "metadata", "store", "service_tier")
"""Request fields accepted and ignored: they change nothing in the reply (OpenAI's pure metadata; chat also
takes `prediction`, which only speeds up OpenAI's decoding). Every other field is honoured or refused."""


class _Common(_Sampling):
    model: str
    n: _N
    stream: _FLAG
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema")
    guided_json: Union[dict[str, Any], str, None] = Field(None, description="vLLM's: a JSON Schema the reply matches")
    guided_regex: str | None = Field(None, description="vLLM's: a regular expression the reply matches")
    guided_choice: list[str] | None = Field(None, description="vLLM's: the reply is one of these strings")
    guided_grammar: str | None = Field(None, description="vLLM's: a Lark (or GBNF, with ::=) grammar")
    structured_outputs: StructuredOutputs | None = None
    user: str | None = Field(None, description=_IGNORED)
    safety_identifier: str | None = Field(None, description=_IGNORED)
    prompt_cache_key: str | None = Field(None, description=_IGNORED)
    metadata: dict[str, str] | None = Field(None, description=_IGNORED)
    store: bool | None = Field(None, description=_IGNORED)
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = Field(None, description=_IGNORED)
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
    def limit_field(self) -> str:
        """The field the client set the length limit with (named in errors about it)."""
        return "max_tokens"

    def field_of(self, option: str) -> str:
        """The request field that sets sampling option `option`."""
        return self.limit_field if option == "max_new_tokens" else \
            next((api for api, opt in self.FIELDS.items() if opt.name == option), option)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def candidates(self) -> int:
        """Completions generated per prompt (best_of of them when given, else n)."""
        return getattr(self, "best_of", None) or self.n


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: _ChatMaxTokens
    logprobs: _FLAG
    top_logprobs: _Logprobs
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = Field(
        None, description='"required" or a named function: the reply is a call with schema-valid arguments; '
                          '"none": text; "auto" needs a template with a tool-call format')
    parallel_tool_calls: bool | None = Field(None, description="accepted: a reply makes at most one call")
    prediction: Prediction | None = Field(None, description=_IGNORED)
    FIELDS: ClassVar[dict[str, Option]] = {**{a: o for a, o in SAMPLING_FIELDS.items() if a != "logprobs"},
                                           "max_completion_tokens": OPTIONS["max_new_tokens"],
                                           "top_logprobs": OPTIONS["logprobs"]}

    @property
    def limit_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

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
    echo: _FLAG
    logprobs: _Logprobs
    max_tokens: _TextMaxTokens
    best_of: int | None = Field(None, ge=1, description="generate this many (>= n) and return the n with the "
                                                        "highest cumulative log-probability; not with stream")
    suffix: str | None = Field(None, description="refused when given: this server does not insert text")


# ----- validation errors as one sentence -------------------------------------------------------------
_UNIONS = {"prompt": "a string, a list of strings, a list of token ids or a list of such lists",
           "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts"}
_UNION_TAGS = {"str", "int", "float", "bool", "function-after"}
_TAGGED = {"response_format": {"text", "json_object", "json_schema"}}
_TYPES = {"bool_type": "true or false", "int_type": "an integer", "float_type": "a number",
          "string_type": "a string", "list_type": "a list", "model_type": "a JSON object",
          "model_attributes_type": "a JSON object"}


def _shown(value) -> str:
    if isinstance(value, bytes):  # a body that is not JSON: as the text it is
        value = value.decode("utf-8", "replace")
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validation_message(err: dict, fields: dict[str, Option]) -> tuple[str, str | None]:
    """(message, param) of pydantic's first error in a request; `fields` are the request's sampling fields."""
    # the body's path, without pydantic's names of the union members it tried ("str", "list[int]")
    loc = [str(x) for x in err.get("loc", ()) if x != "body" and str(x) not in _UNION_TAGS and "[" not in str(x)]
    # a tagged union's member is named by its tag after the field (response_format.json_schema...): not a path
    loc = [x for i, x in enumerate(loc) if not (i and x in _TAGGED.get(loc[i - 1], ()))]
    kind = err.get("type")
    if kind == "json_invalid":
        return f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})", None
    if not loc:
        if kind == "missing" or err.get("input") in (None, b""):
            return ("the request body is empty: send a JSON object with `model` and `messages` (chat) or "
                    "`prompt` (completions), with Content-Type: application/json"), None
        body = err.get("input")
        try:
            sent_json = isinstance(body, (bytes, str)) and isinstance(json.loads(body), dict)
        except ValueError:
            sent_json = False
        if sent_json:  # a JSON object sent as text/plain (curl -d without -H, some HTTP libraries)
            return ("the request body is JSON but its Content-Type is not: send it with Content-Type: "
                    "application/json"), None
        return (f"the request body must be a JSON object (Content-Type: application/json), not "
                f"{_shown(body)}"), None
    if loc[0] == "tool_choice":  # a union of strings and an object: pydantic reports one member's complaint
        given = _shown(err.get("input")) if len(loc) == 1 else "that"
        return (f'tool_choice must be "none", "auto", "required" or {{"type": "function", "function": {{"name": '
                f'NAME}}}}, not {given}'), "tool_choice"
    if loc[0] in fields and kind != "extra_forbidden":
        opt = fields[loc[0]]
        return f"{loc[0]} must be {api_accepts(opt)}, not {_shown(err.get('input'))}", loc[0]
    param = ".".join(loc)
    if kind == "extra_forbidden":
        return (f"unrecognized field {param}: this server honours the fields its /openapi.json lists and refuses "
                f"the others (it ignores only {', '.join(METADATA_FIELDS)}, and prediction on chat)"), param
    if kind == "missing":
        return f"{param}: a required field is missing", param
    if loc[-1] in _UNIONS:
        return f"{param} must be {_UNIONS[loc[-1]]}, not {_shown(err.get('input'))}", param
    if kind in _TYPES:
        return f"{param} must be {_TYPES[kind]}, not {_shown(err.get('input'))}", param
    return f"{param}: {err.get('msg', 'invalid value')} (got {_shown(err.get('input'))})", param
