"""Constrained decoding: a grammar (JSON schema, any JSON object, regex, a choice of strings, Lark or
GBNF) compiled once per tokenizer by llguidance, and a per-row state that yields the allowed tokens
at each step and advances with each accepted token.

Our tokenizers are described to llguidance by the bytes each token adds to the text: exact for
byte-level BPE (GPT-2's and our own trained ones); for a word-level tokenizer, the bytes a token
adds after a word (a space, then the word; punctuation glued), which is how its decoder joins words
except after an opening bracket.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import torch

from .errors import UserError
from .tokenizer import Tokenizer

KINDS = ("json_schema", "json", "regex", "choice", "lark", "gbnf")


@dataclass(frozen=True)
class GrammarSpec:
    """What the output must match. `source`: the schema as JSON text, the regex, the choices as a
    JSON list, or the grammar text; empty for `json` (any JSON object)."""

    kind: str
    source: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"grammar kind must be one of {', '.join(KINDS)}, not {self.kind!r}")

    @classmethod
    def json_schema(cls, schema: dict | str) -> "GrammarSpec":
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True))

    @classmethod
    def choice(cls, options: list[str]) -> "GrammarSpec":
        if not options or not all(isinstance(o, str) and o for o in options):
            raise UserError("a choice needs one or more non-empty strings")
        return cls("choice", json.dumps(list(options)))

    def llguidance_grammar(self) -> str:
        """The grammar in llguidance's own form (a UserError naming the problem if it is malformed)."""
        import llguidance

        try:
            if self.kind == "json":
                return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}')
            if self.kind == "json_schema":
                json.loads(self.source)  # a clear error for text that is not JSON at all
            if self.kind == "choice":  # a Lark rule of quoted literals: nothing else can follow
                return llguidance.LLMatcher.grammar_from_lark(
                    "start: " + " | ".join(json.dumps(o) for o in json.loads(self.source)))
            return llguidance.grammar_from(self.kind, self.source)
        except (ValueError, TypeError) as e:
            raise UserError(f"malformed {self.kind.replace('_', ' ')}: {e}") from None


class _TokenizerView:
    """What llguidance's TokenizerWrapper reads: every token's bytes, EOS, and an encoder."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = None
        self.special_token_ids = [tokenizer.eos_id]
        self._tokenizer = tokenizer
        self.tokens = [token_bytes(tokenizer, i) for i in range(vocab_size)]

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text if isinstance(text, str) else text.decode("utf-8", "replace"))


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The bytes a token adds to the text (b"" for ids past the tokenizer's vocabulary)."""
    if token_id >= tokenizer.vocab_size:
        return b""
    if tokenizer.kind == "word":
        anchor = tokenizer.encode("a")[:1] or [tokenizer.unk_id]
        before, both = tokenizer.decode_bytes(anchor), tokenizer.decode_bytes(anchor + [token_id])
        return both[len(before):]
    return tokenizer.decode_bytes([token_id])


@lru_cache(maxsize=4)
def _lltokenizer(tokenizer: Tokenizer, vocab_size: int):
    import llguidance

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenizerView(tokenizer, vocab_size)))


@lru_cache(maxsize=256)  # compiled grammars, by tokenizer and grammar text
def _compiled(tokenizer: Tokenizer, vocab_size: int, spec: GrammarSpec) -> tuple:
    import llguidance

    grammar = spec.llguidance_grammar()
    lltok = _lltokenizer(tokenizer, vocab_size)
    if error := llguidance.LLMatcher.validate_grammar(grammar, lltok):
        raise UserError(f"malformed {spec.kind.replace('_', ' ')}: {error.splitlines()[0]}")
    return lltok, grammar


def require_llguidance() -> None:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        raise UserError("constrained decoding needs the `llguidance` package: pip install llguidance") from None


class GrammarState:
    """One row's position in its grammar."""

    def __init__(self, spec: GrammarSpec, tokenizer: Tokenizer, vocab_size: int):
        import llguidance

        require_llguidance()
        lltok, grammar = _compiled(tokenizer, vocab_size, spec)
        self.matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        self.vocab_size = vocab_size

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write this row's allowed tokens into bitmask[row] (int32 words, 32 tokens each)."""
        self.matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), bitmask.shape[1] * 4)
        self._check()

    def accept(self, token_id: int) -> None:
        self.matcher.consume_token(token_id)
        self._check()

    @property
    def finished(self) -> bool:
        """The output is complete: nothing but the end may follow."""
        return self.matcher.is_stopped()

    def _check(self):
        if self.matcher.is_error():
            raise UserError(f"constrained decoding failed: {self.matcher.get_error()}")


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


_BITS = torch.arange(32, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """(B, V) logits with the tokens a (B, W) bitmask forbids set to -inf."""
    allowed = ((bitmask.to(logits.device).unsqueeze(-1) >> _BITS.to(logits.device)) & 1).bool()
    allowed = allowed.view(bitmask.shape[0], -1)[:, :logits.shape[-1]]
    return logits.masked_fill(~allowed, float("-inf"))
