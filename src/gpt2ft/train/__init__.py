"""The one training loop, for every objective (pretrain, finetune, sft, dpo; with or without LoRA).

    config.py      TrainConfig (every training flag, validated) and TrainState (what resume restores)
    state.py       data order, RNG states, the LR schedule, resume checks
    run_folder.py  the run folder: ownership marker, lock, checkpoints (latest/best/rotation), resume
    defaults.py    what an unset --epochs, --lr, --warmup-steps, --eval-every becomes (from data and model)
    metrics.py     metrics.jsonl, samples.jsonl, TensorBoard, the progress bar
    report.py      the console: scores and a sample per evaluation, warnings, the summary, loss.png
    strategy.py    single device, DDP or FSDP2 under torchrun: wrap, optimizer, clip, sums, whole state in/out
    loop.py        train(): set up -> resume -> step -> log -> evaluate -> save
"""
from .config import TrainConfig, TrainState, sequence_length

__all__ = ["TrainConfig", "TrainState", "sequence_length", "train", "accumulate_gradients", "open_run"]


def __getattr__(name: str):
    """The loop and the run folder load on first use (they import torch; building the CLI must not)."""
    if name in ("train", "accumulate_gradients"):
        from . import loop

        return getattr(loop, name)
    if name == "open_run":
        from .run_folder import open_run

        return open_run
    raise AttributeError(name)
