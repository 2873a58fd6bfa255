"""Continue training a model on raw text (style or domain adaptation, e.g. GPT-2 on Shakespeare).
A text file or folder given to --data is prepared on the fly with the model's tokenizer.

    gpt2ft finetune gpt2 --data shakespeare.txt --out runs/gpt2-shakespeare --max-steps 300
    gpt2ft finetune gpt2 --data shakespeare.txt --out runs/lora --lora --lora-r 8
"""
from __future__ import annotations

from ..argtypes import ranged
from . import (add_common, add_lora, add_text_field, add_training, path_option, recipe_config, refuse_given, required,
               train_plan)


def add_args(p):
    add_common(p, adapter_flag=False)
    path_option(required(p.add_argument("--data", help="prepared data folder, or text file(s)/folder to prepare now")))
    p.add_argument("--val-fraction", type=ranged(float, 0, 1, hi_open=True), default=0.1,
                   help="held-out share when preparing text, in [0, 1)")
    add_text_field(p)
    add_training(p, "finetune")
    add_lora(p)


def run(args):
    from ..recipes import FinetuneConfig, finetune

    if args.val_fraction == 0:
        refuse_given(args, {"eval_batches"}, "with --val-fraction 0 (no validation text to score)")
    return train_plan(finetune(recipe_config(FinetuneConfig, args)), args)
