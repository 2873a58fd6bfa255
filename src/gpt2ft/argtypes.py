"""Ranges and argparse `type=` converters that check a value where it is parsed (flags and YAML keys
alike: cli.parse runs YAML values through the same converter). A leaf: imports nothing from gpt2ft."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """lo <= v <= hi (< with *_open; None: unbounded) for an int or a float. NaN and infinities are
    never inside. One declaration serves every surface: argparse, pydantic, the REPL, the playground."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    @property
    def text(self) -> str:
        """The accepted range as a person reads it: ">= 1", "in (0, 1]"."""
        lo, hi = (_number_text(self.kind, v) if v is not None else None for v in (self.lo, self.hi))
        if lo is not None and hi is not None:
            return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if lo is not None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if hi is not None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        return "any finite number"

    @property
    def noun(self) -> str:
        return "an integer" if self.kind is int else "a number"

    def contains(self, v) -> bool:
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def parse(self, value) -> int | float:
        """A string or a number -> a checked value of `kind`; ValueError says what was wrong."""
        if isinstance(value, bool):
            raise ValueError(f"expected {self.noun} {self.text}, got {value!r}")
        try:
            if self.kind is int and isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                v = int(value)
            else:
                v = self.kind(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"expected {self.noun} {self.text}, got {value!r}") from None
        if not self.contains(v):
            raise ValueError(f"{value} is out of range: must be {self.text}")
        return v

    def converter(self):
        """An argparse `type=` for this range."""
        convert = argparse_type(self.parse, self.kind)
        convert.range = self.text
        return convert


def argparse_type(parse, kind: type, errors: tuple = (ValueError,)):
    """`parse(text)` as an argparse `type=`: the errors it raises become argparse's one-line message;
    `kind` is what cli.parse reads to type-check the same key in YAML."""

    def convert(value: str):
        try:
            return parse(value)
        except errors as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = kind.__name__  # argparse and cli.parse read the base kind from the name
    convert.kind = kind
    return convert


def _number_text(kind, v) -> str:
    """0.01 -> "0.01", 2.0 -> "2", 2**64 - 1 -> "2^64 - 1"."""
    if kind is int and v >= 2**32 and (int(v) + 1) & int(v) == 0:
        return f"2^{int(v).bit_length()} - 1"
    return str(int(v)) if kind is int else f"{v:g}"


def ranged(kind, lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False):
    """A converter to `kind` (int or float) that accepts lo <= v <= hi (< with *_open; None: unbounded)."""
    return Range(kind, lo, hi, lo_open, hi_open).converter()


class Once(argparse._StoreAction):
    """A flag that takes one value: given twice on one command line it is an error, not the last one silently
    kept (e.g. `generate --prompt A --prompt B` would drop A)."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = namespace.__dict__.setdefault("_once", {})
        if self.dest in seen:
            raise argparse.ArgumentError(self, f"given twice ({seen[self.dest]!r}, then {values!r}): it takes one "
                                               "value (one per command)")
        seen[self.dest] = values
        setattr(namespace, self.dest, values)
