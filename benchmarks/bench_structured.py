"""Constrained vs free decoding on the GPT-2 124M architecture (random weights): the same prompts,
greedy, batch 1 and 8, alternating rounds in one run; prints tokens/s (best and median) of both and
the per-token overhead of decoding under a JSON schema.

    python -m benchmarks.bench_structured [--rounds 5] [--new-tokens 64] [--batch 1 8] [--dtype auto]

Two figures per side. "per token": the engine's steps while every row of the batch is still running
(so both sides decode the same number of rows per step: the cost of a constrained token against a free
one). "end to end": the whole completions, each side counting the tokens it really generated (a
constrained row ends when its object is complete, so its batch thins out at the end).
"""
from __future__ import annotations

import json
import statistics
import time

import torch

from benchmarks.common import alternate, decode_parser, machine, sync
from gpt2ft.config import preset
from gpt2ft.generation import Engine, SamplingConfig
from gpt2ft.model import GPT
from gpt2ft.runtime import inference_dtype, resolve_device
from gpt2ft.sampling import GrammarSpec
from gpt2ft.tokenizer import gpt2_tokenizer

# long strings and arrays, so a random model's rows run long rather than closing at once
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"]}


def run_batch(model, tokenizer, rows, cfg) -> tuple[float, float, int]:
    """(tokens/s while every row runs, tokens/s end to end, steps with every row running) of one batch."""
    engine = Engine(model, tokenizer, max_batch=len(rows))
    completions = [engine.add(r, cfg) for r in rows]
    engine.step()  # the prefill and the first tokens, outside the per-token figure
    sync()
    start = time.perf_counter()
    steps, full = 0, None
    while engine.has_work:
        engine.step()
        steps += 1
        if full is None and any(c.finished for c in completions):
            sync()
            full = (steps * len(rows), time.perf_counter() - start)
    sync()
    seconds = time.perf_counter() - start
    total = sum(c.completion_tokens for c in completions) - len(rows)
    full = full or (total, seconds)
    return full[0] / full[1], total / seconds, full[0] // len(rows)


def main() -> None:
    p = decode_parser()
    p.add_argument("--dtype", default="auto", help="auto (as gpt2ft's verbs pick it)|float32|bfloat16")
    p.set_defaults(rounds=5)
    args = p.parse_args()
    device = resolve_device("auto")
    dtype, _ = inference_dtype(args.dtype, device)
    torch.manual_seed(0)
    model = GPT(preset("gpt2", dropout=0.0)).to(device, dtype).eval()
    tokenizer = gpt2_tokenizer()
    free = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    constrained = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0,
                                 grammar=GrammarSpec.json_schema(json.dumps(SCHEMA)))
    print(f"\nstructured decoding, GPT-2 124M (random weights), {args.prompt_tokens}+{args.new_tokens} tokens, "
          f"greedy, {str(dtype).removeprefix('torch.')}, {args.rounds} rounds ({machine()})")
    for batch in args.batch:
        rows = torch.randint(0, 50257, (batch, args.prompt_tokens)).tolist()
        end_to_end = {"free": [], "json_schema": []}
        steps = {"free": [], "json_schema": []}

        def run(name, cfg):
            def once():
                per_token, whole, full = run_batch(model, tokenizer, rows, cfg)
                end_to_end[name].append(whole)
                steps[name].append(full)
                return per_token
            return once

        candidates = {"free": run("free", free), "json_schema": run("json_schema", constrained)}
        for fn in candidates.values():  # warm-up: the grammar's compilation and the closing tiers
            fn()
        end_to_end = {"free": [], "json_schema": []}
        steps = {"free": [], "json_schema": []}
        results = alternate(candidates, args.rounds)
        print(f"  batch {batch}  steps with every row running, per run: free {steps['free']}, "
              f"json_schema {steps['json_schema']}")
        for label, figures in (("per token", results), ("end to end", end_to_end)):
            for name, runs in figures.items():
                print(f"  batch {batch}  {label:<10}  {name:<12} best {max(runs):8.1f}  median "
                      f"{statistics.median(runs):8.1f} tokens/s  (runs: {', '.join(f'{r:.1f}' for r in runs)})")
            best = max(figures["free"]) / max(figures["json_schema"]) - 1
            median = statistics.median(figures["free"]) / statistics.median(figures["json_schema"]) - 1
            print(f"  batch {batch}  {label:<10}  overhead of the schema per token: {100 * best:+.1f}% (best), "
                  f"{100 * median:+.1f}% (median)")


if __name__ == "__main__":
    main()
