"""Losses as small pure functions. Each returns a SUM over its units (tokens, pairs) so the training
loop can divide by the global count and accumulate exactly per token."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .preference_losses import OPTION_DEFAULTS, PREFERENCE_LOSSES

IGNORE = -100


def perplexity(mean_nll: float) -> float:
    """exp of a mean negative log-likelihood, capped so a diverged model reports a number, not inf."""
    return math.exp(min(mean_nll, 50))


def supervised_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next-token label is trained (labels != -100)."""
    return labels != IGNORE


def _ce_chunk(h, weight, t, want_grad: bool):
    """Per-row CE (float32) of the logits h @ weight^T against t, and (if want_grad) d CE / d logits =
    softmax - one_hot, in h's dtype (weight is already in it), with no float32 (n, V) buffer.

    The softmax is one fused kernel (float32 inside, rounded once to h's dtype). A row whose target
    holds p >= 1/2 takes its loss and target gradient from rest = the sum of the other probabilities
    (-log1p(-rest) and -rest), so a confident row keeps its small loss and gradient to 2^-8 relative;
    any other row takes the log-sum-exp as max logit - log(largest probability), within 2^-9 (0.002
    nats in bf16; exact in float32)."""
    rows = torch.arange(len(t), device=h.device)
    z = _logits(h, weight)  # (n, V)
    top = z.amax(dim=-1).float()
    target = z[rows, t].float()
    p = torch.softmax(z, dim=-1)
    del z
    p_t = p[rows, t].float()
    p[rows, t] = 0
    rest = p.sum(dim=-1).float()  # float32 accumulation inside, one rounding
    p_top = torch.maximum(p.amax(dim=-1).float(), p_t)
    confident = p_t >= 0.5
    row_loss = torch.where(confident, -torch.log1p(-rest.clamp(max=0.5)), top - p_top.log() - target)
    if not want_grad:
        return row_loss, None
    p[rows, t] = torch.where(confident, -rest, p_t - 1).to(p.dtype)  # softmax - 1 at the target
    return row_loss, p


# A CPU multiplies the (n, V) bf16 products fastest in slices that stay in its caches. Measured on one
# AVX512-BF16 core, GPT-2 124M at n = 1024 rows: the logits 280 -> 227 ms in 256-row slices; the weight's
# gradient 354 -> 233 ms and the hidden states' 276 -> 246 ms in 8192-token slices of the vocabulary.
ROWS_PER_SLICE, VOCAB_PER_SLICE = 256, 8192


def _sliced(x: torch.Tensor) -> bool:
    """Whether the vocabulary products run in slices: bf16 on a CPU (float32 and GPUs: one product each)."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16


def _logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h @ weight^T (n, V), in row slices where _sliced."""
    if not _sliced(h) or len(h) <= ROWS_PER_SLICE:
        return h @ weight.t()
    z = h.new_empty(len(h), weight.shape[0])
    for start in range(0, len(h), ROWS_PER_SLICE):
        torch.mm(h[start:start + ROWS_PER_SLICE], weight.t(), out=z[start:start + ROWS_PER_SLICE])
    return z


