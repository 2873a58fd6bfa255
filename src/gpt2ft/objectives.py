"""What differs between training verbs: the data and the loss. The loop in train.py does the rest.

An objective has `train` and `val` datasets (len() and batch(indices) -> dict of tensors), counts the
units its loss is averaged over (`count`), returns the summed loss of a batch (`loss_sum`), and may
add metrics at evaluation time (`evaluate`).
"""
from __future__ import annotations

import hashlib
import json

import torch

from .errors import UserError
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
        return masked_lm_loss_sum(model, batch)

    def evaluate(self, model, tokenizer, step: int) -> dict:
        return {}


class LanguageModeling(Objective):
    """Next-token prediction on every position of fixed-length blocks (pretraining, raw-text fine-tuning)."""

    def __init__(self, train, val, sample_prompts: list[str] | None = None):
        self.train, self.val = train, val
        self.sample_prompts = sample_prompts or []

    def count(self, batch: dict) -> int:
        return int(batch["labels"].numel())

    @classmethod
    def from_prepared(cls, data_dir, meta: dict, length: int, tokenizer, sample_prompts: list[str] | None):
        """Blocks of `length` tokens from a `gpt2ft prepare` folder; samples open with the val text by default."""
        from pathlib import Path

        from .data.text import TokenBlocks

        val = TokenBlocks(Path(data_dir) / "val.bin", meta["dtype"], length)
        return cls(TokenBlocks(Path(data_dir) / "train.bin", meta["dtype"], length), val,
                   sample_prompts or val.sample_prompt(tokenizer))


class InstructionTuning(Objective):
    """SFT: loss on response tokens (and their EOS) only; validation also generates and scores."""

    name = "sft"

    def __init__(self, train_records, val_records, tokenizer, template, max_length: int,
                 train_on_prompt: bool = False, packing: bool = False, oversample=(None, 1.0),
                 eval_examples: int = 32, eval_max_new_tokens: int = 64, keywords: list[str] | None = None):
        from .data.sft import InstructionDataset, build_examples

        self.template, self.keywords = template, keywords or []
        self.val_records = val_records[:eval_examples]
        self.eval_max_new_tokens = eval_max_new_tokens
        train_examples, weights, counts = build_examples(train_records, template, tokenizer, max_length,
                                                         train_on_prompt, oversample)
        val_examples, _, _ = build_examples(val_records, template, tokenizer, max_length, train_on_prompt)
        self.train = InstructionDataset(train_examples, tokenizer.eos_id, max_length if packing else None)
        self.val = InstructionDataset(val_examples, tokenizer.eos_id)
        if packing and len(set(weights)) > 1:
            raise UserError("--packing cannot be combined with per-record weights or --oversample-keyword "
                            "(packed rows are sampled uniformly)")
        self.weights = torch.tensor(weights, dtype=torch.float64) if weights and len(set(weights)) > 1 else None
        digest = hashlib.sha256(json.dumps([e.ids for e in train_examples]).encode())
        self.fingerprint = digest.hexdigest()[:16]
        self.report = (f"SFT data: {len(train_examples)} train / {len(val_examples)} val examples"
                       f"{' packed into ' + str(len(self.train)) + ' rows' if packing else ''}; "
                       f"{counts['response truncated']} responses and {counts['prompt truncated']} prompts "
                       f"truncated to {max_length} tokens, {counts['no supervised token']} dropped")

    def tokens(self, batch: dict) -> int:
        return batch["n_tokens"]

    def evaluate(self, model, tokenizer, step: int) -> dict:
        from .evaluate import evaluate_records
        from .generation import SamplingConfig

        if not self.val_records:
            return {}
        sampling = SamplingConfig(max_new_tokens=self.eval_max_new_tokens, temperature=0.0,
                                  stop=list(self.template.stop))
        _, summary = evaluate_records(model, tokenizer, self.val_records, self.template, sampling, self.keywords)
        return {k: v for k, v in summary.items() if k in ("exact_match", "bleu", "rouge1", "rouge2", "rougeL",
                                                          "keyword_rate", "length_ratio")}
