"""The sampling schema: every sampling option declared once (name, type, range, default, help, and
its names on each surface), and SamplingConfig, the engine's settings built from it.

The CLI's flags (commands.add_sampling), the server's request fields, the chat REPL's commands with
its /help and /settings, and the playground's inputs (GET /v1/sampling) are all derived from
OPTIONS, so a value gets the same verdict everywhere. A leaf: it imports only errors and argtypes.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

from .argtypes import Range
from .errors import OptionError, UserError

MAX_STOP_STRINGS = 16  # the user's (`stop`); a model template's own are `template_stop`
MAX_BIAS = 100.0
MAX_LOGIT_BIASES = 300  # OpenAI's limit on logit_bias entries
GRAMMAR_KINDS = {"json_schema": "JSON schema", "json": "JSON", "regex": "regular expression", "choice": "choice",
                 "lark": "Lark grammar", "gbnf": "grammar (Lark or GBNF)"}  # kind -> how messages name it


@dataclass(frozen=True)
class GrammarSpec:
    """What the output must match (compiled by gpt2ft.grammar). `source`: the schema as JSON text,
    the regex, the choices as a JSON list, or the Lark/GBNF grammar; empty for `json` (any JSON object)."""

    kind: str
    source: str = ""

    def __post_init__(self):
        if self.kind not in GRAMMAR_KINDS:
            raise UserError(f"grammar kind must be one of {', '.join(GRAMMAR_KINDS)}, not {self.kind!r}")
        if not isinstance(self.source, str) or (self.kind != "json" and not self.source):
            raise UserError(f"a {GRAMMAR_KINDS[self.kind]} needs its text")

    @classmethod
    def json_schema(cls, schema) -> "GrammarSpec":
        import json

        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True))

    @classmethod
    def choice(cls, options) -> "GrammarSpec":
        import json

        if not isinstance(options, (list, tuple)) or not options or \
                not all(isinstance(o, str) and o for o in options):
            raise UserError("a choice needs one or more non-empty strings")
        return cls("choice", json.dumps(list(options)))


def option(default=MISSING, *, range: Range | None = None, help: str, flag: str | None = None,
           command: str | None = None, api: str | None = None, none: str | None = None,
           sampled_only: bool = False, default_factory=MISSING):
    """Field metadata of one sampling option.

    flag: the CLI flag (None: no flag); command: the chat REPL's /command (None: none); api: the
    request field of the OpenAI-compatible server (None: not there); none: the word that means
    None in text (e.g. "random" for the seed), for an optional option; sampled_only: it changes nothing
    under greedy decoding (temperature 0).
    """
    meta = {"range": range, "help": help, "flag": flag, "command": command, "api": api, "none": none,
            "sampled_only": sampled_only}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class SamplingConfig:
    """How to pick each next token, and when a completion ends."""

    max_new_tokens: int = option(100, range=Range(int, 1), flag="--max-new-tokens", command="tokens",
                                 api="max_tokens",
                                 help="most tokens to generate (the prompt and these must fit the context)")
    temperature: float = option(0.8, range=Range(float, 0, 2), flag="--temperature", command="temp",
                                api="temperature", help="softmax temperature; 0 = greedy (argmax)")
    top_k: int | None = option(None, range=Range(int, -1), flag="--top-k", command="topk", api="top_k",
                               none="off", sampled_only=True, help="keep only the k most likely tokens (0 or -1: all)")
    top_p: float = option(1.0, range=Range(float, 0, 1, lo_open=True), flag="--top-p", command="topp",
                          api="top_p", sampled_only=True,
                          help="keep the most likely tokens whose probability mass reaches p (1: all)")
    repetition_penalty: float = option(1.0, range=Range(float, 0.01, 100), flag="--repetition-penalty",
                                       command="penalty", api="repetition_penalty",
                                       help="divide positive / multiply negative logits of tokens already in "
                                            "the context (CTRL's penalty; 1 = off)")
    presence_penalty: float = option(0.0, range=Range(float, -2, 2), flag="--presence-penalty",
                                     command="presence", api="presence_penalty",
                                     help="OpenAI's: subtract this from the logit of every token generated "
                                          "so far (0 = off)")
    frequency_penalty: float = option(0.0, range=Range(float, -2, 2), flag="--frequency-penalty",
                                      command="frequency", api="frequency_penalty",
                                      help="OpenAI's: subtract this times the token's count among the "
                                           "generated tokens (0 = off)")
    stop: list[str] = option(default_factory=list, flag="--stop", api="stop",
                             help=f"strings that end the generation, which stops before them "
                                  f"(at most {MAX_STOP_STRINGS})")
    template_stop: list[str] = option(default_factory=list,
                                      help="the model template's own stop strings (each surface adds its template's)")
    seed: int | None = option(None, range=Range(int, 0, 2**64 - 1), flag="--seed", command="seed", api="seed",
                              none="random", sampled_only=True,
                              help="sampling seed (none: a fresh random seed); each completion "
                                                  "has its own generator")
    logprobs: int | None = option(None, range=Range(int, 0, 20), api="logprobs",
                                  help="record log-probabilities of the raw logits: 0 the chosen token's; "
                                       "k also the k most likely tokens'")
    ignore_eos: bool = option(False, flag="--ignore-eos", api="ignore_eos",
                              help="go on past <|endoftext|> (vLLM's; for benchmarks and exact token counts)")
    min_tokens: int = option(0, range=Range(int, 0), flag="--min-tokens", api="min_tokens",
                             help="generate at least this many tokens: <|endoftext|> and stop strings are held "
                                  "off until then (vLLM's)")
    logit_bias: dict[int, float] = option(default_factory=dict, flag="--logit-bias", api="logit_bias",
                                          help=f"add a bias in [{-MAX_BIAS:g}, {MAX_BIAS:g}] to a token's logit "
                                               f"before sampling: -100 bans it, +100 forces it (OpenAI's)")
    grammar: GrammarSpec | None = option(None, help="a grammar the output must match (constrained decoding); "
                                                    "set by each surface's own flags and fields")

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, check(f.name, getattr(self, f.name)))
        if self.min_tokens > self.max_new_tokens:
            raise OptionError("min_tokens", lambda n: f"{n('min_tokens')} ({self.min_tokens}) must not exceed "
                                                     f"{n('max_new_tokens')} ({self.max_new_tokens})")
        if self.grammar is not None:  # the grammar decides where the output ends, and it must end there
            for name, given, why in (("stop", self.stop, "would cut the output before the grammar completes it"),
                                     ("min_tokens", self.min_tokens, "would hold off the end the grammar reaches"),
                                     ("ignore_eos", self.ignore_eos, "would go on past the grammar's end")):
                if given:
                    raise OptionError(name, lambda n, name=name, why=why: f"{n(name)} {why}: drop it with "
                                      "constrained output (the grammar ends the output where it is complete)")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "SamplingConfig":
        unknown = set(kwargs) - set(OPTIONS)
        if unknown:
            raise TypeError(f"unknown sampling option(s): {sorted(unknown)}")
        return cls(**kwargs)


@dataclass(frozen=True)
class Option:
    """One sampling option as every surface sees it."""

    name: str
    default: object
    range: Range | None
    help: str
    flag: str | None
    command: str | None
    api: str | None
    none: str | None
    optional: bool
    sampled_only: bool = False

    @property
    def kind(self) -> type:
        if self.range:
            return self.range.kind
        return type(self.default) if isinstance(self.default, (bool, list, dict)) else GrammarSpec

    @property
    def accepts(self) -> str:
        """What a value must be, as one phrase: "a number in [0, 2]", "an integer >= 0, or random"."""
        if self.kind is bool:
            return "true or false"
        if self.kind is list:
            return f"a string or a list of at most {MAX_STOP_STRINGS} strings"
        if self.kind is dict:
            return f"token id -> bias in [{-MAX_BIAS:g}, {MAX_BIAS:g}] (at most {MAX_LOGIT_BIASES} entries)"
        if self.kind is GrammarSpec:
            return "a grammar"
        text = f"{self.range.noun} {self.range.text}"
        return f"{text}, or {self.none}" if self.none else text

    def parse_text(self, text: str):
        """A value typed by a person (a flag, a REPL argument) -> the checked value, or UserError."""
        if self.none and text.strip().lower() in (self.none, "none"):
            return None
        if self.kind is dict:  # "ID=BIAS", one entry per flag or command
            token, sep, bias = text.partition("=")
            try:
                if not sep:
                    raise ValueError
                return check(self.name, {int(token): float(bias)})
            except ValueError:
                raise UserError(f"{self.name} takes TOKEN_ID=BIAS, e.g. 50256=-100, not {text!r}") from None
        if self.range is None:
            return check(self.name, text)
        try:
            return check(self.name, self.range.parse(text.strip()))
        except ValueError:
            raise UserError(f"{self.name} must be {self.accepts}, not {text!r}") from None

    def describe(self) -> dict:
        """JSON for the playground and /v1/sampling: name, type, bounds, default, help."""
        r = self.range
        return {"name": self.name, "api": self.api, "type": self.kind.__name__, "default": self.default,
                "min": r.lo if r else None, "max": r.hi if r else None,
                "min_exclusive": bool(r and r.lo_open), "max_exclusive": bool(r and r.hi_open),
                "optional": self.optional, "accepts": self.accepts, "help": self.help}


def _options() -> dict[str, Option]:
    out = {}
    for f in fields(SamplingConfig):
        default = f.default if f.default is not MISSING else f.default_factory()
        m = f.metadata
        out[f.name] = Option(f.name, default, m["range"], m["help"], m["flag"], m["command"], m["api"], m["none"],
                             optional=default is None, sampled_only=m["sampled_only"])
    return out


def check(name: str, value):
    """The value of option `name` if it is acceptable (normalised: top_k -1 -> 0, a stop string ->
    [it]); else a UserError naming the option, what it accepts and the value. The one check."""
    opt = OPTIONS[name]
    rng = opt.range
    if value is None and opt.optional:
        return None
    if rng is not None:
        ok_type = not isinstance(value, bool) and (isinstance(value, int) or (rng.kind is float and isinstance(value, float)))
        if not ok_type or not rng.contains(value):
            raise OptionError(name, lambda n: f"{n(name)} must be {opt.accepts}, not {value!r}")
        value = rng.kind(value)
        return 0 if name == "top_k" and value == -1 else value
    if opt.kind is list:  # stop strings
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value) \
                or len(value) > MAX_STOP_STRINGS:
            raise OptionError(name, lambda n: f"{n(name)} must be a string or a list of at most {MAX_STOP_STRINGS} "
                                              f"strings, not {value!r}")
        if "" in value:  # it would match at once; dropping it unsaid would ignore what was asked
            raise OptionError(name, lambda n: f"{n(name)}: an empty string is not a stop string (it would end "
                                              "every output at once): drop it")
        return list(value)
    if opt.kind is dict:
        return _check_logit_bias(value)
    if opt.kind is GrammarSpec:
        if not isinstance(value, GrammarSpec):
            raise UserError(f"{name} must be a GrammarSpec, not {value!r}")
        return value
    if not isinstance(value, bool):
        raise UserError(f"{name} must be true or false, not {value!r}")
    return value


def _check_logit_bias(value) -> dict[int, float]:
    """{token id: bias}; ids may come as JSON's strings ("50256"); ids are checked against the
    vocabulary where it is known (the engine)."""
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIASES:
        raise UserError(f"logit_bias must map token ids to biases (at most {MAX_LOGIT_BIASES} entries), not {value!r}")
    out = {}
    for key, bias in value.items():
        token = int(key) if isinstance(key, str) and key.isdigit() else key
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise UserError(f"logit_bias: {key!r} is not a token id (an integer >= 0)")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -MAX_BIAS <= bias <= MAX_BIAS:
            raise UserError(f"logit_bias[{key}] must be a number in [{-MAX_BIAS:g}, {MAX_BIAS:g}], not {bias!r}")
        out[token] = float(bias)
    return out


OPTIONS: dict[str, Option] = _options()
