"""Speculative decoding in the engine: for each row a draft proposes k tokens, the target verifies every
row's drafts in one forward, and the rule of Leviathan et al. 2023 / Chen et al. 2023 keeps exactly the
target's distribution (greedy: exactly the target's tokens). Drafts come from a smaller model with the
same tokenizer (batched, with its own KV cache) or from the text itself (prompt lookup: the tokens that
followed the latest earlier occurrence of the last n tokens). Each row's k adapts to its acceptance.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .completion import Completion, top_k_filter, top_p_filter
from .errors import OptionError, UserError
from .generation import Engine, _apart, _common_prefix
from .model import GPT
from .sampling import GRAMMAR_KINDS, SamplingConfig
from .tokenizer import Tokenizer

MAX_DRAFT = 16  # the most tokens any drafter proposes a step (each drafter's own max_k is at most this)
PROBE_EVERY = 8  # a row at k = 0 drafts one token every this many steps, to see whether drafts pay again


@dataclass
class SpecStats:
    proposed: int = 0
    accepted: int = 0
    target_forwards: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def _probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """(N, V) logits -> the (N, V) distribution sampling draws from (logit bias, temperature, top-k, top-p)."""
    logits = logits.float()
    if cfg.logit_bias:
        ids = torch.tensor(list(cfg.logit_bias), device=logits.device)
        logits = logits.index_add(1, ids, torch.tensor(list(cfg.logit_bias.values()), device=logits.device)[None]
                                  .expand(logits.shape[0], -1).float())
    if cfg.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = top_p_filter(top_k_filter(logits / max(cfg.temperature, 1e-6), cfg.top_k), cfg.top_p)
    return logits.softmax(-1)


def speculation_blocker(cfg: SamplingConfig) -> str | None:
    """What in these settings speculative decoding cannot keep exact (the penalties depend on every drafted
    token; a grammar masks each one), or None. Such rows decode one token a step beside the others."""
    for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
        if getattr(cfg, name) != SamplingConfig.__dataclass_fields__[name].default:
            return name
    for name in ("grammar", "logprobs"):
        if getattr(cfg, name) is not None:
            return name
    return "min_tokens" if cfg.min_tokens and not cfg.ignore_eos else None


def check_speculative(cfg: SamplingConfig) -> None:
    """--draft on a verb that decodes one row: a setting it cannot honour is the user's to change."""
    if (blocker := speculation_blocker(cfg)) == "grammar":  # one field behind several flags: say which kind
        raise OptionError("draft", lambda n: f"{n('draft')} does not combine with structured output (a "
                                             f"{GRAMMAR_KINDS[cfg.grammar.kind]} here): drop one of them")
    if blocker:
        raise OptionError("draft", lambda n: f"{n('draft')} does not combine with {n(blocker)}: leave it at its default "
                                             f"or drop {n('draft')}")


class NgramDraft:
    """Prompt lookup: propose what followed the latest earlier occurrence of the context's last n tokens."""

    max_k = MAX_DRAFT  # a lookup costs nothing: as many as the verifying forward takes at about one's cost
    min_k = 1

    def __init__(self, max_n: int = 3):
        self.max_n = max_n

    def propose(self, ids: list[int], k: int) -> list[int]:
        """k tokens (none without a match). A match close to the end runs on into the tokens it proposes,
        so a loop of period p drafts k tokens, not p."""
        for n in range(min(self.max_n, len(ids) - 1), 0, -1):
            tail = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start:start + n] == tail:
                    follow = ids[start + n:start + n + k]
                    while len(follow) < k:  # ids + follow continues the text it copies
                        follow.append(follow[start + n + len(follow) - len(ids)])
                    return follow
        return []


SMALL_DRAFT_WIDTH = 768  # narrower bf16 drafts decode in float32 on a CPU (see _draft_in_its_dtype)


def _draft_in_its_dtype(model: GPT) -> GPT:
    """The draft as it decodes: on a CPU a bf16 draft narrower than GPT-2 small runs as a float32 copy, since
    its small matmuls cost more in oneDNN's per-call overhead in bf16 than in float32 (0.82 vs 0.58 ms a step
    for 2 x 256). A fixed rule, not a timing: a seeded sampled row's tokens depend on the draft's
    distributions, so they must not change from one process to the next (greedy ones never do: only the
    target decides which tokens are kept)."""
    weight = model.lm_head.weight
    if weight.device.type != "cpu" or weight.dtype == torch.float32 or model.config.n_embd >= SMALL_DRAFT_WIDTH \
            or not isinstance(model.lm_head, torch.nn.Linear):  # a quantized draft (--quantize) stays as it is
        return model
    return copy.deepcopy(model).float()


