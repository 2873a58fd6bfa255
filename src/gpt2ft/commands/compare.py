"""Generate from two models with the same prompts, settings and seed, and show them side by side
(the "before vs after fine-tuning" view). Each model uses its own prompt template unless --raw.

    gpt2ft compare gpt2 runs/shakespeare --prompt "To be" --max-new-tokens 40 --out-md compare.md
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from . import add_device, add_no_verify, add_sampling


def add_args(p):
    p.add_argument("model_a", metavar="MODEL_A", help="first model (e.g. before fine-tuning)")
    p.add_argument("model_b", metavar="MODEL_B", help="second model (e.g. after)")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    p.add_argument("--prompts", default=None, metavar="FILE", help="one prompt per line")
    p.add_argument("--raw", action="store_true", help="no prompt templates")
    p.add_argument("--template", default=None,
                   help="format every prompt with this template for both models (default: each model's own)")
    p.add_argument("--out-md", default=None, help="also write a Markdown table here")
    p.add_argument("--out-json", default=None, help="also write JSON here")
    add_no_verify(p)
    add_device(p)
    add_sampling(p, temperature=0.0, max_new_tokens=50)
    p.set_defaults(seed=0)


def run(args):
    from ..checkpoint import load
    from ..generation import generate_batch
    from . import sampling_config
    from ..templates import get_template, prompt_for_generation

    prompts = list(args.prompt or [])
    if args.prompts:
        try:
            prompts += [l for l in Path(args.prompts).read_text(encoding="utf-8").splitlines() if l.strip()]
        except OSError as e:
            raise UserError(f"--prompts {args.prompts}: {e.strerror}") from None
    if not prompts:
        raise UserError("give --prompt TEXT (repeatable) or --prompts FILE")
    columns = {}
    forced = {"template": get_template(args.template)} if args.template else None
    for ref in (args.model_a, args.model_b):
        loaded = load(ref, device=args.device, dtype=args.dtype, verify=args.verify)
        model, tok = loaded
        formatted = [prompt_for_generation(forced or loaded.meta, p, args.raw) for p in prompts]
        stops = formatted[0][1]
        columns[ref] = generate_batch(model, tok, [f for f, _ in formatted], sampling_config(args, stops))
        del model, loaded
    rows = [{"prompt": p, "a": columns[args.model_a][i], "b": columns[args.model_b][i]} for i, p in enumerate(prompts)]
    for row in rows:
        print(f"=== prompt: {row['prompt']}")
        print(f"--- A ({args.model_a}):\n{row['a'].strip()}")
        print(f"--- B ({args.model_b}):\n{row['b'].strip()}\n")
    if args.out_md:
        cell = lambda s: s.strip().replace("|", "\\|").replace("\n", "<br>")
        lines = [f"| prompt | A: {args.model_a} | B: {args.model_b} |", "|---|---|---|"]
        lines += [f"| {cell(r['prompt'])} | {cell(r['a'])} | {cell(r['b'])} |" for r in rows]
        Path(args.out_md).write_text("\n".join(lines) + "\n", encoding="utf-8")
    if args.out_json:
        Path(args.out_json).write_text(json.dumps({"model_a": args.model_a, "model_b": args.model_b,
                                                   "rows": rows}, indent=2), encoding="utf-8")
    return 0
