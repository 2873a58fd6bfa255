"""Constrained decoding: a grammar (JSON schema, any JSON object, regex, a choice of strings, Lark or
GBNF) compiled once per tokenizer by llguidance, and a per-row state that yields the allowed tokens
at each step and advances with each accepted token.

Our tokenizers are described to llguidance by the bytes each token adds to the text: exact for
byte-level BPE (GPT-2's and our own trained ones); for a word-level tokenizer, the bytes a token
adds after a word (a space, then the word; punctuation glued), which is how its decoder joins words
except after an opening bracket.
"""
from __future__ import annotations

import copy
import json
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch

from .errors import UserError
from .sampling import GRAMMAR_KINDS, GrammarSpec
from .tokenizer import Tokenizer

JSON_KINDS = ("json", "json_schema")  # the grammar kinds whose output is JSON text
COMPACT_JSON = {"whitespace_flexible": False}  # ", " and ": " between items: no runs of spaces or newlines


def _regex_literal(text: str) -> str:
    """`text` matched literally by a regex inside a Lark /.../ (Rust regex syntax: punctuation escaped)."""
    special = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    return "".join(special.get(c) or ("\\" + c if c in "\\.+*?()|[]{}^$#&-~/" else c) for c in text)


def llguidance_grammar(spec: GrammarSpec) -> str:
    """The grammar in llguidance's own form (a UserError naming the problem if it is malformed). JSON
    is written with standard separators and no free whitespace (a small model would wander in it)."""
    import llguidance

    try:
        if spec.kind in JSON_KINDS:
            schema = json.loads(spec.source) if spec.kind == "json_schema" else {"type": "object"}
            if isinstance(schema, dict):
                schema = {"x-guidance": COMPACT_JSON, **strict_formats(schema)}
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        if spec.kind == "choice":  # one lexeme, an alternation of the literals: nothing else can follow (as
            # a rule of quoted alternatives, more than the parser's 2000 items a row would fail mid-decoding)
            return llguidance.LLMatcher.grammar_from_lark(
                "start: /" + "|".join(map(_regex_literal, json.loads(spec.source))) + "/")
        return llguidance.grammar_from(spec.kind, spec.source)
    except (ValueError, TypeError) as e:
        raise UserError(f"malformed {GRAMMAR_KINDS[spec.kind]}: {_one_line(e)}") from None
    except RecursionError:
        raise UserError(f"the {spec.kind.replace('_', ' ')} is nested too deeply to compile; flatten it "
                        "(e.g. with $defs and $ref)") from None


# Formats as the common validators (jsonschema's FormatChecker with rfc3339-validator) accept them:
# llguidance's own regexes also allow year 0000 and a lowercase "z", which those refuse. Days up to 28,
# so that every month has them.
_DAY = "(0[1-9]|1[0-9]|2[0-8])"
FORMAT_PATTERNS = {
    "date": f"^[1-9][0-9]{{3}}-(0[1-9]|1[0-2])-{_DAY}$",
    "date-time": f"^[1-9][0-9]{{3}}-(0[1-9]|1[0-2])-{_DAY}T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
                 "(\\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$",
}


