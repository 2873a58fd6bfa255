"""Instruction-tune a model with the loss on response tokens only (and the EOS that ends each reply).

Data: Alpaca JSON/JSONL (instruction, input, output), instruction+response pairs, chat `messages`
JSONL, CSV (--columns to map headers), or hf:DATASET_ID through the datasets library. Every record
is validated before the model loads. The template (--template, else the model's saved one, else chat
for multi-turn data and alpaca otherwise; templates.pick_template, as dpo, chat and serve pick it) and
its stop strings are saved with the checkpoint, so generate, eval, chat and serve format prompts exactly
as in training.

    gpt2ft sft gpt2 --data alpaca.json --template alpaca --out runs/sft --epochs 3
    gpt2ft sft gpt2 --data chats.jsonl --template chat --lora --out runs/chat-lora
"""
from __future__ import annotations

from ..argtypes import ranged
from . import (add_common, add_instruction_data_args, add_keyword, add_lora, add_training, parse_columns, recipe_config,
               refuse_given, train_plan)


def add_args(p):
    add_common(p, adapter_flag=False)
    add_instruction_data_args(p, "train on the rest")
    g = p.add_argument_group("SFT")
    g.add_argument("--train-on-prompt", action="store_true", help="also train on prompt tokens")
    g.add_argument("--packing", action="store_true", help="pack several examples per row (no cross attention)")
    g.add_argument("--val-fraction", type=ranged(float, 0, 1, hi_open=True), default=0.10,
                   help="share of records for validation, in [0, 1)")
    g.add_argument("--test-fraction", type=ranged(float, 0, 1, hi_open=True), default=0.05,
                   help="share of records held out for testing, in [0, 1)")
    g.add_argument("--oversample-keyword", default=None, metavar="WORD",
                   help="sample records containing WORD --factor times as often")
    g.add_argument("--factor", type=ranged(float, 0, lo_open=True), default=3.0,
                   help="oversampling factor for --oversample-keyword, > 0")
    g.add_argument("--eval-examples", type=ranged(int, 0), default=32,
                   help="validation records generated at each evaluation, >= 0")
    g.add_argument("--eval-max-new-tokens", type=ranged(int, 1), default=64,
                   help="tokens generated per evaluated record, >= 1")
    add_keyword(g)
    add_training(p, "sft")
    add_lora(p)


def run(args):
    from ..recipes import SFTConfig, sft

    if not args.sample_prompt:
        refuse_given(args, {"sample_tokens"}, "without --sample-prompt (the evaluation's replies to validation "
                     "records are --eval-max-new-tokens long)")
    if not args.oversample_keyword:
        refuse_given(args, {"factor"}, "without --oversample-keyword")
    if args.val_fraction == 0:
        refuse_given(args, {"eval_batches", "eval_examples", "keyword", "eval_max_new_tokens"},
                     "with --val-fraction 0 (no validation records to score)")
    if args.eval_examples == 0:
        refuse_given(args, {"keyword", "eval_max_new_tokens"}, "with --eval-examples 0 (nothing is generated)")
    return train_plan(sft(recipe_config(SFTConfig, args, columns=parse_columns(args.columns))), args)