def _hidden_grad(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """g @ weight (n, C); where _sliced, summed in float32 over slices of the vocabulary."""
    if not _sliced(g) or weight.shape[0] <= VOCAB_PER_SLICE:
        return g @ weight
    out = None
    for start in range(0, weight.shape[0], VOCAB_PER_SLICE):
        part = g[:, start:start + VOCAB_PER_SLICE] @ weight[start:start + VOCAB_PER_SLICE]
        out = part.float() if out is None else out.add_(part)
    return out


def _add_weight_grad(grad_w: torch.Tensor | None, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """grad_w (V, C, float32) + g^T h, or g^T h in float32 where grad_w is None; where _sliced, one
    vocabulary slice at a time (each element still one product in the compute dtype)."""
    if not _sliced(g) or g.shape[1] <= VOCAB_PER_SLICE:
        step = g.t() @ h  # (V, C) in the compute dtype
        return step.float() if grad_w is None else grad_w.add_(step)
    fresh = grad_w is None
    if fresh:
        grad_w = torch.empty(g.shape[1], h.shape[1], dtype=torch.float32, device=h.device)
    for start in range(0, g.shape[1], VOCAB_PER_SLICE):
        part = slice(start, start + VOCAB_PER_SLICE)
        step = g[:, part].t() @ h
        grad_w[part].copy_(step) if fresh else grad_w[part].add_(step)
    return grad_w


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the vocabulary projection runs in: autocast's, where it is on, else the hidden states'."""
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight^T, target_i), computed chunk by chunk so the (N, V) logits are never
    held whole. The gradients are formed in the forward pass (softmax - one_hot is all backward needs),
    so there is no recomputation; the weight's gradient is skipped when it is frozen (LoRA).

    Under autocast (or with bf16 hidden states) every (n, V) step runs in that dtype: the matrix
    products, the softmax and the gradient; only per-row values, the loss and the sum of the weight's
    gradient over chunks are float32 (each chunk's part is one low-precision product, as for any
    autocast linear).

    With `segments` (N,) of sequence ids in [0, n_segments), it returns one sum per sequence (S,) instead.
    Each row's gradient is then scaled by its sequence's incoming gradient, known only in backward:
    the hidden-state gradient is still formed in the forward pass and scaled per row, while the weight's
    gradient (a sum over rows) is recomputed chunk by chunk in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, segments=None, n_segments=1):
        grads = torch.is_grad_enabled() or any(ctx.needs_input_grad[:2])
        need_h = ctx.needs_input_grad[0] and grads
        need_w = ctx.needs_input_grad[1] and grads
        per_seq = segments is not None
        dtype = _compute_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            hid, w = hidden.to(dtype), weight.to(dtype)  # once, not per chunk
            loss = torch.zeros(n_segments if per_seq else (), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = None
            for start in range(0, hidden.shape[0], chunk_size):
                part = slice(start, start + chunk_size)
                h, t = hid[part], targets[part]
                row_loss, g = _ce_chunk(h, w, t, need_h or (need_w and not per_seq))
                if per_seq:
                    loss.index_add_(0, segments[part], row_loss)
                else:
                    loss += row_loss.sum()
                if g is not None:
                    if need_h:
                        grad_h[part] = _hidden_grad(g, w)
                    if need_w and not per_seq:
                        grad_w = _add_weight_grad(grad_w, g, h)
        ctx.per_seq, ctx.chunk_size, ctx.weight_dtype = per_seq, chunk_size, weight.dtype
        ctx.recompute_w = per_seq and need_w
        kept = (hid, w, targets) if ctx.recompute_w else (None, None, None)
        ctx.save_for_backward(grad_h, grad_w, segments, *kept)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, segments, hidden, weight, targets = ctx.saved_tensors  # used once: scaled in place
        if not ctx.per_seq:
            dh = grad_h.mul_(grad_loss.to(grad_h.dtype)) if grad_h is not None else None
            dw = grad_w.mul_(grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
            return dh, dw, None, None, None, None
        dh = dw = None
        if grad_h is not None:
            dh = grad_h.mul_(grad_loss[segments].to(grad_h.dtype)[:, None])
        if ctx.recompute_w:  # hidden and weight were kept in the compute dtype
            dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                part = slice(start, start + ctx.chunk_size)
                h = hidden[part]
                _, g = _ce_chunk(h, weight, targets[part], True)
                g.mul_(grad_loss[segments[part]][:, None].to(g.dtype))
                dw = _add_weight_grad(dw, g, h)
            dw = dw.to(ctx.weight_dtype)
        return dh, dw, None, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk_size: int = 1024) -> torch.Tensor:
    """Summed cross-entropy (float32) of the logits hidden @ weight^T (N, V) against targets (N,); the (n, V)
    work runs in autocast's dtype where autocast is on (see _LinearCrossEntropy)."""
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size)


def linear_cross_entropy_per_sequence(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                      segments: torch.Tensor, n_segments: int, chunk_size: int = 1024) -> torch.Tensor:
    """(S,) summed cross-entropy per sequence: row i of hidden/targets belongs to sequence segments[i]."""
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, segments, n_segments)


def unwrap(model):
    """The GPT inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def _lm_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("position_ids", "attention_mask") if k in batch}


def masked_lm_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """(summed loss, supervised token count) of a batch with input_ids and labels (and optionally
    position_ids / attention_mask). The loss runs inside the model's forward (so inside any wrapper,
    DDP or FSDP): only supervised positions reach the vocabulary projection, and the logits are never
    materialised whole (see _LinearCrossEntropy)."""
    labels = batch["labels"]
    loss = model(batch["input_ids"], targets=labels, reduction="sum", **_lm_inputs(batch))
    return loss, int(supervised_mask(labels).sum())


# ----- preference losses ------------------------------------------------------------------------
def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(label) over each row's supervised positions (R,), their count (R,)) in one forward
    pass of the model (inside any wrapper); only supervised positions reach the vocabulary projection,
    chunk by chunk (no full logits)."""
    labels = batch["labels"]
    nll = model(batch["input_ids"], targets=labels, reduction="per_sequence", **_lm_inputs(batch))
    return -nll, supervised_mask(labels).sum(-1)


