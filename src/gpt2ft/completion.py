"""One completion, bottom-up: logits processors (pure functions on (B, V) logits) -> sample_next() ->
TextDecoder (token ids -> UTF-8-safe text) -> Completion (one row's text, stop strings, finish_reason,
usage, logprobs and its own sampling state). The Engine in generation.py runs many of them together."""
from __future__ import annotations

import codecs
import os
from typing import NamedTuple

import torch

from .errors import UserError
from .grammar import GrammarState, apply_bitmask
from .sampling import SamplingConfig
from .tokenizer import Tokenizer


def closing_window(max_new_tokens: int, shortest: int = 0) -> int:
    """The last tokens of a constrained row's budget, in which tokens that close the output are preferred:
    a third of it, at least 16, and at least twice the tokens the grammar's shortest output takes."""
    return max(16, max_new_tokens // 3, 2 * shortest)


# ----- logits processors (pure functions on (B, V) float logits) ------------------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty as transformers applies it: seen tokens' logits / penalty if > 0, else * penalty."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency_penalty(logits: torch.Tensor, counts: torch.Tensor, presence: float,
                                     frequency: float) -> torch.Tensor:
    """OpenAI's penalties: logit -= presence * [count > 0] + frequency * count, where count is how
    often each token was generated so far."""
    if presence == 0 and frequency == 0:
        return logits
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts.to(logits.dtype)


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    if not k or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = mass_before >= p  # the set already reached p without this token
    drop_sorted[..., 0] = False  # the most likely token always stays (p may underflow to 0)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """(B, V) probabilities and (B,) uniforms in [0, 1) -> (B,) token ids by inverse CDF: the first token
    whose cumulative probability exceeds u times the row's total. One op for the whole batch, and each
    row's token depends on its own probabilities and uniform only."""
    cdf = probs.cumsum(dim=-1)
    return torch.searchsorted(cdf, uniforms[:, None].to(cdf.dtype) * cdf[:, -1:], right=True)[:, 0] \
        .clamp_(max=probs.shape[-1] - 1)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) -> (B,) each row's most likely token, the first of equals (as argmax; a CPU's max over the
    last dimension gives the same index in a third of argmax's time)."""
    return logits.max(dim=-1).indices


def sample_rows(logits: torch.Tensor, settings: list[SamplingConfig],
                generators: list[torch.Generator | None]) -> torch.Tensor:
    """(B, V) logits (penalties and masks already applied) -> (B,) next token ids. Greedy rows take one
    argmax together; sampled rows that share temperature, top-k and top-p are filtered, normalised and
    drawn together, each with one uniform from its own generator (so a seeded row gives the same tokens
    alone and in any batch)."""
    logits = logits.float()
    greedy = [i for i, cfg in enumerate(settings) if cfg.temperature == 0]
    if len(greedy) == len(settings):
        return greedy_tokens(logits)
    tokens = torch.zeros(len(settings), dtype=torch.long, device=logits.device)
    if greedy:
        tokens[greedy] = greedy_tokens(logits[greedy])
    groups: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(settings):
        if cfg.temperature > 0:
            groups.setdefault((cfg.temperature, cfg.top_k, cfg.top_p), []).append(i)
    for (temperature, top_k, top_p), rows in groups.items():
        group = logits if len(rows) == len(settings) else logits[rows]
        # a temperature so small that logits / T overflows is greedy in all but name
        probs = top_p_filter(top_k_filter(group / max(temperature, 1e-6), top_k), top_p).softmax(dim=-1)
        uniforms = torch.cat([torch.rand(1, generator=generators[i], device=logits.device) for i in rows])
        tokens[rows] = draw(probs, uniforms)
    return tokens


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits (penalties already applied) -> (B,) next token ids under one setting: greedy, or
    temperature, top-k and top-p then a draw from `generator` (sample_rows with every row alike)."""
    return sample_rows(logits, [cfg] * logits.shape[0], [generator] * logits.shape[0])


# ----- one completion: tokens -> safe text, stops, finish_reason, usage --------------------------
class TextDecoder:
    """Token ids -> text pieces that never split a UTF-8 character, for any tokenizer.

    Each token's bytes are what it adds to the decoding of its predecessor (so a word-level
    tokenizer gets its spaces; for byte-level BPE that is just the token's own bytes).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._last: int | None = None

    def push(self, token_id: int) -> str:
        decode = self.tokenizer.decode_bytes
        new = decode([token_id])
        if self._last is not None:
            before, both = decode([self._last]), decode([self._last, token_id])
            if both.startswith(before):
                new = both[len(before):]
        self._last = token_id
        return self._utf8.decode(new)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def _find_stop(text: str, stops: list[str]) -> tuple[int, str | None]:
    """(index, stop) of the earliest stop string in text, or (-1, None)."""
    hits = [(i, s) for s in stops if (i := text.find(s)) >= 0]
    return min(hits, key=lambda h: h[0]) if hits else (-1, None)


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could still be the start of a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if s.startswith(text[-n:]):
                longest = max(longest, n)
                break
    return longest


