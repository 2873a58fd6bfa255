"""Plot a run's training and validation loss (against steps and tokens seen) and its evaluation
scores to RUN_DIR/loss.png (and loss.pdf with --format pdf). In a training run's folder the plot
belongs to the run and the next plot replaces it; in any other folder with a metrics.jsonl it never
replaces a file gpt2ft did not write.

    gpt2ft plot runs/demo/sft --format png --format pdf
"""
from __future__ import annotations

from pathlib import Path

from . import refuse_given


def add_args(p):
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder with metrics.jsonl")
    p.add_argument("--format", action="append", default=None, choices=["png", "pdf", "svg"],
                   help="file format (repeatable; default png)")
    p.add_argument("--overwrite", action="store_true",
                   help="outside a training run's folder: replace a plot gpt2ft wrote there earlier (never a file "
                        "of yours)")


def run(args):
    from ..fileio import TRAINING_VERBS, made_by
    from ..plots import plot_run

    if made_by(Path(args.run_dir)) in TRAINING_VERBS:  # a run's own plot is replaced anyway
        refuse_given(args, {"overwrite"}, f"in a training run's folder ({args.run_dir}: its plot is the run's own)")
    for path in plot_run(args.run_dir, tuple(dict.fromkeys(args.format or ["png"])), overwrite=args.overwrite):
        print(path)
    return 0