class ModelDraft:
    """A smaller model with the target's tokenizer, drafting for many rows at once: one slot of its own KV
    cache per engine slot, fed only what each slot lacks."""

    max_k = 8  # each drafted token costs a forward of the draft
    min_k = 0  # a row whose drafts are all rejected stops drafting, but for one token every PROBE_EVERY steps

    def __init__(self, model: GPT, max_batch: int, max_len: int):
        self.model, self.max_len = _draft_in_its_dtype(model), max_len
        self.device = model.lm_head.weight.device
        self.cache = model.new_cache(max_batch, max_len)
        self.cached: list[list[int]] = [[] for _ in range(max_batch)]  # tokens whose K/V each slot holds

    def propose(self, rows: list[tuple[int, list[int], int, Completion]]) -> dict[int, tuple[list[int], torch.Tensor]]:
        """rows: (slot, context ids, k, completion) -> {slot: (k drafted tokens, their (k, V) draft
        distributions)}; sampled with each row's settings and generator."""
        rows = [r for r in rows if r[2] > 0 and len(r[1]) + r[2] <= self.max_len]
        if not rows:
            return {}
        # a seeded row drafts as it would alone (its generator draws only its own k tokens; its forwards
        # attend row by row and catch up alone), so that its tokens do not depend on the batch
        apart = any(c.sampling.seed is not None for *_, c in rows)
        logits = torch.cat([self._catch_up([row]) for row in rows]) if apart else self._catch_up(rows)
        out = {slot: ([], []) for slot, *_ in rows}
        for step in range(max(k for _, _, k, _ in rows)):
            for i, (slot, ids, k, c) in enumerate(rows):
                q = _probs(logits[i:i + 1], c.sampling)[0]
                t = int(q.argmax()) if c.sampling.temperature == 0 else \
                    int(torch.multinomial(q, 1, generator=c._generator))
                out[slot][0].append(t)
                out[slot][1].append(q)
            rows = [row for row in rows if row[2] > step + 1]  # the rows that draft another token
            if rows:
                last = [out[slot][0][-1] for slot, *_ in rows]
                pos = [[len(self.cached[slot])] for slot, *_ in rows]
                logits = self._forward([[t] for t in last], pos, [slot for slot, *_ in rows], apart=apart)
                for (slot, *_), t in zip(rows, last):
                    self.cached[slot].append(t)
        return {slot: (tokens, torch.stack(qs)) for slot, (tokens, qs) in out.items()}

    def _catch_up(self, rows) -> torch.Tensor:
        """Feed each row what its slot lacks of its context (at least its last token): the next logits."""
        starts = [min(_common_prefix(self.cached[slot], ids), len(ids) - 1) for slot, ids, _, _ in rows]
        width = max(len(ids) - s for (_, ids, _, _), s in zip(rows, starts))
        tokens, positions = [], []
        for (slot, ids, _, _), s in zip(rows, starts):
            new = ids[s:]
            tokens.append(new + [0] * (width - len(new)))
            positions.append([min(s + j, self.max_len - 1) for j in range(width)])  # padding writes past
            self.cached[slot] = list(ids)
        last = [len(ids) - s - 1 for (_, ids, _, _), s in zip(rows, starts)]
        return self._forward(tokens, positions, [slot for slot, *_ in rows], last)

    def _forward(self, tokens, positions, slots, last=None, apart: bool = False) -> torch.Tensor:
        at = torch.zeros(len(tokens), len(tokens[0]), dtype=torch.bool)
        at[torch.arange(len(tokens)), torch.tensor(last or [0] * len(tokens))] = True
        return self.model(torch.tensor(tokens, device=self.device), input_pos=torch.tensor(positions, device=self.device),
                          kv_caches=self.cache, cache_rows=torch.tensor(slots, device=self.device),
                          logits_at=at.to(self.device), rows_apart=apart)


