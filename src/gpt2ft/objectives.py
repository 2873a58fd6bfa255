"""What differs between training verbs: the data and the loss. The loop in train.py does the rest.

An objective has `train` and `val` datasets (len() and batch(indices) -> dict of tensors), counts the
units its loss is averaged over (`count`), returns the summed loss of a batch (`loss_sum`), and may
add metrics at evaluation time (`evaluate`).
"""
from __future__ import annotations

import torch

from .losses import IGNORE, masked_lm_loss_sum


class Objective:
    name = "lm"
    unit = "tokens"
    sample_prompts: list[str] = []
    weights: torch.Tensor | None = None  # per-example sampling weights (None: uniform)

    def count(self, batch: dict) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def tokens(self, batch: dict) -> int:
        """Tokens processed (for tokens/s), whether supervised or not."""
        return int(batch["input_ids"].numel())

    def loss_sum(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        return masked_lm_loss_sum(model, batch["input_ids"], batch["labels"], batch.get("attention_mask"))

    def evaluate(self, model, tokenizer, step: int) -> dict:
        return {}


class LanguageModeling(Objective):
    """Next-token prediction on every position of fixed-length blocks (pretraining, raw-text fine-tuning)."""

    def __init__(self, train, val, sample_prompts: list[str] | None = None):
        self.train, self.val = train, val
        self.sample_prompts = sample_prompts or []

    def count(self, batch: dict) -> int:
        return int(batch["labels"].numel())
