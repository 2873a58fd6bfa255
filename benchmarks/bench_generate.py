"""Decode throughput for the GPT-2 124M architecture (random weights), side by side in one run: gpt2ft's
engine, HF `generate` in the same dtype, and the ceiling (the model's own linear layers alone, same
shapes and dtype: see bench_ceiling); optionally our compiled step (--compile) and int8 weights (--int8).
Same weights, prompts and greedy settings; candidates alternate for --rounds rounds; prints best and
median tokens/s, ours as a fraction of the ceiling, ratios to HF, and checks that the compiled and eager
steps give the same tokens. Ours is timed end to end (prompt included, as HF's generate) and over its
decode steps alone (after the first token), which is what the ceiling bounds.

    python -m benchmarks.bench_generate [--rounds 5] [--batch 1 8] [--dtype float32 bfloat16] [--compile] [--int8]
"""
from __future__ import annotations

import copy
import statistics
import time

import torch

from benchmarks.bench_ceiling import ceiling_tokens_per_s
from benchmarks.common import alternate, decode_parser, machine, sync, timed
from gpt2ft.checkpoint import load_hf_state_dict
from gpt2ft.config import preset
from gpt2ft.generation import Engine, SamplingConfig
from gpt2ft.model import GPT
from gpt2ft.quantize import quantize_model
from gpt2ft.runtime import cpu_has_fast_bf16
from gpt2ft.tokenizer import gpt2_tokenizer


def models(device, dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(attn_implementation="sdpa")).eval()
    ours = GPT(preset("gpt2", dropout=0.0))
    load_hf_state_dict(ours, hf.state_dict(), "HF model")
    return hf.to(device, dtype), ours.to(device, dtype).eval()


def decode(model, tokenizer, rows, cfg, compile=False) -> tuple[float, float, list]:
    """(end-to-end seconds, seconds of the decode steps after the first token, token ids) of one batch."""
    engine = Engine(model, tokenizer, max_batch=len(rows), compile=compile)
    completions = [engine.add(r, cfg) for r in rows]
    sync()
    start = time.perf_counter()
    engine.step()  # the prefill and the first token of every row
    sync()
    first = time.perf_counter()
    while engine.has_work:
        engine.step()
    sync()
    end = time.perf_counter()
    return end - start, end - first, [c.token_ids for c in completions]


def candidates(args, hf, ours, int8, batch, prompt, cfg, tokenizer, steady):
    """Each candidate's tokens/s end to end (prompt included, as HF's generate); ours also record their
    decode-only tokens/s in `steady` (what the ceiling bounds), and their tokens in `outputs`."""
    rows, n = prompt.tolist(), batch * args.new_tokens
    outputs = {}

    def ours_fn(model, compile=False, name="ours"):
        def run():
            seconds, decoding, outputs[name] = decode(model, tokenizer, rows, cfg, compile)
            steady.setdefault(name, []).append(batch * (args.new_tokens - 1) / decoding)
            return n / seconds
        return run

    def hf_fn(**settings):
        def run():
            with torch.inference_mode():
                return n / timed(lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                                     max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                                     pad_token_id=50256, **settings))
        return run

    dtype = next(ours.parameters()).dtype
    found = {"ours": ours_fn(ours), "hf_generate": hf_fn(),
             "ceiling": lambda: ceiling_tokens_per_s(preset("gpt2"), batch, dtype, rounds=1, steps=10,
                                                     device=prompt.device)[0]}
    if prompt.device.type == "cuda":  # HF's fastest GPU setting: a static cache, its forward auto-compiled
        found["hf_static"] = hf_fn(cache_implementation="static")
    if args.compile:
        found["ours_compiled"] = ours_fn(ours, compile=True, name="ours_compiled")
    if int8 is not None:
        found["ours_int8"] = ours_fn(int8, name="ours_int8")
    return found, outputs


