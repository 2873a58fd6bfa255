"""Show a model's config, parameter count, dtype, tokenizer and gpt2ft metadata.

    gpt2ft info runs/demo/sft
"""
from __future__ import annotations

import json

from . import add_common, load_model


def add_args(p):
    add_common(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args):
    if args.dtype == "auto":
        args.dtype = "float32"
    loaded = load_model(args)
    model, tokenizer = loaded
    info = {
        "source": str(loaded.source),
        "config": model.config.to_dict(),
        "parameters": model.num_params(),
        "dtype": _stored_dtype(loaded.source) or str(model.lm_head.weight.dtype).removeprefix("torch."),
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
        "meta": loaded.meta,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"source      {info['source']}")
    print(f"parameters  {info['parameters']:,} ({info['parameters'] / 1e6:.1f}M)")
    print(f"dtype       {info['dtype']} (as stored)")
    print("config      " + ", ".join(f"{k}={v}" for k, v in info["config"].items()))
    print(f"tokenizer   {tokenizer.kind}, {tokenizer.vocab_size} ids, eos={tokenizer.eos_id}")
    for key in ("template", "base_model", "step", "lora"):
        if key in loaded.meta:
            print(f"{key:<11} {loaded.meta[key]}")
    return 0


def _stored_dtype(folder) -> str | None:
    """The dtype(s) of the weights as saved (from the safetensors headers; --dtype only says how to load)."""
    from pathlib import Path

    from ..fileio import check_safetensors

    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    kinds = {entry["dtype"] for path in Path(folder).glob("*.safetensors")
             for name, entry in check_safetensors(path).items() if name != "__metadata__"}
    return "/".join(sorted(names.get(k, k.lower()) for k in kinds)) or None
