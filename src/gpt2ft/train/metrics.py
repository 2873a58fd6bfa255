"""Where a run's numbers go: metrics.jsonl (one row per logged step or evaluation), samples.jsonl,
TensorBoard when installed, and a progress bar with loss, LR and tokens/s. Only the main process logs."""
from __future__ import annotations

import json
import sys

from ..fileio import atomic_write_text
from ..runtime import progress_bar
from .run_folder import RunFolder, read_jsonl_steps


class MetricsLog:
    def __init__(self, run: RunFolder, total: int, step: int, progress: bool):
        self.run, self.enabled = run, run.main
        self.bar = self.file = self.writer = None
        if not self.enabled:
            return
        if step == 0:
            run.start_fresh()
        elif run.metrics.exists():  # resume: drop rows logged after the checkpoint (they come again)
            atomic_write_text(run.metrics, read_jsonl_steps(run.metrics, step))
        self.file = open(run.metrics, "a", encoding="utf-8")
        self.writer = _tensorboard(run)
        if progress:
            self.bar = progress_bar(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True,
                                    mininterval=1.0)

    def log(self, msg: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else lambda m: print(m, file=sys.stderr, flush=True))(msg)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, record["step"])

    def tick(self, record: dict | None) -> None:
        """One optimizer step done; show the latest numbers on the bar."""
        if self.bar is None:
            return
        self.bar.update(1)
        if record and "train_loss" in record:
            self.bar.set_postfix(loss=f"{record['train_loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)

    def samples(self, step: int, samples: list[dict]) -> None:
        if self.enabled and samples:
            with open(self.run.samples, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "samples": samples}) + "\n")

    def close(self) -> None:
        for thing in (self.bar, self.file, self.writer):
            if thing is not None:
                thing.close()


def _tensorboard(run: RunFolder):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run.path / "tensorboard"))
