"""Convert instruction data between formats: Alpaca JSON/JSONL, chat messages JSONL, instruction +
response JSONL; and raw text lines into instruction/response pairs (one line = one response to a
fixed --instruction, or 'instruction<TAB>response' lines). `pairs` makes preference data from a model:
its own answer to each instruction becomes `rejected` where it differs from the reference answer.

    gpt2ft data convert alpaca.json --to messages --out chats.jsonl
    gpt2ft data convert facts.txt --from lines --instruction "Tell me a fact." --out facts.jsonl
    gpt2ft data pairs runs/sft --data alpaca.json --out prefs.jsonl --temperature 0.7
"""
from __future__ import annotations

import json
from pathlib import Path

from ..cli import required
from ..errors import UserError


def add_args(p):
    from . import add_sampling

    p.add_argument("action", choices=["convert", "pairs"], help="what to do")
    p.add_argument("input", metavar="INPUT", help="data file (or hf:DATASET_ID); for pairs: the MODEL")
    required(p.add_argument("--out", help="file to write (.jsonl, or .json for an Alpaca array)"))
    p.add_argument("--to", default="alpaca", choices=["alpaca", "messages", "instruction-response"],
                   help="output format")
    p.add_argument("--from", dest="source", default="auto",
                   help="auto|alpaca|instruction-response|messages|csv|lines")
    p.add_argument("--instruction", default=None, help="with --from lines: the instruction every line answers")
    p.add_argument("--split", default="train", help="split of an hf: dataset")
    p.add_argument("--columns", default=None, help="CSV header mapping, e.g. instruction=question,output=answer")
    p.add_argument("--on-invalid", default="error", help="error|skip")
    p.add_argument("--config", metavar="FILE.yaml", default=None, help="read options from YAML")
    g = p.add_argument_group("pairs")
    g.add_argument("--data", default=None, help="instruction data whose answers become `chosen`")
    g.add_argument("--template", default=None, help="prompt template (default: the model's saved one, else alpaca)")
    g.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    g.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
    g.add_argument("--dtype", default="auto", help="auto|float32|bfloat16|float16")
    add_sampling(p, temperature=0.7, max_new_tokens=64)


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
    from ..checkpoint import atomic_write_text
    from ..data.instructions import load_records, normalize, record_to_alpaca, record_to_json
    from .sft import parse_columns

    if args.action == "pairs":
        from .dpo import run_pairs

        return run_pairs(args)
    if args.source == "lines":
        records = [normalize(row, "alpaca", f"{args.input}:{i}")
                   for i, row in enumerate(lines_to_rows(Path(args.input), args.instruction))]
    else:
        records, _ = load_records(args.input, args.source, args.split, parse_columns(args.columns), args.on_invalid)
    if args.to == "messages":
        rows = [record_to_json(r) for r in records]
    else:
        rows = [record_to_alpaca(r) for r in records]
        if args.to == "instruction-response":
            rows = [{"instruction": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else ""),
                     "response": r["output"], **({"weight": r["weight"]} if "weight" in r else {})} for r in rows]
    out = Path(args.out)
    if out.suffix == ".json":
        atomic_write_text(out, json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} records to {out}")
    return 0
