"""What every recipe shares: the starting model (and its adapters), the checks made before anything is
read or written, the distribution strategy (the device resolved once, the process group set up), the plan
handed to the loop, and the run-folder steps."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..fileio import atomic_write_text, make_dir, refuse_overwriting_inputs
from ..objectives import Objective
from ..train import TrainConfig, train
from ..train.run_folder import RunFolder, remove_unused
from ..train.strategy import Single, make_strategy


@dataclass
class Start:
    """The model a run trains from, and what of it trains: all weights, or a LoRA adapter."""

    model: str  # Hub id, HF folder, gpt2ft checkpoint or run folder
    verify: bool = True  # check the sha256 of a gpt2ft checkpoint's files
    lora: bool | str | None = None  # True: train a new adapter; a folder: continue that adapter
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = "c_attn,c_proj"  # comma-separated module names (PEFT rule: name or suffix)

    def inputs(self) -> dict:
        """What the run reads, for the --out check."""
        return {"the MODEL it trains from": self.model,
                "the --lora adapter it continues": self.lora if isinstance(self.lora, str) else None}


@dataclass
class Plan:
    """Everything the loop needs, built by a recipe: `plan.train()` runs it."""

    model: Any
    tokenizer: Any
    objective: Objective
    config: TrainConfig
    meta: dict  # run metadata, saved with every checkpoint
    resume_keys: dict  # what must not change between a checkpoint and its resume
    folder: RunFolder  # opened once, here
    strategy: Single  # made once, here: its device and dtype are the run's
    template: Any = None  # the prompt template (sft, dpo)
    command: dict | None = None  # {"verb", "options"}: what config.yaml records for --config to read back (CLI)

    def train(self) -> Path | None:
        try:
            return train(self.model, self.tokenizer, self.objective, self.config, self.meta, self.resume_keys,
                         self.folder, self.strategy, self.command)
        finally:  # the lock goes with the run, not with the process (a Python caller may train again)
            remove_unused()
            self.folder.close()


def recipe(build):
    """A recipe that fails after claiming its run folder leaves no empty folder behind, in the CLI (whose
    exit would also clear it) and for a Python caller whose process lives on."""
    @functools.wraps(build)
    def claimed(cfg):
        try:
            return build(cfg)
        except BaseException:
            remove_unused()
            raise
    return claimed


def begin(config: TrainConfig, inputs: dict) -> Single:
    """Before anything is read or written: --out is given and is, holds or lies inside no input of the
    run (so --overwrite can never delete one); the strategy (--strategy: its device and dtype resolved
    once for the whole run, the process group set up under torchrun)."""
    if not config.out:
        raise UserError("--out is required: the run folder for checkpoints and logs")
    refuse_overwriting_inputs(config.out, inputs)
    return make_strategy(config)


def main_first(strategy: Single, work):
    """`work()` on the main process, then on the others (which then find what it wrote: prepared data, a
    reference cache); the value of this process's call."""
    if not strategy.main:
        strategy.barrier()
    value = work()
    if strategy.main:
        strategy.barrier()
    return value


def lora_on_lora(model: str) -> str:
    return (f"MODEL {model} already carries a LoRA adapter, so --lora cannot add another: drop --lora to keep "
            f"training that adapter, or merge it first (gpt2ft export {model} --merge-lora --out MERGED) and "
            "train a new adapter on MERGED")


def check_start(start: Start) -> None:
    """Refuse, before the run folder is claimed, --lora on a local MODEL that already carries an adapter."""
    from ..checkpoint import ADAPTER_CONFIG, read_meta, resolve

    if isinstance(start.lora, str) and not Path(start.lora).expanduser().is_dir():
        raise UserError(f"--lora {start.lora}: no such adapter folder; give the folder of the adapter to continue "
                        "(it holds adapter_config.json), or --lora alone to train a new one")
    if start.lora and Path(start.model).expanduser().is_dir():
        folder = resolve(start.model, verify=False)
        if read_meta(folder).get("lora") or (folder / ADAPTER_CONFIG).exists():
            raise UserError(lora_on_lora(start.model))


def load_for_training(start: Start, dropout: float | None = None):
    """The model to train (a checkpoint.LoadedModel) on CPU in fp32, with LoRA applied as `start.lora`
    asks (or kept from a LoRA MODEL), and `dropout` if given."""
    from ..checkpoint import attach_adapter, load, resolve
    from ..lora import LoRAConfig, apply_lora, trainable_summary

    loaded = load(start.model, device="cpu", dtype="float32", verify=start.verify)
    model = loaded.model
    if start.lora and model.lora_config is not None:
        raise UserError(lora_on_lora(start.model))
    if isinstance(start.lora, str):
        attach_adapter(model, resolve(start.lora))
    elif start.lora:
        targets = tuple(t.strip() for t in start.lora_targets.split(",") if t.strip())
        apply_lora(model, LoRAConfig(start.lora_r, start.lora_alpha, start.lora_dropout, targets))
    if model.lora_config is not None:  # apply_lora froze all but the adapters
        print(trainable_summary(model))
    if dropout is not None:
        set_dropout(model, dropout)
    return loaded


def set_dropout(model, p: float) -> None:
    import torch.nn as nn

    model.config.dropout = p
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        if hasattr(m, "dropout") and isinstance(m.dropout, float):
            m.dropout = p


def data_resume_keys(tokenizer, data_fingerprint: str, max_length: int, model, start: str | None = None,
                     **recipe) -> dict:
    """What must not change between a checkpoint and its resume: the data and its tokens, the model's shape, the
    checkpoint it started from (a run folder given as MODEL moves on as that run trains), its LoRA settings,
    and the recipe's own settings that change the loss (`recipe`)."""
    from dataclasses import asdict

    lora = asdict(model.lora_config) if model.lora_config is not None else None
    return {"tokenizer": tokenizer.fingerprint(), "data": data_fingerprint, "max_length": max_length,
            "model": model.config.to_dict(), "start": start, "lora": lora, **recipe}


def save_rejected_and_splits(run: RunFolder, rows, rejected: list[dict], what: str, val_fraction: float,
                             test_fraction: float, seed: int):
    """Write rejected.jsonl (when rows were skipped) and the seeded train/val/test splits (splits/*.jsonl,
    each row as read) into the run folder (the main process); return the three splits. Shared by sft and dpo."""
    from ..data.instructions import split_records

    run_dir = run.path
    splits = split_records(rows, val_fraction, test_fraction, seed)
    if not run.main:
        return splits
    if rejected:
        atomic_write_text(run_dir / "rejected.jsonl", "".join(json.dumps(r) + "\n" for r in rejected))
        print(f"left out {what}, kept {len(rows)}; reasons in {run_dir / 'rejected.jsonl'}")
    make_dir(run_dir / "splits")
    for name, part in zip(("train", "val", "test"), splits):
        atomic_write_text(run_dir / "splits" / f"{name}.jsonl", "".join(json.dumps(r.raw) + "\n" for r in part))
    return splits


def user_prompts(template, prompts: list[str] | None) -> list[str]:
    """--sample-prompt of an instruction-tuned run: each a user message, as the template renders it for a reply."""
    return [template.prompt([{"role": "user", "content": p}]) for p in prompts or []]


def say_template(template, asked: str | None, saved) -> None:
    """Print the prompt template a run trains with, and why it is that one."""
    why = ("--template" if asked else "the model's own" if saved is not None else
           "picked from the data: chat for multi-turn or system-prompted records, else alpaca")
    print(f"template: {template.name} ({why}; --template NAME|FILE picks another)")