def verify(proposal: list[int], q: torch.Tensor | None, p: torch.Tensor, cfg: SamplingConfig, gen) -> list[int]:
    """The accepted drafted tokens and one more from the target (a correction, or the bonus token).
    p: the target's (len(proposal) + 1, V) distributions; q: the draft's (len(proposal), V), None for a
    deterministic draft (prompt lookup)."""
    out = []
    for i, t in enumerate(proposal):
        if cfg.temperature == 0:
            if int(p[i].argmax()) != t:
                return out + [int(p[i].argmax())]
            out.append(t)
            continue
        q_t = q[i, t] if q is not None else torch.tensor(1.0)
        if torch.rand((), generator=gen, device=p.device) * q_t <= p[i, t]:  # accept with prob min(1, p/q)
            out.append(t)
            continue
        residual = (p[i] - (q[i] if q is not None else torch.nn.functional.one_hot(
            torch.tensor(t, device=p.device), p.shape[-1]).float())).clamp(min=0)
        residual = residual if residual.sum() > 0 else p[i]
        return out + [int(torch.multinomial(residual / residual.sum(), 1, generator=gen))]
    last = p[len(proposal)]
    return out + [int(last.argmax()) if cfg.temperature == 0 else int(torch.multinomial(last, 1, generator=gen))]