class PairLogps(NamedTuple):
    """Per-sequence log-probs (summed over response tokens) of a batch of pairs, each (B,): the policy's,
    the response lengths, and (unless reference-free) the reference's."""
    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    @property
    def averages(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token average log-probs (chosen, rejected)."""
        return self.chosen / self.chosen_len.clamp(min=1), self.rejected / self.rejected_len.clamp(min=1)

    @property
    def ratios(self) -> tuple[torch.Tensor, torch.Tensor]:
        """log p - log p_ref of (chosen, rejected)."""
        return self.chosen - self.ref_chosen, self.rejected - self.ref_rejected


def sigmoid_loss(delta: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290); label_smoothing > 0 is cDPO (Mitchell 2023): the
    preference label is taken as flipped with that probability. delta = chosen - rejected log-ratio."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def robust_loss(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409): unbiased under label noise of rate label_smoothing."""
    return (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
            + label_smoothing * F.logsigmoid(-beta * delta)) / (1 - 2 * label_smoothing)


def hinge_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC-HF hinge (Zhao et al. 2023, arXiv:2305.10425) on the log-ratio difference."""
    return torch.relu(1 - beta * delta)


def ipo_loss(delta_per_token: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17) with tau = beta, on log-ratios averaged per token
    (the length normalisation the authors and TRL use)."""
    return (delta_per_token - 1 / (2 * beta)) ** 2


def simpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimPO (Meng et al. 2024, arXiv:2405.14734): reference-free, on per-token average log-probs, margin gamma."""
    return -F.logsigmoid(beta * (chosen_avg - rejected_avg) - gamma)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def odds_ratio_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor) -> torch.Tensor:
    """ORPO's odds-ratio term (Hong et al. 2024, arXiv:2403.07691, eqs. 4-7): -log sigmoid(log odds(chosen)
    - log odds(rejected)), with odds(y) = p / (1 - p) and p the per-token average probability."""
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    return -F.logsigmoid(log_odds)


# ----- the registry's functions: a batch of pairs -> (per-pair loss, chosen reward, rejected reward) -----
IMPLEMENTATIONS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}


def implements(name: str):
    """Register the pure function of the declared loss `name` (gpt2ft.preference_losses.PREFERENCE_LOSSES)."""
    def register(fn):
        IMPLEMENTATIONS[name] = fn
        return fn
    return register


def _with_ratio_rewards(loss: torch.Tensor, p: PairLogps, beta: float):
    chosen_ratio, rejected_ratio = p.ratios
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


@implements("sigmoid")
def _sigmoid(p: PairLogps, beta: float, label_smoothing: float):
    chosen_ratio, rejected_ratio = p.ratios
    return _with_ratio_rewards(sigmoid_loss(chosen_ratio - rejected_ratio, beta, label_smoothing), p, beta)


@implements("robust")
def _robust(p: PairLogps, beta: float, label_smoothing: float):
    chosen_ratio, rejected_ratio = p.ratios
    return _with_ratio_rewards(robust_loss(chosen_ratio - rejected_ratio, beta, label_smoothing), p, beta)


@implements("hinge")
def _hinge(p: PairLogps, beta: float):
    chosen_ratio, rejected_ratio = p.ratios
    return _with_ratio_rewards(hinge_loss(chosen_ratio - rejected_ratio, beta), p, beta)


@implements("ipo")
def _ipo(p: PairLogps, beta: float):
    chosen_ratio, rejected_ratio = p.ratios
    per_token = chosen_ratio / p.chosen_len.clamp(min=1) - rejected_ratio / p.rejected_len.clamp(min=1)
    return _with_ratio_rewards(ipo_loss(per_token, beta), p, beta)


@implements("simpo")
def _simpo(p: PairLogps, beta: float, gamma: float):
    chosen_avg, rejected_avg = p.averages
    return simpo_loss(chosen_avg, rejected_avg, beta, gamma), beta * chosen_avg.detach(), beta * rejected_avg.detach()


@implements("orpo")
def _orpo(p: PairLogps, lam: float):
    chosen_avg, rejected_avg = p.averages  # the chosen answer's NLL plus lam x the odds-ratio term
    loss = -chosen_avg + lam * odds_ratio_loss(chosen_avg, rejected_avg)
    return loss, lam * chosen_avg.detach(), lam * rejected_avg.detach()


def preference_loss(kind: str, chosen: torch.Tensor, rejected: torch.Tensor, chosen_len: torch.Tensor,
                    rejected_len: torch.Tensor, ref_chosen: torch.Tensor | None = None,
                    ref_rejected: torch.Tensor | None = None, sft_weight: float = 0.0,
                    **params: float) -> dict[str, torch.Tensor]:
    """Per-pair loss and implicit rewards of the registered loss `kind` from per-sequence log-probs (summed
    over response tokens) of the policy (and, unless reference-free, the reference), each (B,). `params`:
    the loss's options (PreferenceLoss.params; others are ignored). Returns {"loss", "chosen_reward",
    "rejected_reward"}, all (B,). sft_weight adds the chosen response's per-token NLL (RPO: Pang et al. 2024,
    arXiv:2404.19733)."""
    entry = PREFERENCE_LOSSES.get(kind)
    if entry is None:
        raise ValueError(f"unknown preference loss {kind!r}; one of {', '.join(PREFERENCE_LOSSES)}")
    p = PairLogps(chosen, rejected, chosen_len, rejected_len, ref_chosen, ref_rejected)
    if entry.needs_reference and (ref_chosen is None or ref_rejected is None):
        raise ValueError(f"the {kind} loss needs reference log-probs")
    defaults = {"beta": entry.default_beta, **OPTION_DEFAULTS}
    options = {k: params.get(k, defaults[k]) for k in entry.params}
    loss, chosen_reward, rejected_reward = IMPLEMENTATIONS[kind](p, **options)
    if sft_weight:
        loss = loss + sft_weight * -p.averages[0]
    return {"loss": loss, "chosen_reward": chosen_reward, "rejected_reward": rejected_reward}
