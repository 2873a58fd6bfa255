"""Score a model on instruction data: generate a response per record (batched, greedy by default)
and report exact match, BLEU (sacrebleu), ROUGE-1/2/L (rouge-score), length ratio, keyword presence
and the perplexity of the reference responses. Writes responses.jsonl and summary.json. A plain
text file (.txt, .md) gives its perplexity instead. --data may be an SFT run folder: its test split.

    gpt2ft eval runs/demo/sft --data runs/demo/sft --out runs/demo/eval
    gpt2ft eval gpt2 --data shakespeare.txt
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from . import add_common, add_instruction_data_args, add_sampling, load_model, parse_columns, sampling_config


def add_args(p):
    add_common(p)
    add_instruction_data_args(p)
    p.add_argument("--out", default=None, metavar="REPORT_DIR", help="write responses.jsonl and summary.json here")
    p.add_argument("--keyword", action="append", default=None, help="keyword whose presence is scored (repeatable)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    p.add_argument("--max-examples", type=int, default=None, help="evaluate only the first N records")
    add_sampling(p, temperature=0.0, max_new_tokens=128)


def run(args):
    from ..fileio import atomic_write_text
    from ..data.instructions import load_records
    from ..data.text import read_lines
    from ..evaluate import evaluate_records, text_perplexity
    from ..templates import get_template

    data = Path(args.data)
    if data.suffix in (".txt", ".md"):
        text = "".join(line for _, line in read_lines(data))
        model, tokenizer = load_model(args)
        ppl, n = text_perplexity(model, tokenizer, text)
        summary = {"perplexity": ppl, "tokens": n, "data": str(data)}
        _print_table(summary)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            atomic_write_text(Path(args.out) / "summary.json", json.dumps(summary, indent=2))
        return 0
    if data.is_dir():
        if not (data / "splits" / "test.jsonl").exists():
            raise UserError(f"{data}: a folder given to --data must be an SFT run with splits/test.jsonl")
        data = data / "splits" / "test.jsonl"
        if not data.read_text().strip():
            raise UserError(f"{data} is empty (the run used --test-fraction 0); pass a data file")
    records, rejected = load_records(data if not str(args.data).startswith("hf:") else args.data, args.format,
                                     args.split, parse_columns(args.columns), args.on_invalid)
    records = records[: args.max_examples] if args.max_examples else records
    loaded = load_model(args)
    model, tokenizer = loaded
    template = get_template(args.template) if args.template else loaded.template or get_template("alpaca")
    sampling = sampling_config(args, list(template.stop))
    rows, summary = evaluate_records(model, tokenizer, records, template, sampling, args.keyword, args.batch_size)
    summary.update(model=loaded.ref, data=str(data), rejected=len(rejected), template=template.name)
    _print_table(summary)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "responses.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        print(f"wrote {out / 'responses.jsonl'} and {out / 'summary.json'}")
    return 0


def _print_table(summary: dict) -> None:
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")
