"""Score a model on instruction data: generate a response per record (batched, greedy by default)
and report exact match, BLEU (sacrebleu), ROUGE-1/2/L (rouge-score), length ratio, keyword presence
and the perplexity of the reference responses. Writes responses.jsonl and summary.json. A plain
text file (.txt, .md) gives its perplexity instead. --data may be an SFT run folder: its test split.
Preference data (chosen/rejected pairs, or a DPO run folder) gives preference accuracy and the mean
margin: by DPO's implicit reward against --reference (default: a DPO checkpoint's own reference), else
by likelihood (log p(chosen) > log p(rejected)).

    gpt2ft eval runs/demo/sft --data runs/demo/sft --out runs/demo/eval
    gpt2ft eval gpt2 --data shakespeare.txt
    gpt2ft eval runs/demo/dpo --data runs/demo/dpo
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..argtypes import ranged
from ..errors import UserError
from . import (add_common, add_instruction_data_args, add_keyword, add_sampling, load_model, parse_columns,
               refuse_given, sampling_config)


def add_args(p):
    add_common(p)
    add_instruction_data_args(p, "score the rest")
    p.add_argument("--out", default=None, metavar="REPORT_DIR",
                   help="write responses.jsonl and summary.json here (a new or empty folder, or one eval made)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out that eval did not make (never one holding a responses.jsonl, "
                        "summary.json or pairs.jsonl of yours, nor one that is or holds the MODEL or --data)")
    add_keyword(p)
    p.add_argument("--batch-size", type=ranged(int, 1), default=8, help="prompts generated together, >= 1")
    p.add_argument("--max-examples", type=ranged(int, 1), default=None,
                   help="evaluate only the first N records, >= 1 (default: all)")
    add_sampling(p, temperature=0.0, max_new_tokens=128)
    g = p.add_argument_group("preference data (--data with chosen/rejected pairs)")
    g.add_argument("--reference", default=None, metavar="MODEL",
                   help="score by DPO's implicit reward against MODEL (default: a DPO checkpoint's own reference)")
    g.add_argument("--beta", type=ranged(float, 0, lo_open=True), default=None,
                   help="implicit reward scale, > 0 (default: the DPO run's)")


REPORT_FILES = ("responses.jsonl", "summary.json", "pairs.jsonl")  # what eval writes into --out


def run(args):
    from ..fileio import output_dir

    data = Path(args.data)
    if not args.out:
        return _evaluate(args, data, None)
    inputs = {"MODEL": args.model, "--data": args.data, "--lora": args.lora, "--reference": args.reference,
              "--template": args.template}
    with output_dir(args.out, "gpt2ft eval", overwrite=args.overwrite, files=REPORT_FILES, inputs=inputs) as out:
        return _evaluate(args, data, out)


def _evaluate(args, data: Path, out: Path | None):
    from ..data.instructions import load_records
    from ..data.preferences import is_preference_data
    from ..evaluate import evaluate_records
    from ..sampling import OPTIONS
    from ..templates import pick_template

    generation = {opt.name for opt in OPTIONS.values() if opt.flag} | {"keyword"}
    if data.suffix in (".txt", ".md"):
        refuse_given(args, generation | {"batch_size", "max_examples", "template", "format", "columns", "split",
                                         "on_invalid", "reference", "beta"}, f"on plain text ({data}: perplexity only)")
        return run_text(args, data, out)
    if data.is_dir():
        if not (data / "splits" / "test.jsonl").exists():
            raise UserError(f"{data}: a folder given to --data must be an SFT or DPO run with splits/test.jsonl")
        data = data / "splits" / "test.jsonl"
        if data.stat().st_size == 0:
            raise UserError(f"{data} is empty (the run held out no test records: --test-fraction 0, or too few "
                            "records for one); pass a data file")
    source = args.data if str(args.data).startswith("hf:") else data
    if is_preference_data(source):
        refuse_given(args, generation | {"format"}, f"on preference data ({data}: pairs are scored, not generated)")
        return run_preferences(args, source, out)
    refuse_given(args, {"reference", "beta"}, f"on instruction records ({data}); they score chosen/rejected pairs")
    # an empty instruction is a prompt too: the template's frame alone (or, bare, <|endoftext|>)
    records, rejected = load_records(source, args.format, args.split, parse_columns(args.columns), args.on_invalid,
                                     empty_instruction=True)
    records = records[: args.max_examples] if args.max_examples else records
    loaded = load_model(args)
    model, tokenizer = loaded
    template = pick_template(args.template, loaded.template, [r.messages[:-1] for r in records])
    sampling = sampling_config(args, list(template.stop))
    # --max-new-tokens left at its default: a reply gets what its prompt leaves of a small model's context
    shrink = "max_new_tokens" not in args._given and sampling.max_new_tokens >= model.config.block_size
    if shrink:
        print(f"note: the default --max-new-tokens {sampling.max_new_tokens} does not fit this model's context of "
              f"{model.config.block_size} tokens: each reply gets what its prompt leaves of it", file=sys.stderr)
    rows, summary = evaluate_records(model, tokenizer, records, template, sampling, args.keyword, args.batch_size,
                                     shrink=shrink, progress="eval")
    where = str(data) if str(data).startswith("hf:") else str(data.resolve())
    summary.update(**_evaluated(args, loaded.ref), data=where, rejected=len(rejected), template=template.name)
    return _report(summary, out, "responses.jsonl", rows)


def run_text(args, data: Path, out: Path | None) -> int:
    """A plain text file: its perplexity (the text is read whole, so its size is bounded)."""
    from ..data.text import read_lines
    from ..evaluate import text_perplexity
    from ..fileio import MAX_DATA_FILE, check_size

    check_size(data, "text file to score", MAX_DATA_FILE, "score a part of it")
    text = "".join(line for _, line in read_lines(data))
    if not text.strip():
        raise UserError(f"{data} is empty: there is no text to score")
    loaded = load_model(args)
    ppl, n = text_perplexity(*loaded, text)
    if n == 0:
        raise UserError(f"{data} is a single token: perplexity needs at least two")
    summary = {"perplexity": ppl, "tokens": n, **_evaluated(args, loaded.ref), "data": str(data.resolve())}
    return _report(summary, out)


def run_preferences(args, source, out: Path | None) -> int:
    """Chosen/rejected pairs: preference accuracy and mean margin (see objectives_pref.evaluate_preferences)."""
    from ..data.preferences import load_pairs
    from ..objectives_pref import evaluate_preferences

    pairs, rejected = load_pairs(source, args.split, parse_columns(args.columns), args.on_invalid)
    pairs = pairs[: args.max_examples] if args.max_examples else pairs
    loaded = load_model(args)
    rows, summary = evaluate_preferences(loaded, pairs, args.template, args.reference, args.beta, args.batch_size)
    summary.update(**_evaluated(args, loaded.ref), data=str(source), rejected=len(rejected))
    return _report(summary, out, "pairs.jsonl", rows)


def _evaluated(args, ref: str) -> dict:
    """What was evaluated, for summary.json: the model, and the --lora adapter on it when one was given."""
    return {"model": ref, **({"adapter": str(args.lora)} if getattr(args, "lora", None) else {})}


def _report(summary: dict, out: Path | None, rows_file: str | None = None, rows: list | None = None) -> int:
    """Print the summary; with --out, write it (and the per-example rows) there."""
    from ..fileio import atomic_write_text

    _print_table(summary)
    if out:
        if rows_file:
            atomic_write_text(out / rows_file, "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        if rows_file:
            print(f"wrote {out / rows_file} and {out / 'summary.json'}")
    return 0


def _print_table(summary: dict) -> None:
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")