class TokenLogprob(NamedTuple):
    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    """The k most likely (token id, logprob), most likely first (empty when logprobs=0)."""


class Completion:
    """One row: its prompt, the tokens generated, the text released so far and how it ended.

    push(token_id) returns the newly safe text: whole UTF-8 characters, and never text that may
    still begin a stop string (held back until it is known not to). When it ends, finish_reason is
    "stop" (EOS or a stop string; stop_reason is then the stop string, or the EOS id), "length"
    (max_new_tokens), "cancelled", or "error" (the grammar engine gave up on it; stop_reason says why); .text is then the whole completion, cut before any stop.
    token_ids (and logprobs, aligned with them) include the EOS token or the tokens of a stop.
    """

    def __init__(self, prompt_ids: list[int], sampling: SamplingConfig, tokenizer: Tokenizer):
        self.prompt_ids = list(prompt_ids)
        self.sampling = sampling
        self.eos_id = tokenizer.eos_id
        self._tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if sampling.logprobs is not None else None
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.cached_tokens = 0  # prompt tokens whose keys/values were already in the cache
        self.drafted = self.accepted_drafts = 0  # speculative decoding: tokens drafted, and accepted by the model
        self._decoder = TextDecoder(tokenizer)
        self._held = ""  # decoded text not released yet: it may begin a stop string
        self._generator: torch.Generator | None = None  # per-row sampling state, set by _start()
        self._seen: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None  # (token ids, biases)
        self._grammar: GrammarState | None = None
        self.grammar_error: str | None = None  # why the grammar engine gave up on this row (finish "error")

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def push(self, token_id: int) -> str:
        """Take the next generated token; return the text it makes safe to show."""
        if self.finished:
            return ""
        if self.grammar_error is not None:  # the grammar engine gave up on this row: it ends alone
            return self._end("error", self._decoder.flush(), self.grammar_error)
        self.token_ids.append(token_id)
        if self._seen is not None:
            self._seen[token_id] = True
        if self._counts is not None:
            self._counts[token_id] += 1
        if token_id == self.eos_id and not self.sampling.ignore_eos:
            return self._end("stop", self._decoder.flush(), token_id)
        piece = self._decoder.push(token_id)
        if self._grammar is not None:
            try:
                self._grammar.accept(token_id)
            except UserError as e:
                return self._end("error", piece + self._decoder.flush(), str(e))
            if self._grammar.finished:  # the output is complete: nothing may follow
                return self._end("stop", piece + self._decoder.flush())
        if len(self.token_ids) >= self.sampling.max_new_tokens:
            return self._end("length", piece + self._decoder.flush())
        return self._release(piece)

    def cancel(self) -> None:
        """End now (the text held back is dropped); the engine frees the row at its next step."""
        if not self.finished:
            self.finish_reason, self._held = "cancelled", ""

    @property
    def _stops(self) -> list[str]:
        """The stop strings in force: none before min_tokens, and none under a grammar (it ends the output
        where it is complete; a template's stop string inside a JSON string would cut it)."""
        cfg = self.sampling
        if cfg.grammar is not None or len(self.token_ids) < cfg.min_tokens:
            return []
        return cfg.stop + cfg.template_stop

    def _release(self, piece: str, final: bool = False) -> str:
        text = self._held + piece
        cut, stop = _find_stop(text, self._stops)
        if cut >= 0:
            out, self._held = text[:cut], ""
            self.finish_reason, self.stop_reason = "stop", stop
        elif final:
            out, self._held = text, ""
        else:
            keep = len(text) - _held_back(text, self._stops)
            out, self._held = text[:keep], text[keep:]
        self.text += out
        return out

    def _end(self, reason: str, piece: str, stop_reason: str | int | None = None) -> str:
        out = self._release(piece, final=True)
        if not self.finished:  # a stop string in the last piece wins
            self.finish_reason, self.stop_reason = reason, stop_reason
        return out

    # sampling state: one generator per row, so a seeded request gives the same text in any batch
    def _start(self, device: torch.device, vocab_size: int) -> None:
        cfg = self.sampling
        if cfg.temperature > 0:
            seed = cfg.seed if cfg.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(seed)
        if cfg.repetition_penalty != 1.0:  # transformers penalises prompt and generated tokens alike
            self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self._seen[torch.tensor(self.prompt_ids, device=device)] = True
        if cfg.presence_penalty or cfg.frequency_penalty:  # OpenAI's count generated tokens only
            self._counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)
        if cfg.logit_bias:
            self._bias = (torch.tensor(list(cfg.logit_bias), device=device),
                          torch.tensor(list(cfg.logit_bias.values()), device=device))
        if cfg.grammar is not None:
            self._grammar = GrammarState(cfg.grammar, self._tokenizer, vocab_size)

    @property
    def constrained(self) -> bool:
        """Under a grammar that still works (its mask is applied before sampling)."""
        return self._grammar is not None and self.grammar_error is None

    @property
    def unmatched(self) -> bool:
        """Under a grammar, ended before its output was complete (its budget ran out, or it was cancelled)."""
        return self._grammar is not None and self.finished and not self._grammar.complete

    @property
    def plain(self) -> bool:
        """No per-row logits processing at all: sampling alone picks its token."""
        return self._seen is None and self._counts is None and self._bias is None and self._grammar is None \
            and (self.sampling.min_tokens == 0 or self.sampling.ignore_eos)

    def _adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """(1, V) raw logits -> this row's before any grammar mask: its penalties and logit bias."""
        cfg = self.sampling
        if self._seen is not None:
            logits = apply_repetition_penalty(logits, self._seen, cfg.repetition_penalty)
        if self._counts is not None:
            logits = apply_presence_frequency_penalty(logits, self._counts, cfg.presence_penalty,
                                                      cfg.frequency_penalty)
        if self._bias is not None:
            logits = logits.float().index_add(1, self._bias[0], self._bias[1][None].float())
        return logits

    def _after_mask(self, logits: torch.Tensor) -> torch.Tensor:
        """(1, V) logits after the grammar mask -> what sampling sees: near the end of a constrained row's
        budget only tokens that close its output; before min_tokens no EOS."""
        cfg = self.sampling
        left = cfg.max_new_tokens - len(self.token_ids)
        if self.constrained and left <= closing_window(cfg.max_new_tokens, self._grammar.shortest):
            logits = self._grammar.closing(logits, first=cfg.temperature == 0)  # finish parseable within the budget
        if len(self.token_ids) < cfg.min_tokens and not cfg.ignore_eos:
            logits = logits.clone()
            logits[:, self.eos_id] = float("-inf")
        return logits


