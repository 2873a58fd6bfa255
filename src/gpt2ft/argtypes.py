"""argparse `type=` converters that check a flag's range where it is parsed (flags and YAML keys alike:
cli.parse runs YAML values through the same converter). A leaf: imports nothing from gpt2ft."""
from __future__ import annotations

import argparse
import math


def ranged(kind, lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False):
    """A converter to `kind` (int or float) that accepts lo <= v <= hi (< with *_open; None: unbounded).
    NaN and infinities are refused. The accepted range reads as e.g. ">= 1" or "in (0, 1]"."""
    if lo is not None and hi is not None:
        text = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        text = f"{'>' if lo_open else '>='} {lo}"
    else:
        text = f"{'<' if hi_open else '<='} {hi}"

    def convert(value: str):
        try:
            v = kind(value)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} "
                                             f"{text}, got {value!r}") from None
        if not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) \
                or (hi is not None and (v >= hi if hi_open else v > hi)):
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be {text}")
        return v

    convert.__name__ = kind.__name__  # argparse and cli.parse read the base kind from the name
    convert.kind = kind
    convert.range = text
    return convert

