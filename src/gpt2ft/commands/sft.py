"""Instruction-tune a model with the loss on response tokens only (and the EOS that ends each reply).

Data: Alpaca JSON/JSONL (instruction, input, output), instruction+response pairs, chat `messages`
JSONL, CSV (--columns to map headers), or hf:DATASET_ID through the datasets library. Every record
is validated before the model loads. The template and its stop strings are saved with the
checkpoint, so generate, eval, chat and serve format prompts exactly as in training.

    gpt2ft sft gpt2 --data alpaca.json --template alpaca --out runs/sft --epochs 3
    gpt2ft sft gpt2 --data chats.jsonl --template chat --lora --out runs/chat-lora
"""
from __future__ import annotations

import json
from pathlib import Path

from ..cli import required
from . import add_common, add_lora, add_training, base_model_ref, load_for_training, train_config


def add_args(p):
    add_common(p, adapter_flag=False)
    add_instruction_data_args(p)
    g = p.add_argument_group("SFT")
    g.add_argument("--train-on-prompt", action="store_true", help="also train on prompt tokens")
    g.add_argument("--packing", action="store_true", help="pack several examples per row (no cross attention)")
    g.add_argument("--val-fraction", type=float, default=0.10, help="share of records for validation")
    g.add_argument("--test-fraction", type=float, default=0.05, help="share of records held out for testing")
    g.add_argument("--oversample-keyword", default=None, metavar="WORD",
                   help="sample records containing WORD --factor times as often")
    g.add_argument("--factor", type=float, default=3.0, help="oversampling factor for --oversample-keyword")
    g.add_argument("--eval-examples", type=int, default=32, help="validation records generated at each evaluation")
    g.add_argument("--eval-max-new-tokens", type=int, default=64, help="tokens generated per evaluated record")
    g.add_argument("--keyword", action="append", default=None, help="keyword whose presence is scored (repeatable)")
    add_training(p, lr=1e-4, warmup_steps=20, epochs=3.0, eval_every=50)
    add_lora(p)


def add_instruction_data_args(p) -> None:
    required(p.add_argument("--data", help="instruction data file (.json, .jsonl, .csv) or hf:DATASET_ID"))
    p.add_argument("--format", default="auto", help="auto|alpaca|instruction-response|messages|csv")
    p.add_argument("--split", default="train", help="split of an hf: dataset")
    p.add_argument("--columns", default=None, metavar="MAP",
                   help="CSV header mapping, e.g. instruction=question,output=answer")
    p.add_argument("--template", default=None,
                   help="alpaca|instruction-response|chat|FILE (default: chat for messages, else alpaca)")
    p.add_argument("--on-invalid", default="error", help="error: stop and list bad records; skip: train on the rest")


def parse_columns(text: str | None) -> dict[str, str]:
    """'instruction=question,output=answer' -> {'question': 'instruction', 'answer': 'output'}."""
    from ..errors import UserError

    mapping = {}
    for pair in filter(None, (text or "").split(",")):
        if "=" not in pair:
            raise UserError(f"--columns expects FIELD=HEADER pairs, got {pair!r}")
        ours, theirs = (s.strip() for s in pair.split("=", 1))
        mapping[theirs] = ours
    return mapping


def choose_template(name: str | None, records):
    from ..templates import get_template

    if name:
        return get_template(name)
    multi_turn = any(len(r.messages) > 2 or r.messages[0]["role"] == "system" for r in records)
    return get_template("chat" if multi_turn else "alpaca")


def run(args):
    from ..checkpoint import atomic_write_text
    from ..data.instructions import load_records, split_records
    from ..errors import UserError
    from ..objectives import InstructionTuning
    from ..runtime import seed_everything
    from ..train import sequence_length, train

    cfg = train_config(args)
    if not cfg.out:
        raise UserError("--out is required: the run folder for checkpoints and logs")
    # Validate all data before the (slow) model load.
    records, rejected = load_records(args.data, args.format, args.split, parse_columns(args.columns), args.on_invalid)
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    if rejected:
        atomic_write_text(run_dir / "rejected.jsonl", "".join(json.dumps(r) + "\n" for r in rejected))
        print(f"skipped {len(rejected)} invalid record(s), kept {len(records)}; reasons in {run_dir / 'rejected.jsonl'}")
    template = choose_template(args.template, records)
    train_records, val_records, test_records = split_records(records, args.val_fraction, args.test_fraction, args.seed)
    (run_dir / "splits").mkdir(exist_ok=True)
    for name, part in (("train", train_records), ("val", val_records), ("test", test_records)):
        atomic_write_text(run_dir / "splits" / f"{name}.jsonl", "".join(json.dumps(r.raw) + "\n" for r in part))

    seed_everything(args.seed)
    model, tokenizer = load_for_training(args)
    max_len = sequence_length(cfg, model.config.block_size)
    objective = InstructionTuning(train_records, val_records, tokenizer, template, max_len,
                                  train_on_prompt=args.train_on_prompt, packing=args.packing,
                                  oversample=(args.oversample_keyword, args.factor),
                                  eval_examples=args.eval_examples, eval_max_new_tokens=args.eval_max_new_tokens,
                                  keywords=args.keyword or [])
    print(objective.report)
    run_meta = {"objective": "sft", "base_model": base_model_ref(model, args), "template": template.to_dict(),
                "data": str(args.data)}
    keys = {"tokenizer": tokenizer.fingerprint(), "data": objective.fingerprint, "max_length": max_len,
            "model": model.config.to_dict()}
    train(model, tokenizer, objective, cfg, run_meta, keys)
    return 0
