"""What makes resume exact: the data order (a function of seed and epoch only), RNG states, the LR
schedule, and the keys that must not change between a checkpoint and its resume."""
from __future__ import annotations

import math
import random

import numpy as np
import torch

from ..errors import UserError
from .config import TrainConfig, TrainState


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step."""
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    warmup = min(cfg.warmup_steps, max(total // 10, 0))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def order_for_epoch(n: int, epoch: int, seed: int, weights: torch.Tensor | None) -> torch.Tensor:
    """The data order of an epoch, a function of (seed, epoch) only, so resume needs no sampler state."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    if weights is not None:
        return torch.multinomial(weights, n, replacement=True, generator=g)
    return torch.randperm(n, generator=g)


def next_indices(state: TrainState, n: int, count: int, seed: int, weights) -> list[int]:
    """The next `count` example indices, continuing into the next epoch when one runs out."""
    out: list[int] = []
    order = order_for_epoch(n, state.epoch, seed, weights)
    while len(out) < count:
        take = order[state.offset: state.offset + count - len(out)].tolist()
        out += take
        state.offset += len(take)
        if state.offset >= n:
            state.epoch, state.offset = state.epoch + 1, 0
            order = order_for_epoch(n, state.epoch, seed, weights)
    return out


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_resume_keys(saved: dict, current: dict, force: bool) -> None:
    # a key the checkpoint lacks was not recorded by the gpt2ft that wrote it: nothing to compare
    diffs = [f"{k}: {saved[k]!r} -> {current.get(k)!r}" for k in sorted(saved) if saved[k] != current.get(k)]
    if diffs and not force:
        raise UserError("the run changed since its checkpoint (" + "; ".join(diffs) +
                        "); pass --force-resume to resume anyway, or use a new --out")
