"""Generate from two models with the same prompts, settings and seed, and show them side by side
(the "before vs after fine-tuning" view). Each model uses its own prompt template unless --raw.

    gpt2ft compare gpt2 runs/shakespeare --prompt "To be" --max-new-tokens 40 --out-md compare.md
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from . import add_device, add_no_verify, add_sampling, inference_device, refuse_given


def add_args(p):
    p.add_argument("model_a", metavar="MODEL_A", help="first model (e.g. before fine-tuning)")
    p.add_argument("model_b", metavar="MODEL_B", help="second model (e.g. after)")
    p.add_argument("--prompt", action="append", default=None,
                   help='a prompt (repeatable); --prompt "" generates unconditionally (from <|endoftext|>) '
                        "unless a template frames it")
    p.add_argument("--prompts", default=None, metavar="FILE", help="one prompt per line (blank lines are skipped)")
    framing = p.add_mutually_exclusive_group()  # a template with --raw would be dropped unsaid
    framing.add_argument("--raw", action="store_true", help="no prompt templates")
    framing.add_argument("--template", default=None,
                   help="format every prompt with this template for both models (default: each model's own)")
    p.add_argument("--out-md", default=None, help="also write a Markdown table here (a new file, never one of yours)")
    p.add_argument("--out-json", default=None, help="also write JSON here (a new file, never one of yours)")
    p.add_argument("--overwrite", action="store_true", help="replace --out-md/--out-json files gpt2ft wrote earlier")
    add_no_verify(p)
    add_device(p)
    add_sampling(p, temperature=0.0, max_new_tokens=50)
    p.set_defaults(seed=0)


def run(args):
    from ..checkpoint import load
    from ..fileio import write_user_file
    from ..generation import generate_batch
    from ..templates import get_template, prompt_for_generation
    from . import sampling_config

    prompts = read_prompts(args)
    outputs = check_outputs(args)  # before any model loads
    columns = {}
    forced = {"template": get_template(args.template)} if args.template else None
    device, dtype = inference_device(args)
    for ref in (args.model_a, args.model_b):
        loaded = load(ref, device=device, dtype=dtype, verify=args.verify)
        model, tok = loaded
        formatted = [prompt_for_generation(forced or loaded.meta, p, args.raw) for p in prompts]
        stops = formatted[0][1]
        columns[ref] = generate_batch(model, tok, [f for f, _ in formatted], sampling_config(args, stops))
        del model, loaded
    rows = [{"prompt": p, "a": columns[args.model_a][i], "b": columns[args.model_b][i]} for i, p in enumerate(prompts)]
    for row in rows:
        print(f"=== prompt: {row['prompt'] or '(empty)'}")
        print(f"--- A ({args.model_a}):\n{row['a'].strip()}")
        print(f"--- B ({args.model_b}):\n{row['b'].strip()}\n")
    texts = {"--out-md": markdown(args, rows),
             "--out-json": json.dumps({"model_a": args.model_a, "model_b": args.model_b, "rows": rows}, indent=2)}
    for flag, path in outputs.items():
        write_user_file(path, texts[flag], overwrite=args.overwrite, inputs=_inputs(args), what=flag)
    return 0


def read_prompts(args) -> list[str]:
    """--prompt values as given ("" is an empty prompt), then the non-blank lines of --prompts FILE."""
    from ..data.text import read_lines
    from ..fileio import MAX_USER_FILE, check_size

    prompts = list(args.prompt or [])
    if args.prompts:
        if not Path(args.prompts).is_file():
            what = ("is a folder: name a file of prompts" if Path(args.prompts).is_dir() else
                    "is not a regular file (a device or a pipe)" if Path(args.prompts).exists() else "no such file")
            raise UserError(f"--prompts {args.prompts}: {what}")
        check_size(args.prompts, "prompts file", MAX_USER_FILE)
        prompts += [line.strip("\n") for _, line in read_lines(Path(args.prompts)) if line.strip()]
        if not prompts:
            raise UserError(f"--prompts {args.prompts}: no prompts in it (one per line; blank lines are skipped)")
    if not prompts:
        raise UserError('give --prompt TEXT (repeatable) or --prompts FILE (--prompt "" for unconditional text)')
    return prompts


def _inputs(args) -> dict:
    return {"--prompts": args.prompts, "MODEL_A": args.model_a, "MODEL_B": args.model_b, "--template": args.template}


def check_outputs(args) -> dict[str, Path]:
    """{flag: path} of the output files asked for, each checked by the guarded writer; they must differ."""
    from ..fileio import check_writable

    outputs = {flag: check_writable(path, overwrite=args.overwrite, inputs=_inputs(args), what=flag)
               for flag, path in (("--out-md", args.out_md), ("--out-json", args.out_json)) if path}
    if not outputs:
        refuse_given(args, {"overwrite"}, "without --out-md or --out-json (nothing is written)")
    if len(outputs) == 2 and Path(args.out_md).absolute() == Path(args.out_json).absolute():
        raise UserError(f"--out-md and --out-json both name {args.out_md}: give two files")
    return outputs


def markdown(args, rows: list[dict]) -> str:
    cell = lambda s: s.strip().replace("|", "\\|").replace("\n", "<br>")
    lines = [f"| prompt | A: {args.model_a} | B: {args.model_b} |", "|---|---|---|"]
    lines += [f"| {cell(r['prompt'])} | {cell(r['a'])} | {cell(r['b'])} |" for r in rows]
    return "\n".join(lines) + "\n"
