"""Train a GPT-2 from scratch (GPT-2's initialisation) on data made by `gpt2ft prepare`.

    gpt2ft pretrain --model-config micro --data data/shakespeare --out runs/micro --max-steps 500
"""
from __future__ import annotations

from ..argtypes import ranged
from ..config import preset_help
from . import add_common, add_training, path_option, recipe_config, required, train_plan


def add_args(p):
    p.add_argument("--model-config", default="micro",
                   help=f"a preset (parameters at GPT-2's 50,257-token vocabulary): {preset_help()}")
    for name in ("n_layer", "n_head", "n_embd", "block_size"):
        p.add_argument("--" + name.replace("_", "-"), type=ranged(int, 1), default=None,
                       help=f"override the preset's {name} (>= 1)")
    path_option(required(p.add_argument("--data", help="prepared data folder (train.bin, val.bin, meta.json)")))
    path_option(p.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer folder (default: the data's)"))
    add_common(p, model=False)
    add_training(p, "pretrain", dropout=0.0)


def run(args):
    from ..recipes import PretrainConfig, pretrain

    return train_plan(pretrain(recipe_config(PretrainConfig, args)), args)
