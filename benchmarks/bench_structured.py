"""Constrained vs free decoding on the GPT-2 124M architecture (random weights): the same prompts,
greedy, batch 1 and 8, alternating rounds in one run; prints tokens/s (best and median) of both and
the per-token overhead of decoding under a JSON schema.

    python -m benchmarks.bench_structured [--rounds 3] [--new-tokens 64] [--batch 1 8]

Constrained rows may close their object before --new-tokens (the grammar ends them), so both sides
count the tokens they really generated; free rows go on past <|endoftext|> (ignore_eos).
"""
from __future__ import annotations

import json
import statistics

import torch

from benchmarks.common import alternate, decode_parser, machine, timed
from gpt2ft.config import preset
from gpt2ft.generation import SamplingConfig, complete_batch
from gpt2ft.model import GPT
from gpt2ft.sampling import GrammarSpec
from gpt2ft.tokenizer import gpt2_tokenizer

# long strings and arrays, so a random model's rows run to the budget rather than closing at once
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"]}


def main() -> None:
    p = decode_parser()
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
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
        tokens = {}

        def run(name, cfg):
            def once():
                done = []
                seconds = timed(lambda: done.extend(complete_batch(model, tokenizer, rows, cfg, batch)))
                tokens[name] = sum(c.completion_tokens for c in done)
                return tokens[name] / seconds
            return once

        candidates = {"free": run("free", free), "json_schema": run("json_schema", constrained)}
        for fn in candidates.values():  # warm-up: the grammar's compilation and the closing tiers
            fn()
        results = alternate(candidates, args.rounds)
        for name, runs in results.items():
            print(f"  batch {batch}  {name:<12} best {max(runs):8.1f}  median {statistics.median(runs):8.1f} "
                  f"tokens/s  ({tokens[name]} tokens a run; runs: {', '.join(f'{r:.1f}' for r in runs)})")
        best = max(results["free"]) / max(results["json_schema"]) - 1
        median = statistics.median(results["free"]) / statistics.median(results["json_schema"]) - 1
        print(f"  batch {batch}  per-token overhead of the schema: {100 * best:+.1f}% (best), "
              f"{100 * median:+.1f}% (median)")


if __name__ == "__main__":
    main()
