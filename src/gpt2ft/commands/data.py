"""Convert instruction data between formats: Alpaca JSON/JSONL, chat messages JSONL, instruction +
response JSONL; and raw text lines into instruction/response pairs (one line = one response to a
fixed --instruction, or 'instruction<TAB>response' lines).

    gpt2ft data convert alpaca.json --to messages --out chats.jsonl
    gpt2ft data convert facts.txt --from lines --instruction "Tell me a fact." --out facts.jsonl
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from . import add_columns_args, parse_columns, required


def add_args(p):
    p.add_argument("action", choices=["convert"], help="what to do")
    p.add_argument("input", metavar="INPUT", help="data file (or hf:DATASET_ID)")
    required(p.add_argument("--out", help="file to write (.jsonl, or .json for an Alpaca array)"))
    p.add_argument("--to", default="alpaca", choices=["alpaca", "messages", "instruction-response"],
                   help="output format")
    p.add_argument("--from", dest="source", default="auto",
                   help="auto|alpaca|instruction-response|messages|csv|lines")
    p.add_argument("--instruction", default=None, help="with --from lines: the instruction every line answers")
    add_columns_args(p)
    p.add_argument("--on-invalid", default="error", help="error|skip")


def lines_to_rows(path: Path, instruction: str | None) -> list[dict]:
    from ..data.text import read_lines

    rows = []
    for n, line in read_lines(path):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if instruction:
            rows.append({"instruction": instruction, "input": "", "output": line.strip()})
        elif "\t" in line:
            left, right = line.split("\t", 1)
            rows.append({"instruction": left.strip(), "input": "", "output": right.strip()})
        else:
            raise UserError(f"{path}:{n}: expected 'instruction<TAB>response' (or pass --instruction)")
    return rows


def run(args):
    from ..fileio import atomic_write_text
    from ..data.instructions import load_records, normalize, record_to_row

    if args.source == "lines":
        records = [normalize(row, "alpaca", f"{args.input}:{i}")
                   for i, row in enumerate(lines_to_rows(Path(args.input), args.instruction))]
    else:
        records, _ = load_records(args.input, args.source, args.split, parse_columns(args.columns), args.on_invalid)
    rows = [record_to_row(r, args.to) for r in records]
    out = Path(args.out)
    if out.suffix == ".json":
        atomic_write_text(out, json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} records to {out}")
    return 0