def strict_formats(schema):
    """The schema with each string `format` of FORMAT_PATTERNS (and no pattern of its own) written as
    that pattern, everywhere in it."""
    if isinstance(schema, list):
        return [strict_formats(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_formats(v) for k, v in schema.items()}
    if isinstance(out.get("format"), str) and out["format"] in FORMAT_PATTERNS and "pattern" not in out:
        out["pattern"] = FORMAT_PATTERNS[out.pop("format")]
    return out


def _one_line(error) -> str:
    return " ".join(str(error).split())


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

    grammar = llguidance_grammar(spec)
    lltok = _lltokenizer(tokenizer, vocab_size)
    if error := llguidance.LLMatcher.validate_grammar(grammar, lltok):
        raise UserError(f"malformed {GRAMMAR_KINDS[spec.kind]}: {_one_line(error)}")
    return lltok, grammar


def require_llguidance() -> None:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        raise UserError("constrained decoding needs the `llguidance` package: pip install llguidance") from None


def compile_grammar(spec: GrammarSpec, tokenizer: Tokenizer, vocab_size: int) -> tuple:
    """Compile (or take from the cache) a grammar for this tokenizer; a UserError if it is malformed."""
    require_llguidance()
    return _compiled(tokenizer, vocab_size, spec)


class GrammarState:
    """One row's position in its grammar."""

    def __init__(self, spec: GrammarSpec, tokenizer: Tokenizer, vocab_size: int):
        lltok, grammar = compile_grammar(spec, tokenizer, vocab_size)
        import llguidance

        self.matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.consumed = 0  # tokens accepted so far: which state a computed mask belongs to
        self.json = spec.kind in JSON_KINDS
        self.text = JsonText()  # where the output is: inside a string or not (closing tokens differ)
        self._plan: tuple[int, list[int]] = (-1, [])  # (at tokens consumed, the rest of a shortest walk)
        self.shortest = shortest_completion(spec, tokenizer, vocab_size)  # tokens a whole output takes at least

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write this row's allowed tokens into bitmask[row] (int32 words, 32 tokens each)."""
        self.matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), bitmask.shape[1] * 4)
        self._check()

    def closing(self, logits: torch.Tensor, lookahead: int = 64, first: bool = False) -> torch.Tensor:
        """Near the end of the row's token budget: the allowed closing tokens (see CLOSING_TIERS) that
        complete the output at once, if any (tried on the matcher and rolled back, most likely first);
        else prefer_closing's tiers. first=True (greedy rows) stops at the most likely such token: the
        one the argmax over all of them would pick."""
        tiers = closing_tiers(self.tokenizer, self.vocab_size).to(logits.device)
        finite = torch.isfinite(logits[0])
        allowed = finite & tiers.any(0)
        candidates = allowed.nonzero().flatten()
        candidates = candidates[logits[0, candidates].argsort(descending=True, stable=True)][:lookahead].tolist()
        finishing = []
        for t in candidates:
            if self.matcher.try_consume_tokens([t]) == 1:
                if self.matcher.is_accepting():
                    finishing.append(t)
                self.matcher.rollback(1)
                if finishing and first:
                    break
        if finishing:
            keep = torch.zeros_like(allowed)
            keep[finishing] = True
            return logits.masked_fill(~keep, float("-inf"))
        if self.json and self.text.in_string:  # only its closing quote ends a string; brackets would extend it
            if not (finite & tiers[:2].any(0)).any():
                return self._toward_shortest(logits)  # a format or pattern must be finished first
            tiers = tiers[:2]
        return prefer_closing(logits, tiers)

    def _toward_shortest(self, logits: torch.Tensor, limit: int = 64) -> torch.Tensor:
        """Only the next token of the shortest walk to a complete output from here (the logits as they
        are if no walk completes). The walk is kept while the row follows it."""
        at, path = self._plan
        if at != self.consumed or not path:
            found = shortest_walk(self.matcher, self.text, True, self.tokenizer, self.vocab_size, limit)
            if found is None or not found[1]:
                return logits
            path = found[1]
        self._plan = (self.consumed + 1, path[1:])  # still valid if this token is the one taken
        keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        keep[path[0]] = True
        return logits.masked_fill(~keep, float("-inf"))

    def accept(self, token_id: int) -> None:
        self.consumed += 1
        self.matcher.consume_token(token_id)
        self._check()
        self.text.add(token_bytes(self.tokenizer, token_id))

    @property
    def finished(self) -> bool:
        """The output is complete: nothing but the end may follow."""
        return self.matcher.is_stopped()

    @property
    def complete(self) -> bool:
        """The output so far is a whole one (it may also go on: a number can take more digits)."""
        return self.matcher.is_stopped() or self.matcher.is_accepting()

    def _check(self):
        if self.matcher.is_error():  # llguidance's first line names the error; the rest dumps its state
            first = (self.matcher.get_error().strip().splitlines() or ["unknown error"])[0]
            if " " not in first:  # a bare code, e.g. NoExtensionBias: no token can follow what is there
                first = f"the grammar lets no token follow the output so far (llguidance: {first})"
            raise UserError(f"constrained decoding failed: {first}")