class SpeculativeEngine(Engine):
    """The Engine, with drafted tokens verified by the target: each step feeds every row its newest token
    and, for rows whose settings allow it (speculation_blocker), the tokens drafted after it, in one
    forward; those rows then take the drafts the target accepts and one token of the target's own. Other
    rows decode one token a step as in Engine. Completions count .drafted and .accepted_drafts."""

    slack = MAX_DRAFT + 1

    def __init__(self, model: GPT, tokenizer: Tokenizer, max_batch: int = 8, draft: GPT | str = "ngram",
                 draft_k: int = 4, compile: bool = False, log=None):
        if compile:
            raise UserError("--compile does not combine with --draft (the verifying forward takes several tokens "
                            "a row): use one of them")
        super().__init__(model, tokenizer, max_batch, log=log)
        if isinstance(draft, GPT):
            if draft.config.vocab_size != model.config.vocab_size:
                raise OptionError("draft", lambda n: f"{n('draft')} must have the target's tokenizer (its vocabulary "
                                                     "differs)")
            self.drafter = ModelDraft(draft, max_batch, min(draft.config.block_size, model.config.block_size))
        elif draft == "ngram":
            self.drafter = NgramDraft()
        else:
            raise OptionError("draft", lambda n: f"{n('draft')} must be a model or 'ngram', not {draft!r}")
        self.draft_k = draft_k
        self._k = [draft_k] * max_batch  # each slot's current k
        self._idle = [0] * max_batch  # each slot's steps at k = 0 (it probes every PROBE_EVERY of them)
        self._verified = [False] * max_batch  # the slot's newest token came from verification: no pick needed
        self.target_forwards = 0

    def _prefill(self, joining) -> None:
        super()._prefill(joining)
        for slot, _ in joining:
            self._verified[slot], self._k[slot], self._idle[slot] = False, self.draft_k, 0

    @torch.inference_mode()
    def step(self) -> list[tuple[Completion, str]]:
        for slot, c in enumerate(self._rows):
            if c is not None and c.finished:
                self._rows[slot] = None
        self._admit()
        rows = [(slot, c) for slot, c in enumerate(self._rows) if c is not None]
        if not rows:
            return []
        text = {id(c): "" for _, c in rows}
        picking = [(slot, c) for slot, c in rows if not self._verified[slot]]
        if picking:
            for (_, c), token in zip(picking, self._pick(picking)):
                text[id(c)] += c.push(token)
        live = [(slot, c) for slot, c in rows if not c.finished]
        if live:
            self._speculate(live, text)
        for slot, c in rows:
            if c.finished:
                self._rows[slot] = None
        self._masks.start([(slot, c._grammar) for slot, c in self._rows_alive() if c.constrained])
        return [(c, text[id(c)]) for _, c in rows]

    def _rows_alive(self):
        return [(slot, c) for slot, c in enumerate(self._rows) if c is not None and not c.finished]

    def _proposals(self, live) -> dict[int, tuple[list[int], torch.Tensor | None]]:
        """Each speculating row's drafted tokens (and the draft's distributions), within its budget and the cache."""
        wanted = []
        for slot, c in live:
            if speculation_blocker(c.sampling) is not None:
                continue
            ids = c.prompt_ids + c.token_ids
            k = self._k[slot]
            if k == 0:  # the row's own count, so that when it probes does not depend on the batch
                self._idle[slot] += 1
                k = int(self._idle[slot] % PROBE_EVERY == 0)
            room = min(k, c.sampling.max_new_tokens - c.completion_tokens - 1, self._cache_len - len(ids))
            wanted.append((slot, ids, max(0, room), c))
        if isinstance(self.drafter, NgramDraft):
            return {slot: (self.drafter.propose(ids, room) if room else [], None) for slot, ids, room, _ in wanted}
        drafted = self.drafter.propose(wanted)
        return {slot: drafted.get(slot, ([], None)) for slot, *_ in wanted}

    def _speculate(self, live, text: dict) -> None:
        """One forward: every live row's newest token, then a speculating row's drafts; verify those."""
        proposals = self._proposals(live)
        feed, rows = self._rows_fed(live)
        index = {slot: i for i, slot in enumerate(feed)}
        width = 1 + max((len(p) for p, _ in proposals.values()), default=0)
        tokens, positions = [[0] * width for _ in feed], []
        at = torch.zeros(len(feed), width, dtype=torch.bool)
        for slot in feed:  # free slots (and padding) write dummies past what they hold in cache
            base = min(len(self._cached[slot]), self._cache_len - 1)
            del self._cached[slot][base:]
            positions.append([min(base + j, self._cache_len - 1) for j in range(width)])
        for slot, c in live:
            seq = [c.token_ids[-1]] + proposals.get(slot, ([], None))[0]
            tokens[index[slot]][:len(seq)] = seq
            at[index[slot], :len(seq)] = True
        logits = self.model(torch.tensor(tokens, device=self.device), input_pos=torch.tensor(positions, device=self.device),
                            kv_caches=self._caches, cache_rows=rows, logits_at=at.to(self.device),
                            rows_apart=_apart(live))  # token by token, as the target alone
        self.target_forwards += 1
        offsets = at.sum(1).cumsum(0).tolist()
        for slot, c in live:
            end = offsets[index[slot]]
            fed = c.token_ids[-1]
            if slot not in proposals:  # decodes one token a step: its next logits, picked next step
                self._logits[slot] = logits[end - 1].float()
                self._cached[slot].append(fed)
                self._verified[slot] = False
                continue
            proposal, q = proposals[slot]
            accepted = verify(proposal, q, _probs(logits[end - len(proposal) - 1:end], c.sampling), c.sampling,
                              c._generator)
            self._cached[slot] += [fed] + accepted[:-1]  # the last accepted token is fed next step
            self._verified[slot] = True
            c.drafted += len(proposal)
            c.accepted_drafts += len(accepted) - 1
            for token in accepted:
                text[id(c)] += c.push(token)
                if c.finished:
                    break
            if proposal:  # k grows while every draft is taken, shrinks while none is; no draft: unchanged
                k = self._k[slot]
                self._k[slot] = min(self.drafter.max_k, k + 1) if len(accepted) > len(proposal) else \
                    max(self.drafter.min_k, k - (len(accepted) == 1))


def make_engine(model: GPT, tokenizer: Tokenizer, max_batch: int = 8, compile: bool = False,
                draft: GPT | str | None = None, draft_k: int = 4, log=None) -> Engine:
    """The engine a surface decodes with: speculative when given a draft (a GPT or "ngram")."""
    if draft is None:
        return Engine(model, tokenizer, max_batch, compile=compile, log=log)
    return SpeculativeEngine(model, tokenizer, max_batch, draft, draft_k, compile=compile, log=log)


def speculative_complete(target: GPT, tokenizer: Tokenizer, prompt_ids: list[int], cfg: SamplingConfig,
                         draft: GPT | str, k: int = 4) -> tuple[Completion, SpecStats]:
    """One completion decoded with a draft: (Completion, SpecStats)."""
    check_speculative(cfg)
    engine = SpeculativeEngine(target, tokenizer, 1, draft, k)
    completion = engine.add(prompt_ids, cfg)
    while engine.has_work:
        engine.step()
    return completion, SpecStats(completion.drafted, completion.accepted_drafts, engine.target_forwards)
