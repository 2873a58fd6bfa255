"""Speculative decoding for one row: a draft proposes k tokens, the target verifies them in one
forward, and the rule of Leviathan et al. 2023 / Chen et al. 2023 keeps exactly the target's
distribution (greedy: exactly the target's tokens). Drafts come from a smaller model with the same
tokenizer, or from the text itself (prompt lookup: the tokens that followed the latest earlier
occurrence of the last n tokens). k adapts to the acceptance rate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .completion import Completion, top_k_filter, top_p_filter
from .errors import UserError
from .generation import check_context
from .model import GPT
from .sampling import SamplingConfig
from .tokenizer import Tokenizer

MAX_DRAFT = 8


@dataclass
class SpecStats:
    proposed: int = 0
    accepted: int = 0
    target_forwards: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def _probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """(N, V) logits -> the (N, V) distribution sample_next draws from (temperature, top-k, top-p)."""
    logits = logits.float()
    if cfg.logit_bias:
        ids = torch.tensor(list(cfg.logit_bias), device=logits.device)
        logits = logits.index_add(1, ids, torch.tensor(list(cfg.logit_bias.values()), device=logits.device)[None]
                                  .expand(logits.shape[0], -1).float())
    if cfg.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = top_p_filter(top_k_filter(logits / max(cfg.temperature, 1e-6), cfg.top_k), cfg.top_p)
    return logits.softmax(-1)


def check_speculative(cfg: SamplingConfig) -> None:
    """What speculative decoding does not combine with (the penalties depend on every drafted token)."""
    for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
        if getattr(cfg, name) != SamplingConfig.__dataclass_fields__[name].default:
            raise UserError(f"--draft does not combine with {name}: leave it at its default")
    if cfg.grammar is not None or cfg.min_tokens or cfg.logprobs is not None:
        raise UserError("--draft does not combine with a grammar, min_tokens or logprobs")


class NgramDraft:
    """Prompt lookup: propose what followed the latest earlier occurrence of the context's last n tokens."""

    def __init__(self, max_n: int = 3):
        self.max_n = max_n

    def propose(self, ids: list[int], k: int) -> tuple[list[int], None]:
        for n in range(min(self.max_n, len(ids) - 1), 0, -1):
            tail = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start:start + n] == tail:
                    follow = ids[start + n:start + n + k]
                    if follow:
                        return follow, None
        return [], None


class ModelDraft:
    """A smaller model with the target's tokenizer, decoding with its own KV cache."""

    def __init__(self, model: GPT, cfg: SamplingConfig, generator: torch.Generator | None, max_len: int):
        self.model, self.cfg, self.generator = model, cfg, generator
        self.device = model.lm_head.weight.device
        self.cache = model.new_cache(1, max_len)
        self.cached: list[int] = []  # tokens whose K/V the cache holds

    def _forward(self, ids: list[int]) -> torch.Tensor:
        """Logits after `ids` (feeding what the cache lacks), (V,)."""
        n = 0
        while n < min(len(self.cached), len(ids) - 1) and self.cached[n] == ids[n]:
            n += 1
        new = ids[n:]
        pos = torch.arange(n, len(ids), device=self.device)
        logits = self.model(torch.tensor([new], device=self.device), input_pos=pos, kv_caches=self.cache,
                            logits_at="last")[0]
        self.cached = list(ids)
        return logits

    def propose(self, ids: list[int], k: int) -> tuple[list[int], torch.Tensor]:
        tokens, qs, ctx = [], [], list(ids)
        for _ in range(k):
            q = _probs(self._forward(ctx)[None], self.cfg)[0]
            t = int(q.argmax()) if self.cfg.temperature == 0 else int(torch.multinomial(q, 1, generator=self.generator))
            tokens.append(t), qs.append(q)
            ctx.append(t)
        return tokens, torch.stack(qs)


def speculative_generate(target: GPT, tokenizer: Tokenizer, prompt_ids: list[int], cfg: SamplingConfig,
                         draft: GPT | str, k: int = 4):
    """Yield the completion's text pieces; returns (by StopIteration.value) (Completion, SpecStats).
    `draft`: a GPT with the same tokenizer, or "ngram" (prompt lookup)."""
    check_speculative(cfg)
    prompt_ids = list(prompt_ids) or [tokenizer.eos_id]
    context = target.config.block_size
    check_context(len(prompt_ids), cfg.max_new_tokens, context)
    device = target.lm_head.weight.device
    completion = Completion(prompt_ids, cfg, tokenizer)
    completion._start(device, target.config.vocab_size)
    gen = completion._generator
    max_len = len(prompt_ids) + cfg.max_new_tokens + MAX_DRAFT + 1
    if isinstance(draft, GPT):
        if draft.config.vocab_size != target.config.vocab_size:
            raise UserError("--draft must have the target's tokenizer (its vocabulary differs)")
        if draft.config.block_size < min(max_len, context):
            raise UserError(f"--draft's context ({draft.config.block_size}) is shorter than this completion needs")
        drafter = ModelDraft(draft, cfg, gen, min(max_len, draft.config.block_size))
    elif draft == "ngram":
        drafter = NgramDraft()
    else:
        raise UserError(f"--draft must be a model or 'ngram', not {draft!r}")
    cache = target.new_cache(1, min(max_len, context))
    ids, cached, stats = list(prompt_ids), 0, SpecStats()
    while not completion.finished:
        room = min(k, cfg.max_new_tokens - completion.completion_tokens - 1, context - len(ids) - 1)
        proposal, q = drafter.propose(ids, room) if room > 0 else ([], None)
        feed = ids[cached:] + proposal  # what the target's cache lacks, then the drafted tokens
        pos = torch.arange(cached, cached + len(feed), device=device)
        logits = target(torch.tensor([feed], device=device), input_pos=pos, kv_caches=cache)[0]
        stats.target_forwards += 1
        p = _probs(logits[len(feed) - len(proposal) - 1:], cfg)  # (len(proposal) + 1, V)
        accepted = _verify(proposal, q, p, cfg, gen)
        stats.proposed += len(proposal)
        stats.accepted += len(accepted) - 1
        cached = len(ids) + len(accepted) - 1  # the last accepted token is fed next round
        for t in accepted:
            piece = completion.push(t)
            ids.append(t)
            if piece:
                yield piece
            if completion.finished:
                break
        k = min(MAX_DRAFT, k + 1) if proposal and len(accepted) > len(proposal) else max(1, k - (len(accepted) == 1))
    return completion, stats


def _verify(proposal: list[int], q: torch.Tensor | None, p: torch.Tensor, cfg: SamplingConfig, gen) -> list[int]:
    """The accepted drafted tokens and one more from the target (a correction, or the bonus token)."""
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


def speculative_complete(target: GPT, tokenizer: Tokenizer, prompt_ids: list[int], cfg: SamplingConfig,
                         draft: GPT | str, k: int = 4) -> tuple[Completion, SpecStats]:
    """speculative_generate to the end: (Completion, SpecStats)."""
    pieces = speculative_generate(target, tokenizer, prompt_ids, cfg, draft, k)
    while True:
        try:
            next(pieces)
        except StopIteration as done:
            return done.value