class RowMasks:
    """The allowed-token bitmasks of a batch's constrained rows, one bitmask row per engine slot.

    fill(rows) makes sure every (slot, state) given has its mask for the state it is in, computing those
    still missing in one call to llguidance's executor (rows in parallel, without the GIL). start(rows),
    called once the step's tokens are accepted, computes the next masks in a worker thread while the
    model's forward runs, so fill() at the next step only waits for them. A matcher is never used by two
    threads at once: fill() joins the worker before anything else touches the states."""

    def __init__(self, slots: int, vocab_size: int):
        self.bitmask = new_bitmask(slots, vocab_size)
        self._job = None
        self._ready: dict[int, tuple[GrammarState, int]] = {}  # slot -> (state, tokens consumed) of its mask

    def start(self, rows: list[tuple[int, GrammarState]]) -> None:
        self._join()
        self._ready = {}
        if rows:
            self._job = _pool().submit(self._compute, rows)

    def fill(self, rows: list[tuple[int, GrammarState]]) -> dict[int, str]:
        """Compute what is missing; returns {slot: why} for the rows whose grammar engine failed."""
        self._join()
        missing = [(slot, state) for slot, state in rows if self._ready.get(slot) != (state, state.consumed)]
        if missing:
            self._compute(missing)
        failed = {}
        for slot, state in rows:
            try:
                state._check()
            except UserError as e:  # e.g. a grammar too complex for the lexer: end this row, not the batch
                failed[slot] = str(e)
        return failed

    def _compute(self, rows: list[tuple[int, GrammarState]]) -> None:
        _executor().unsafe_compute_mask_ptr([(state.matcher, slot) for slot, state in rows],
                                            self.bitmask.data_ptr(), self.bitmask.shape[1] * 4, self.bitmask.shape[0])
        self._ready.update((slot, (state, state.consumed)) for slot, state in rows)

    def _join(self) -> None:
        if self._job is not None:
            job, self._job = self._job, None
            job.result()


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    """The thread that computes the next masks while the forward runs (shared by every engine)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpt2ft-grammar")


@lru_cache(maxsize=1)
def _executor():
    """llguidance's executor: computes many rows' masks in parallel in its own threads."""
    import llguidance

    return llguidance.LLExecutor(min(8, os.cpu_count() or 1))


class JsonText:
    """Whether JSON text written so far ends inside a string (an odd number of unescaped quotes)."""

    def __init__(self):
        self.in_string, self._escaped = False, False

    def add(self, data: bytes) -> None:
        for byte in data:
            if self._escaped:
                self._escaped = False
            elif byte == 0x5C and self.in_string:  # backslash
                self._escaped = True
            elif byte == 0x22:  # quote
                self.in_string = not self.in_string


# Near the end of a row's budget, in this order: EOS; a token that closes a string (starts with '"',
# then only closing characters, and leaves no string open); closing brackets alone; separators (to reach
# the next required key).
CLOSING_TIERS = ((b'"', b'"}],: '), (b"}]", b"}] "), (b",:", b'",:}] '))


@lru_cache(maxsize=4)
def closing_tiers(tokenizer: Tokenizer, vocab_size: int) -> torch.Tensor:
    """(1 + len(CLOSING_TIERS), V) bool: EOS, then the tokens of each tier (first byte, other bytes)."""
    tiers = torch.zeros(1 + len(CLOSING_TIERS), vocab_size, dtype=torch.bool)
    tiers[0, tokenizer.eos_id] = True
    for i in range(vocab_size):
        text = token_bytes(tokenizer, i)
        for t, (first, rest) in enumerate(CLOSING_TIERS, start=1):
            # a string-closing token must end outside a string: an even count of quotes (`":"","`) reopens one
            if text and text[0] in first and all(b in rest for b in text[1:]) and \
                    (first != b'"' or text.count(b'"') % 2 == 1):
                tiers[t, i] = True
    return tiers


OTHER_TIER = 1 + len(CLOSING_TIERS)  # a token of no closing tier


@lru_cache(maxsize=4)
def _finish_orders(tokenizer: Tokenizer, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token: its tier (0 EOS, 1.. the closing tiers, OTHER_TIER the rest), and its place when the
    tokens are ordered longest first and shortest first: what the walks of shortest_walk go by."""
    tiers = closing_tiers(tokenizer, vocab_size)
    tier = torch.where(tiers.any(0), tiers.float().argmax(0), OTHER_TIER).numpy()
    length = np.array([len(token_bytes(tokenizer, i)) for i in range(vocab_size)])
    return tier, np.argsort(np.argsort(-length, kind="stable")), np.argsort(np.argsort(length, kind="stable"))


