"""Convert instruction data between formats: Alpaca JSON/JSONL, chat messages JSONL, instruction +
response JSONL; and raw text lines into instruction/response pairs (one line = one response to a
fixed --instruction, or 'instruction<TAB>response' lines). `pairs` makes preference data from a MODEL:
its own answer to each instruction becomes `rejected` where it differs from the record's answer.

    gpt2ft data convert alpaca.json --to messages --out chats.jsonl
    gpt2ft data convert facts.txt --from lines --instruction "Tell me a fact." --out facts.jsonl
    gpt2ft data pairs runs/sft --data alpaca.json --out prefs.jsonl --temperature 0.7
"""
from __future__ import annotations

import json
from pathlib import Path

from ..argtypes import ranged
from ..errors import UserError
from ..data.formats import FORMATS
from . import (add_columns_args, add_device, add_on_invalid, add_sampling, load_model, only_with, parse_columns,
               refuse_given, required, sampling_config)


def add_args(p):
    p.add_argument("action", choices=["convert", "pairs"], help="what to do")
    p.add_argument("input", metavar="INPUT", help="data file (or hf:DATASET_ID); for pairs: the MODEL")
    required(p.add_argument("--out", help="file to write (.jsonl, or .json for an Alpaca array); never an existing "
                                         "file gpt2ft did not write"))
    p.add_argument("--overwrite", action="store_true", help="replace an --out file that gpt2ft wrote earlier")
    g = p.add_argument_group("convert")
    for action in (
        g.add_argument("--to", default="alpaca", choices=["alpaca", "messages", "instruction-response"],
                       help="output format"),
        g.add_argument("--from", dest="source", default="auto",
                       help="|".join((*FORMATS, "lines"))),
        only_with(g.add_argument("--instruction", default=None,
                                 help="with --from lines: the instruction every line answers"), "source", "lines"),
    ):
        only_with(action, "action", "convert")
    add_columns_args(p)
    add_on_invalid(p, "records", "convert the rest")
    g = p.add_argument_group("pairs")
    first = len(p._actions)
    g.add_argument("--data", default=None, help="instruction data whose answers become `chosen`")
    g.add_argument("--template", default=None, help="prompt template (default: the model's saved one, else alpaca)")
    g.add_argument("--batch-size", type=ranged(int, 1), default=8, help="prompts generated together, >= 1")
    add_device(g)
    add_sampling(p, temperature=0.7, max_new_tokens=64)
    for action in p._actions[first:]:
        only_with(action, "action", "pairs")


def lines_to_rows(path: Path, instruction: str | None):
    """(where, Alpaca row) for each non-blank line: the line answers `instruction`, or is
    'instruction<TAB>response'."""
    from ..data.instructions import DATA_LIMIT_HINT
    from ..data.text import read_lines
    from ..fileio import MAX_DATA_FILE, check_size

    if instruction is not None and not instruction.strip():
        raise UserError("--instruction is empty: give the instruction every line answers")
    check_size(path, "data file", MAX_DATA_FILE, DATA_LIMIT_HINT)
    for n, line in read_lines(path):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if instruction is None and "\t" not in line:
            yield f"{path}:{n}", UserError("expected 'instruction<TAB>response' (or pass --instruction)")
            continue
        left, right = (instruction, line) if instruction is not None else line.split("\t", 1)
        yield f"{path}:{n}", {"instruction": left.strip(), "input": "", "output": right.strip()}


def run(args):
    from ..data.instructions import load_records, record_to_row, validate_rows
    from ..fileio import check_writable, write_user_file

    inputs = {"the input": args.input, "--data": args.data, "--template": args.template}
    out = check_writable(args.out, overwrite=args.overwrite, inputs=inputs, what="--out")  # before any work
    if args.action == "pairs":
        return run_pairs(args, inputs)
    if args.source not in (*FORMATS, "lines"):
        raise UserError(f"--from must be one of {', '.join(FORMATS)}, lines; not {args.source!r}")
    if args.source == "lines":
        refuse_given(args, {"columns", "split"}, "with --from lines (a line has no fields, a file no splits)")
        records, rejected = validate_rows(lines_to_rows(Path(args.input), args.instruction), "alpaca",
                                          args.on_invalid, args.input)
    else:
        records, rejected = load_records(args.input, args.source, args.split, parse_columns(args.columns),
                                         args.on_invalid)
    report_skipped(rejected)
    rows, left_out = [], []
    for record in records:
        try:
            rows.append(record_to_row(record, args.to))
        except UserError as e:  # a record --to cannot hold: one more invalid record
            if args.on_invalid != "skip":
                raise
            left_out.append(str(e))
    if not rows:
        raise UserError(f"{args.input}: no record can be written --to {args.to} ({left_out[0]})")
    if out.suffix == ".json":
        text = json.dumps(rows, indent=2, ensure_ascii=False)
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    write_user_file(out, text, overwrite=args.overwrite, inputs=inputs, what="--out")
    print(f"wrote {len(rows)} records to {out}" + (f"; left out {len(left_out)} that --to {args.to} cannot hold "
                                                   f"(first: {left_out[0]})" if left_out else ""))
    return 0


def report_skipped(rejected: list[dict]) -> None:
    """--on-invalid skip: how many records were left out and why (the first few), on stderr."""
    if rejected:
        import sys

        from ..data.instructions import listed_reasons

        print(f"left out {len(rejected)} invalid record(s): {listed_reasons(rejected, 3)}", file=sys.stderr)


def run_pairs(args, inputs: dict) -> int:
    """data pairs MODEL --data SFT_FILE --out PREFS (see objectives_pref.on_policy_pairs)."""
    from ..data.instructions import load_records
    from ..fileio import write_user_file
    from ..objectives_pref import on_policy_pairs
    from ..templates import pick_template

    if not args.data:
        raise UserError("data pairs needs --data: the instruction data whose answers become `chosen`")
    records, rejected = load_records(args.data, "auto", args.split, parse_columns(args.columns), args.on_invalid)
    report_skipped(rejected)
    args.model = args.input
    loaded = load_model(args)
    model, tokenizer = loaded
    template = pick_template(args.template, loaded.template, [r.messages for r in records])
    sampling = sampling_config(args, list(template.stop))
    rows, counts = on_policy_pairs(model, tokenizer, records, template, sampling, args.batch_size)
    if not rows:  # nothing to write: say why rather than leave an empty file
        raise UserError(f"no pairs: {counts['same_answer']} answers matched the record's (or were empty) and "
                        f"{counts['too_long']} prompts left no room for --max-new-tokens {sampling.max_new_tokens}")
    write_user_file(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    overwrite=args.overwrite, inputs={**inputs, "MODEL": loaded.source}, what="--out")
    print(f"wrote {counts['pairs']} pairs to {args.out}; {counts['same_answer']} answers matched the record's "
          f"(or were empty) and {counts['too_long']} prompts left no room for {sampling.max_new_tokens} new tokens")
    return 0
