"""Losses as small pure functions. Each returns a SUM over its units (tokens, pairs) so the training
loop can divide by the global count and accumulate exactly per token."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def supervised_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next-token label is trained (labels != -100)."""
    return labels != IGNORE


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of (N, V) logits against (N,) targets, computed in float32."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def masked_lm_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """(summed loss, supervised token count) of a batch with input_ids and labels (and optionally
    position_ids / attention_mask); logits are computed only where labels are supervised."""
    labels = batch["labels"]
    mask = supervised_mask(labels)
    n = int(mask.sum())
    extra = {k: batch[k] for k in ("position_ids", "attention_mask") if k in batch}
    if bool(mask.all()):
        logits = model(batch["input_ids"], **extra)
        return cross_entropy_sum(logits.flatten(0, 1), labels.flatten()), n
    logits = model(batch["input_ids"], logits_at=mask, **extra)
    return cross_entropy_sum(logits, labels[mask]), n


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(target) over masked positions of each row: (B, T, V), (B, T), (B, T) -> (B,)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)
