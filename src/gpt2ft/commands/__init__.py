"""One module per CLI verb: add_args(parser) declares its flags, run(args) does the work.

Helpers here hold the flags that several verbs share, so every verb spells them the same way.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing


def add_common(p: argparse.ArgumentParser, model: bool = True) -> None:
    """MODEL positional (optional with model=False), --device, --dtype, --config."""
    if model:
        p.add_argument("model", metavar="MODEL",
                       help="Hub id (gpt2, openai-community/gpt2), HF folder, gpt2ft checkpoint or run folder")
        p.add_argument("--lora", metavar="ADAPTER_DIR", default=None, help="apply this LoRA adapter on top of MODEL")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps (auto: cuda > mps > cpu)")
    p.add_argument("--dtype", default="auto", help="auto|float32|bfloat16|float16")
    p.add_argument("--config", metavar="FILE.yaml", default=None, help="read options from YAML; flags override it")


def add_sampling(p: argparse.ArgumentParser, temperature: float = 0.8, max_new_tokens: int = 100) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="most tokens to generate")
    g.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="1.0 = off")
    g.add_argument("--stop", action="append", default=None, metavar="S", help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")


def sampling_config(args, extra_stop: list[str] | None = None):
    from ..generation import SamplingConfig

    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                          stop=list(args.stop or []) + list(extra_stop or []), seed=args.seed)


def load_model(args):
    from ..checkpoint import load

    return load(args.model, device=args.device, dtype=args.dtype, lora=getattr(args, "lora", None))


def add_dataclass_args(p: argparse.ArgumentParser, cls, title: str, skip: tuple[str, ...] = ()) -> None:
    """Flags from a config dataclass: --field-name, typed, help from the field's metadata."""
    g = p.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = hints[f.name]
        help_text = f.metadata.get("help", "")
        if kind is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        if typing.get_origin(base) is list:
            g.add_argument(flag, nargs="+", type=typing.get_args(base)[0], default=default, help=help_text)
        else:
            g.add_argument(flag, type=base, default=default, help=help_text)


def dataclass_from_args(cls, args, **overrides):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)
