"""Losses as small pure functions. Each returns a SUM over its units (tokens, pairs) so the training
loop can divide by the global count and accumulate exactly per token."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = -100


def perplexity(mean_nll: float) -> float:
    """exp of a mean negative log-likelihood, capped so a diverged model reports a number, not inf."""
    return math.exp(min(mean_nll, 50))


def supervised_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next-token label is trained (labels != -100)."""
    return labels != IGNORE


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of (N, V) logits against (N,) targets, computed in float32."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight^T, target_i), computed chunk by chunk so the (N, V) logits are never
    held whole. The gradients are formed in the forward pass (softmax - one_hot is all backward needs),
    so there is no recomputation; the weight's gradient is skipped when it is frozen (LoRA)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        grads = torch.is_grad_enabled() or any(ctx.needs_input_grad[:2])
        need_h = ctx.needs_input_grad[0] and grads
        need_w = ctx.needs_input_grad[1] and grads
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None
        for start in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
            rows = torch.arange(len(t), device=h.device)
            z = (h @ weight.t()).float()  # (n, V) logits; every step below works in place on them
            z.sub_(z.amax(dim=-1, keepdim=True))
            target_z = z[rows, t]
            z.exp_()
            total = z.sum(dim=-1)
            loss += (total.log() - target_z).sum()  # logsumexp - target logit, both shifted by the max
            if need_h or need_w:
                g = z.div_(total[:, None])  # softmax
                g[rows, t] -= 1.0  # d loss / d logits
                g = g.to(h.dtype)
                if need_h:
                    grad_h[start:start + chunk_size] = g @ weight.to(h.dtype)
                if need_w:
                    part = g.t().float() @ h.float()
                    grad_w = part if grad_w is None else grad_w.add_(part)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors  # used once: scale them in place
        dh = grad_h.mul_(grad_loss.to(grad_h.dtype)) if grad_h is not None else None
        dw = grad_w.mul_(grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk_size: int = 1024) -> torch.Tensor:
    """Summed cross-entropy of the logits hidden @ weight^T (N, V) against targets (N,), float32 math."""
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size)


def unwrap(model):
    """The GPT inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def masked_lm_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """(summed loss, supervised token count) of a batch with input_ids and labels (and optionally
    position_ids / attention_mask). Only supervised positions reach the vocabulary projection, and
    the logits are never materialised whole (see _LinearCrossEntropy)."""
    labels = batch["labels"]
    mask = supervised_mask(labels)
    extra = {k: batch[k] for k in ("position_ids", "attention_mask") if k in batch}
    hidden = model(batch["input_ids"], logits_at=mask, hidden_only=True, **extra)  # (N, C)
    return linear_cross_entropy_sum(hidden, unwrap(model).lm_head.weight, labels[mask]), int(mask.sum())


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(target) over masked positions of each row: (B, T, V), (B, T), (B, T) -> (B,)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)
