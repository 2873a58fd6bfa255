"""The objective protocol: a toy objective with its own unit, metric and best-metric plugs into the one
loop; its metric reaches metrics.jsonl as train_/val_ averages; setup() runs once on the device;
distributed sums are reduced on the training device."""
from __future__ import annotations

import json
from unittest import mock

import torch

from gpt2ft.config import GPTConfig
from gpt2ft.losses import masked_lm_loss_sum
from gpt2ft.model import GPT
from gpt2ft.objectives import Objective
from gpt2ft.tokenizer import WordTokenizer
from gpt2ft.train import TrainConfig, train
from gpt2ft.train.strategy import DDP


class Rows:
    """Fixed random sequences: each is one unit ("sequences")."""

    def __init__(self, n, length=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, 50, (n, length + 1), generator=g)

    def __len__(self):
        return len(self.data)

    def batch(self, indices):
        rows = self.data[list(indices)]
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}


class PerSequence(Objective):
    """Loss averaged per sequence, with a metric: how many sequences start with an even token."""

    name, unit, best_metric, best_mode = "toy", "sequences", "val_even_share", "max"

    def __init__(self):
        self.train, self.val, self.fingerprint = Rows(24), Rows(8, seed=1), "toy"
        self.setup_calls = []

    def setup(self, model, strategy):
        self.setup_calls.append((strategy.device.type, strategy.dtype))

    def count(self, batch):
        return batch["input_ids"].shape[0]

    def loss(self, model, batch):
        loss, tokens = masked_lm_loss_sum(model, batch)
        per_sequence = loss / batch["input_ids"].shape[1]  # summed over sequences of the mean per token
        even = float((batch["input_ids"][:, 0] % 2 == 0).sum())
        return per_sequence, {"even_share": even, "tokens": float(tokens)}


def test_a_toy_objective_plugs_into_the_loop_and_its_metric_reaches_metrics_jsonl(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50))
    objective = PerSequence()
    cfg = TrainConfig(out=str(tmp_path / "run"), max_steps=4, batch_size=3, grad_accum=2, device="cpu",
                      progress=False, eval_every=2, eval_batches=2, warmup_steps=0, log_every=1, lr=1e-2)
    train(model, WordTokenizer.train(["a b"], 10), objective, cfg, {}, {})
    assert objective.setup_calls == [("cpu", torch.float32)]
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stepped = [r for r in rows if "train_loss" in r]
    # train_even_share = even sequences / sequences of the step's global batch (6), exactly
    data = objective.train.data
    for r in stepped:
        assert 0 <= r["train_even_share"] <= 1 and (r["train_even_share"] * 6) % 1 == 0
        assert abs(r["train_tokens"] - 16) < 1e-9  # summed tokens / sequences
    evens = float((objective.val.data[:6, 0] % 2 == 0).sum()) / 6  # eval_batches * batch_size = 6 rows
    evaluated = [r for r in rows if "val_even_share" in r]
    assert evaluated and all(abs(r["val_even_share"] - evens) < 1e-9 for r in evaluated)
    assert len(data) == 24
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "objective" not in config or "toy" in config
    assert (tmp_path / "run" / "best").exists()


def test_distributed_sums_on_the_training_device():
    """NCCL refuses CPU tensors: the all-reduced tensor must live on the training device."""
    seen = []
    with mock.patch.dict("os.environ", {"WORLD_SIZE": "2", "RANK": "0"}), \
            mock.patch("torch.distributed.is_initialized", return_value=True), \
            mock.patch("torch.distributed.all_reduce", side_effect=lambda t: seen.append(t.device)):
        dist = DDP(torch.device("meta"), torch.float32, world=2, rank=0)
        try:
            dist.sum(1.0, 2.0)
        except (NotImplementedError, RuntimeError):  # meta tensors have no values to read back
            pass
    assert seen == [torch.device("meta")]
