"""Plots of a run's metrics.jsonl: losses against steps and tokens seen, and evaluation scores."""
from __future__ import annotations

import io
import json
from pathlib import Path

from .errors import UserError

SCORE_KEYS = ("exact_match", "bleu", "rouge1", "rouge2", "rougeL", "keyword_rate", "reward_accuracy",
              "train_reward_accuracy", "val_reward_accuracy")
REWARD_KEYS = tuple(f"{split}_reward_{k}" for split in ("train", "val") for k in ("chosen", "rejected", "margin"))


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of run_dir/metrics.jsonl; a row that is not an object, or whose step, tokens_seen,
    losses or scores are not numbers, is an error naming its line; an unfinished last line is left out."""
    from .data.text import read_lines

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl; is this a gpt2ft run folder?")
    rows, lines = [], list(read_lines(path))
    for n, line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) and not line.endswith("\n"):
                break  # the row a killed run was writing (kill -9 can cut a write short); resume logs it again
            raise UserError(f"{path}:{n}: not valid JSON") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{n}: expected a JSON object per line, not {type(row).__name__}")
        for key in ("step", "tokens_seen", "train_loss", "val_loss", *SCORE_KEYS):
            if key in row and (isinstance(row[key], bool) or not isinstance(row[key], (int, float))):
                raise UserError(f"{path}:{n}: {key} must be a number, not {row[key]!r}")
        rows.append(row)
    return rows


def plot_run(run_dir: str | Path, formats: tuple[str, ...] = ("png",), overwrite: bool = False) -> list[Path]:
    """Write run_dir/loss.<fmt>: train/val loss against steps and tokens, plus scores if any. In a
    training run's folder the plot is the run's own (replaced by the next plot); anywhere else it goes
    through the guarded writer: never over a file gpt2ft did not write, over its own only with
    `overwrite`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fileio import TRAINING_VERBS, atomic_write, check_writable, made_by, write_user_file

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    targets = [run_dir / f"loss.{fmt}" for fmt in formats]
    in_run = made_by(run_dir) in TRAINING_VERBS
    if not in_run:
        for target in targets:  # before drawing anything
            check_writable(target, overwrite=overwrite, what="plot")
    train = [r for r in rows if "train_loss" in r]
    val = [r for r in rows if "val_loss" in r]
    scores = [k for k in SCORE_KEYS if any(k in r for r in rows)]
    rewards = [k for k in REWARD_KEYS if any(k in r for r in rows)]  # DPO: implicit rewards
    if not train and not val:
        raise UserError(f"{run_dir}/metrics.jsonl has no losses to plot yet")
    panels = 2 + bool(scores) + bool(rewards)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), constrained_layout=True)
    for ax, x_key, label in ((axes[0], "step", "step"), (axes[1], "tokens_seen", "tokens seen")):
        for kind, key, style in (("train", "train_loss", "-"), ("validation", "val_loss", "o-")):
            pts = [r for r in rows if key in r and x_key in r]  # a row without this axis is left out
            if pts:
                ax.plot([r[x_key] for r in pts], [r[key] for r in pts], style, label=kind,
                        alpha=0.8 if kind == "train" else 1.0)
        ax.set_xlabel(label)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    axes[0].set_title(run_dir.name)
    if scores:
        for key in scores:  # every score on a 0-1 scale (BLEU is reported 0-100)
            pts = [r for r in rows if key in r and "step" in r]
            scale, label = (100, "bleu / 100") if key == "bleu" else (1, key)
            axes[2].plot([r["step"] for r in pts], [r[key] / scale for r in pts], "o-", label=label)
        axes[2].set_xlabel("step")
        axes[2].set_title("scores")
        axes[2].grid(alpha=0.3)
        axes[2].legend()
    if rewards:
        ax = axes[-1]
        for key in rewards:
            pts = [r for r in rows if key in r]
            ax.plot([r["step"] for r in pts], [r[key] for r in pts], "o-" if key.startswith("val") else "-",
                    label=key.replace("_reward_", " "), alpha=0.8)
        ax.set_xlabel("step")
        ax.set_title("implicit rewards")
        ax.grid(alpha=0.3)
        ax.legend()
    for fmt, target in zip(formats, targets):
        if in_run:
            atomic_write(target, lambda f: fig.savefig(f, format=fmt, dpi=120))
        else:
            buffer = io.BytesIO()
            fig.savefig(buffer, format=fmt, dpi=120)
            write_user_file(target, buffer.getvalue(), overwrite=overwrite, what="plot")
    plt.close(fig)
    return targets