def next_tokens(logits: torch.Tensor, rows: list[Completion], masks=None, slots: list[int] | None = None) -> torch.Tensor:
    """(B, V) raw logits of B rows -> their (B,) next tokens: each row's own processing only where it has
    some, every constrained row's grammar mask in one op (masks: a grammar.RowMasks holding the bitmask
    of each row's slot), then sample_rows. A row whose grammar engine fails gets EOS (and ends alone)."""
    if not all(c.plain for c in rows):
        logits = logits.float().clone()
        for i, c in enumerate(rows):
            if c._seen is not None or c._counts is not None or c._bias is not None:
                logits[i:i + 1] = c._adjust(logits[i:i + 1])
        constrained = [i for i, c in enumerate(rows) if c.constrained]
        if constrained:
            failed = masks.fill([(slots[i], rows[i]._grammar) for i in constrained])
            for i in constrained:
                rows[i].grammar_error = failed.get(slots[i])
            constrained = [i for i in constrained if rows[i].constrained]
            if constrained:
                allowed = masks.bitmask[[slots[i] for i in constrained]]
                logits[constrained] = apply_bitmask(logits[constrained], allowed)
        for i, c in enumerate(rows):
            if c.constrained or (c.sampling.min_tokens and not c.sampling.ignore_eos):
                logits[i:i + 1] = c._after_mask(logits[i:i + 1])
    tokens = sample_rows(logits, [c.sampling for c in rows], [c._generator for c in rows])
    for i, c in enumerate(rows):
        if c._grammar is not None and c.grammar_error is not None:
            tokens[i] = c.eos_id
    return tokens
