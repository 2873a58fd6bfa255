"""What differs between training verbs: the data and the loss. The loop in train/ does the rest.

The contract (`Objective`) is small and explicit: the datasets (`train`, `val`: len() and
batch(indices) -> dict), the `fingerprint` that resume checks, the `unit` its loss is averaged over
and `count(batch)` of them, `setup()` for anything it holds besides the model (a reference model),
`loss(model, batch) -> (summed loss, dict of summed metrics)`, `evaluate()` for extra scores (and
`eval_samples()`, what it generated, for the console), and the metric that picks `best/`. Sums, not
means, so accumulation over micro-batches and ranks is exact.
"""
from __future__ import annotations

import hashlib
import json

import torch

from .errors import UserError
from .losses import IGNORE, masked_lm_loss_sum


def prompt_cut_warning(cut: int, total: int, max_length: int) -> str:
    """A line for the data report when prompts filled the sequence length: each such example keeps only its
    prompt's last tokens and one answer token, which trains little and reads the answer out of context."""
    if not cut:
        return ""
    return (f"\nwarning: {cut} of {total} examples' prompts fill --max-length {max_length}: each keeps only its "
            "prompt's last tokens and 1 answer token (the start of the prompt and the template's header are cut); "
            "raise --max-length (up to the model's context) or shorten those inputs")


class Objective:
    name = "lm"  # the run's kind: pretrain, finetune, sft, dpo
    unit = "tokens"  # what count() counts
    train = None  # dataset: len(ds), ds.batch(indices) -> dict of tensors (and plain values)
    val = None
    fingerprint = ""  # identity of the training data (a resume key)
    weights: torch.Tensor | None = None  # per-example sampling weights (None: uniform)
    sample_prompts: list[str] = []  # generated from at each evaluation
    best_metric = "val_loss"  # the evaluation record's key that picks best/ and drives --patience
    best_mode = "min"  # or "max"
    loss_is_nll = True  # the loss is a mean negative log-likelihood, so exp(loss) is a perplexity

    def setup(self, model, strategy) -> None:
        """Called once the model is on its device (strategy: train.strategy's, with .device, .dtype and
        .place_frozen): move or build what the objective holds."""

    def count(self, batch: dict) -> int:
        """Units in the batch; the loop divides the summed loss by the global count."""
        raise NotImplementedError

    def tokens(self, batch: dict) -> int:
        """Tokens processed (for tokens/s), whether supervised or not."""
        return int(batch["input_ids"].numel())

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """(summed loss over the batch's units, summed metrics). `model` may be wrapped (DDP, compile)."""
        raise NotImplementedError

    def evaluate(self, model, tokenizer, step: int) -> dict:
        """Extra scores at evaluation time (main process), e.g. generation metrics."""
        return {}

    def eval_samples(self) -> list[dict]:
        """What the last evaluate() generated ({"prompt", "output", "reference"}), for the console."""
        return []


class MaskedLM(Objective):
    """Next-token cross-entropy on the positions whose label is not -100."""

    def count(self, batch: dict) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def loss(self, model, batch: dict):
        loss, _ = masked_lm_loss_sum(model, batch)
        return loss, {}


class LanguageModeling(MaskedLM):
    """Next-token prediction on every position of fixed-length blocks (pretraining, raw-text fine-tuning)."""

    def __init__(self, train, val, sample_prompts: list[str] | None = None, name: str = "lm", fingerprint: str = ""):
        self.train, self.val, self.name, self.fingerprint = train, val, name, fingerprint
        self.sample_prompts = sample_prompts or []

    def count(self, batch: dict) -> int:
        return int(batch["labels"].numel())

    @classmethod
    def from_prepared(cls, data_dir, meta: dict, length: int, tokenizer, sample_prompts: list[str] | None,
                      name: str = "lm"):
        """Blocks of `length` tokens from a `gpt2ft prepare` folder; samples open with the val text by default."""
        from pathlib import Path

        from .data.text import TokenBlocks

        vocab = meta["tokenizer"].get("vocab_size")
        val = TokenBlocks(Path(data_dir) / "val.bin", meta["dtype"], length, meta.get("val_tokens"), vocab)
        train = TokenBlocks(Path(data_dir) / "train.bin", meta["dtype"], length, meta.get("train_tokens"), vocab)
        return cls(train, val, sample_prompts or val.sample_prompt(tokenizer), name, meta["fingerprint"])


class InstructionTuning(MaskedLM):
    """SFT: loss on response tokens (and their EOS) only; validation also generates and scores."""

    name = "sft"

    def __init__(self, train_records, val_records, tokenizer, template, max_length: int,
                 train_on_prompt: bool = False, packing: bool = False, oversample=(None, 1.0),
                 eval_examples: int = 32, eval_max_new_tokens: int = 64, keywords: list[str] | None = None):
        from .data.sft import InstructionDataset, build_examples

        self.template, self.keywords, self.samples, self.warned = template, keywords or [], [], False
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
        self.report += prompt_cut_warning(counts["prompt truncated"], len(train_records) + len(val_records), max_length)

    def tokens(self, batch: dict) -> int:
        return batch["n_tokens"]

    def eval_samples(self) -> list[dict]:
        return self.samples

    def evaluate(self, model, tokenizer, step: int) -> dict:
        import sys

        from .evaluate import evaluate_records
        from .generation import SamplingConfig

        if not self.val_records:
            return {}
        # each prompt gets what its context leaves (up to --eval-max-new-tokens): a long one cuts its own reply,
        # not every record's; an evaluation never ends a run, so none that fits is a note, not an error
        sampling = SamplingConfig(max_new_tokens=self.eval_max_new_tokens, temperature=0.0,
                                  template_stop=list(self.template.stop))
        try:
            rows, summary = evaluate_records(model, tokenizer, self.val_records, self.template, sampling,
                                             self.keywords, shrink=True, flag="--eval-max-new-tokens")
        except UserError as e:
            if not self.warned:
                print(f"note: generation scores skipped: {e} (--eval-examples 0 turns them off)", file=sys.stderr)
                self.warned = True
            return {}
        asked = {r.where: [m["content"] for m in r.messages[:-1] if m["role"] == "user"][-1]  # not the template
                 for r in self.val_records}
        self.samples = [{"prompt": asked.get(r["where"], r["prompt"]), "output": r["output"],
                         "reference": r["reference"]} for r in rows]
        return {k: v for k, v in summary.items() if k in ("exact_match", "bleu", "rouge1", "rouge2", "rougeL",
                                                          "keyword_rate", "length_ratio")}
