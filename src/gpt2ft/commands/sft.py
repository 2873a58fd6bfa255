"""Instruction-tune a model with the loss on response tokens only (and the EOS that ends each reply).

Data: Alpaca JSON/JSONL (instruction, input, output), instruction+response pairs, chat `messages`
JSONL, CSV (--columns to map headers), or hf:DATASET_ID through the datasets library. Every record
is validated before the model loads. The template and its stop strings are saved with the
checkpoint, so generate, eval, chat and serve format prompts exactly as in training.

    gpt2ft sft gpt2 --data alpaca.json --template alpaca --out runs/sft --epochs 3
    gpt2ft sft gpt2 --data chats.jsonl --template chat --lora --out runs/chat-lora
"""
from __future__ import annotations


from ..argtypes import ranged
from . import (add_common, add_instruction_data_args, add_lora, add_training, load_for_training, parse_columns,
               save_rejected_and_splits, train_config)


def add_args(p):
    add_common(p, adapter_flag=False)
    add_instruction_data_args(p)
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
    g.add_argument("--eval-examples", type=int, default=32, help="validation records generated at each evaluation")
    g.add_argument("--eval-max-new-tokens", type=int, default=64, help="tokens generated per evaluated record")
    g.add_argument("--keyword", action="append", default=None, help="keyword whose presence is scored (repeatable)")
    add_training(p, lr=1e-4, warmup_steps=20, epochs=3.0, eval_every=50)
    add_lora(p)


def choose_template(name: str | None, records):
    from ..templates import get_template

    if name:
        return get_template(name)
    multi_turn = any(len(r.messages) > 2 or r.messages[0]["role"] == "system" for r in records)
    return get_template("chat" if multi_turn else "alpaca")


def run(args):
    from ..data.instructions import load_records
    from ..objectives import InstructionTuning
    from ..runtime import seed_everything
    from ..train import open_run, sequence_length, train

    cfg = train_config(args)
    # Validate all data before the run folder is claimed and the (slow) model loads.
    records, rejected = load_records(args.data, args.format, args.split, parse_columns(args.columns), args.on_invalid)
    run = open_run(cfg.out, "sft", cfg.resume, cfg.overwrite, inputs=(args.model, args.data))
    template = choose_template(args.template, records)
    train_records, val_records, _ = save_rejected_and_splits(run.path, records, rejected,
                                                             f"{len(rejected)} invalid record(s)", args)

    seed_everything(args.seed)
    loaded = load_for_training(args)
    model, tokenizer = loaded
    max_len = sequence_length(cfg, model.config.block_size)
    objective = InstructionTuning(train_records, val_records, tokenizer, template, max_len,
                                  train_on_prompt=args.train_on_prompt, packing=args.packing,
                                  oversample=(args.oversample_keyword, args.factor),
                                  eval_examples=args.eval_examples, eval_max_new_tokens=args.eval_max_new_tokens,
                                  keywords=args.keyword or [])
    print(objective.report)
    run_meta = {"objective": "sft", "base_model": loaded.base_ref, "template": template.to_dict(),
                "data": str(args.data)}
    keys = {"tokenizer": tokenizer.fingerprint(), "data": objective.fingerprint, "max_length": max_len,
            "model": model.config.to_dict()}
    train(model, tokenizer, objective, cfg, run_meta, keys, run)
    return 0