@lru_cache(maxsize=256)
def shortest_completion(spec: GrammarSpec, tokenizer: Tokenizer, vocab_size: int, limit: int = 128) -> int:
    """About the fewest tokens a whole output of the grammar takes (0 if no walk finds one), from its
    start (see shortest_walk). A row keeps twice this for closing its output (completion.closing_window),
    so a schema with many required fields still finishes within a small budget."""
    import llguidance

    lltok, grammar = compile_grammar(spec, tokenizer, vocab_size)
    found = shortest_walk(llguidance.LLMatcher(lltok, grammar, log_level=0), JsonText(), spec.kind in JSON_KINDS,
                          tokenizer, vocab_size, limit)
    return found[0] if found else 0


def shortest_walk(matcher, text: JsonText, in_json: bool, tokenizer: Tokenizer, vocab_size: int,
                  limit: int) -> tuple[int, list[int]] | None:
    """(tokens, the tokens) of the shortest of four walks from the matcher's state (on copies) to a
    complete output, or None if none completes within `limit`. Each walk takes EOS, else a closing token
    (CLOSING_TIERS; inside a JSON string only its closing quote), else the longest allowed token (a forced
    key or pattern in fewest tokens), the shortest (an open number or date ends soonest), or a random one
    (twice, seeded: a number that must not stay 0)."""
    _, longest, shortest = _finish_orders(tokenizer, vocab_size)
    policies = [lambda ids, place=place: ids[place[ids].argmin()] for place in (longest, shortest)]
    policies += [lambda ids, rng=np.random.default_rng(seed): rng.choice(ids) for seed in (0, 1)]
    walks = [_walk(matcher.deep_copy(), copy.copy(text), in_json, tokenizer, vocab_size, limit, p) for p in policies]
    return min((w for w in walks if w is not None), default=None)


def _walk(matcher, text: JsonText, in_json: bool, tokenizer: Tokenizer, vocab_size: int, limit: int,
          choose) -> tuple[int, list[int]] | None:
    """(tokens, the tokens) until the output is complete, taking choose(allowed ids of the lowest
    rank) at each step; None if it is not complete within `limit`."""
    tier = _finish_orders(tokenizer, vocab_size)[0]
    bitmask, path = new_bitmask(1, vocab_size), []
    for n in range(limit):
        if matcher.is_accepting() or matcher.is_stopped():
            return n, path
        if matcher.is_error():
            return None
        matcher.unsafe_compute_mask_ptr(bitmask[0].data_ptr(), bitmask.shape[1] * 4)
        ids = np.unpackbits(bitmask[0].numpy().view(np.uint8), count=vocab_size, bitorder="little").nonzero()[0]
        if not len(ids):
            return None
        rank = tier[ids] if not (in_json and text.in_string) else \
            np.where(tier[ids] > 1, OTHER_TIER, tier[ids])  # inside a string brackets would extend it
        token = int(choose(ids[rank == rank.min()]))
        path.append(token)
        matcher.consume_token(token)
        text.add(token_bytes(tokenizer, token))
    return None


def prefer_closing(logits: torch.Tensor, tiers: torch.Tensor) -> torch.Tensor:
    """(1, V) masked logits -> the same, kept only on the first tier with an allowed token (EOS, then
    tokens that close what is open): how a row near the end of its token budget finishes its output."""
    allowed = torch.isfinite(logits[0])
    for tier in tiers.to(logits.device):
        if (keep := allowed & tier).any():
            return logits.masked_fill(~keep, float("-inf"))
    return logits


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


_BITS = torch.arange(32, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """(B, V) logits with the tokens a (B, W) bitmask forbids set to -inf. On the CPU the bits are
    unpacked by numpy (little-endian words: token 32 w + j is bit j of word w) in one pass."""
    if logits.device.type == "cpu":
        bits = np.unpackbits(np.ascontiguousarray(bitmask.numpy()).view(np.uint8), axis=-1, count=logits.shape[-1], bitorder="little")
        return torch.where(torch.from_numpy(bits.view(np.bool_)), logits, float("-inf"))
    allowed = ((bitmask.to(logits.device).unsqueeze(-1) >> _BITS.to(logits.device)) & 1).bool()
    allowed = allowed.view(bitmask.shape[0], -1)[:, :logits.shape[-1]]
    return logits.masked_fill(~allowed, float("-inf"))