def report(title, results, steady, outputs):
    print(f"\n{title} ({machine()})")
    for label, figures in (("end to end", results), ("decode only", steady)):
        for name, runs in figures.items():
            print(f"  {label:<11}  {name:<14} best {max(runs):8.1f}  median {statistics.median(runs):8.1f} tokens/s  "
                  f"(runs: {', '.join(f'{r:.1f}' for r in runs)})")
    best = {k: max(v) for k, v in results.items()}
    median = {k: statistics.median(v) for k, v in results.items()}
    hf = max((k for k in results if k.startswith("hf_")), key=median.get)  # HF's best setting here
    ceiling = results["ceiling"]
    for name, runs in steady.items():
        print(f"  {name:<14} decode: {max(runs) / max(ceiling):.0%} of the ceiling (best), "
              f"{statistics.median(runs) / statistics.median(ceiling):.0%} (median); end to end "
              f"{best[name] / best[hf]:.2f}x {hf} (best), {median[name] / median[hf]:.2f}x (median)")
    if "ours_int8" in results:
        print(f"  int8 / ours end to end: {best['ours_int8'] / best['ours']:.2f}x (best), "
              f"{median['ours_int8'] / median['ours']:.2f}x (median); decode only: "
              f"{max(steady['ours_int8']) / max(steady['ours']):.2f}x (best)")
    if "ours_compiled" in outputs:
        same = outputs["ours_compiled"] == outputs["ours"]
        print(f"  compiled greedy tokens {'identical to' if same else 'DIFFER from'} eager")
    return best, hf


def main() -> None:
    p = decode_parser()
    p.add_argument("--dtype", nargs="+", default=None,
                   help="default: float32, and bfloat16 where the CPU multiplies it in hardware (or on a GPU)")
    p.add_argument("--compile", action="store_true", help="also time our compiled decode step")
    p.add_argument("--int8", action="store_true", help="also time our int8 weight-only model (same activations)")
    p.set_defaults(rounds=5)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fast_bf16 = device.type == "cuda" or cpu_has_fast_bf16()
    tokenizer = gpt2_tokenizer()
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    hf_best: dict[int, list] = {}
    for name in args.dtype or (["float32", "bfloat16"] if fast_bf16 else ["float32"]):
        dtype = getattr(torch, name)
        hf, ours = models(device, dtype)
        int8 = quantize_model(copy.deepcopy(ours)) if args.int8 else None
        if args.compile:  # the compile, once per process, outside the timing
            engine = Engine(ours, tokenizer, max_batch=max(args.batch), compile=True, log=print)
            engine.add([1, 2, 3], SamplingConfig(max_new_tokens=2, temperature=0.0))
            while engine.has_work:
                engine.step()
        for batch in args.batch:
            prompt = torch.randint(0, 50257, (batch, args.prompt_tokens), device=device,
                                   generator=torch.Generator(device).manual_seed(batch))
            steady: dict[str, list] = {}
            found, outputs = candidates(args, hf, ours, int8, batch, prompt, cfg, tokenizer, steady)
            for fn in found.values():  # warm-up outside the timing
                fn()
            steady.clear()
            results = alternate(found, args.rounds)
            best, hf_name = report(f"decode, GPT-2 124M, batch {batch}, {args.prompt_tokens}+{args.new_tokens} tokens, greedy, "
                          f"{name}, {args.rounds} rounds", results, steady, outputs)
            ours_name = max(("ours", "ours_compiled"), key=lambda k: best.get(k, 0))
            hf_best.setdefault(batch, []).append(((best[hf_name], f"{hf_name} {name}"),
                                                  (best[ours_name], f"{ours_name} {name}")))
    for batch, entries in hf_best.items():
        (hf_top, hf_setting), _ = max(entries)
        ours_top, ours_setting = max(e[1] for e in entries)
        print(f"\nbatch {batch}: HF's best setting here is {hf_setting} ({hf_top:.1f} tok/s); ours at its best "
              f"({ours_setting}) {ours_top:.1f} tok/s = {ours_top / hf_top:.2f}x")


if __name__ == "__main__":
    main()
