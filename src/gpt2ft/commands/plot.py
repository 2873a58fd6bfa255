"""Plot a run's training and validation loss (against steps and tokens seen) and its evaluation
scores to RUN_DIR/loss.png (and loss.pdf with --format pdf).

    gpt2ft plot runs/demo/sft --format png --format pdf
"""
from __future__ import annotations


def add_args(p):
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder with metrics.jsonl")
    p.add_argument("--format", action="append", default=None, choices=["png", "pdf", "svg"],
                   help="file format (repeatable; default png)")


def run(args):
    from ..plots import plot_run

    for path in plot_run(args.run_dir, tuple(args.format or ["png"])):
        print(path)
    return 0
