"""Training throughput side by side, each candidate in a fresh process, alternating in one run:

  train: GPT-2 124M (random weights) -- ours vs a plain transformers loop (torch AdamW) vs HF Trainer,
         both sides in the same dtype (each of --dtype: fp32, and bf16 autocast over fp32 master
         weights); with each dtype the fraction of this machine's own matmul peak, measured here
         (the step's matrix products timed alone), and on a GPU also MFU against the H100 peak.
  sft:   the bundled instruction set -- ours vs TRL SFTTrainer (completion-only loss); and our
         half-masked step vs an unmasked one (logits only at supervised positions).
  lora:  LoRA r=8 on c_attn,c_proj vs full fine-tuning (tokens/s, peak memory) and vs HF + PEFT;
         also LoRA with activation checkpointing (ours_ckpt).

    python -m benchmarks.bench_training --suite train --rounds 5 [--dtype float32 bfloat16]
    python -m benchmarks.bench_training --suite train --rounds 5 --threads 1 --clock cpu   # per core, load-proof
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

from benchmarks.common import machine, report, run_isolated
from gpt2ft.config import GPTConfig, preset
from gpt2ft.runtime import cpu_has_fast_bf16

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM (an H200's is the same)


def measure(kinds: dict[str, dict], rounds: int) -> dict[str, list[dict]]:
    """Run each candidate `rounds` times, alternating A B C A B C."""
    out = {name: [] for name in kinds}
    for _ in range(rounds):
        for name, cfg in kinds.items():
            out[name].append(run_isolated("benchmarks.worker", cfg))
    return out


def flops_per_token(c: GPTConfig, length: int) -> float:
    """Training FLOPs per token: 6N over the N weights that multiply activations (the blocks' four
    matrices and the tied lm_head; not embeddings, biases, norms), plus the attention scores and their
    weighted sum, 12 * n_layer * n_embd * length (PaLM, appendix B; causal masking not discounted)."""
    n_matrix = c.n_layer * 12 * c.n_embd ** 2 + c.vocab_size * c.n_embd
    return 6 * n_matrix + 12 * c.n_layer * c.n_embd * length


def summary(rates: list[float]) -> str:
    return f"best {max(rates):7.1f}, median {statistics.median(rates):7.1f}"


def train_suite(base: dict, dtypes: list[str], rounds: int, gpu: bool) -> None:
    """ours vs the plain loop vs Trainer in each dtype, and the fraction of the machine's matmul peak."""
    per_token = flops_per_token(preset("gpt2"), base["length"])
    print(f"FLOPs per token (GPT-2 124M, length {base['length']}): {per_token / 1e9:.3f} G")
    for dtype in dtypes:
        print(f"\n{dtype}: load average {os.getloadavg()[0]:.1f} at start")
        kinds = {k: {"kind": k, "dtype": dtype, **base} for k in ("ours", "hf_loop", "hf_trainer", "peak")}
        if not gpu:  # a reference: the plain loop with our loop's CPU allocator setting (freed_memory_kept)
            kinds["hf_loop_kept"] = {"kind": "hf_loop", "kept": True, "dtype": dtype, **base}
        else:  # our loop's --compile and the plain loop compiled (the compiles, in first steps, not timed)
            kinds["ours_compiled"] = {"kind": "ours", "compile": True, "dtype": dtype, **base}
            kinds["hf_loop_compiled"] = {"kind": "hf_loop", "compile": True, "dtype": dtype, **base}
        runs = measure(kinds, rounds)
        assert {r["dtype"] for v in runs.values() for r in v} == {dtype}, "every side must run in the same dtype"
        peak, mix = max(r["rate"] for r in runs["peak"]), max(r["mix"] for r in runs["peak"])
        rates = {k: [r["rate"] for r in v] for k, v in runs.items() if k != "peak"}
        med = report(f"training tokens/s, GPT-2 124M, {dtype} on every side", rates, "tokens/s", "hf_loop")
        hf_best = max(med["hf_loop"], med["hf_trainer"])
        print(f"  ratio ours / hf_trainer: {med['ours'] / med['hf_trainer']:.2f}x; "
              f"ours / the better of the two: {med['ours'] / hf_best:.2f}x (medians)")
        if "hf_loop_kept" in med:
            print(f"  ours / hf_loop_kept (the plain loop with our allocator setting): "
                  f"{med['ours'] / med['hf_loop_kept']:.2f}x (medians)")
        best = {k: max(v) for k, v in rates.items()}
        print("  best runs: " + ", ".join(f"{k} {v:.1f}" for k, v in best.items())
              + f"; ours / the better of hf_loop and hf_trainer: "
              f"{best['ours'] / max(best['hf_loop'], best['hf_trainer']):.2f}x")
        peaks = ", ".join(f"{r['rate'] / 1e9:.0f}" for r in runs["peak"])
        print(f"  {dtype} matmul peak of this machine, the step's shapes: best shape {peak / 1e9:.0f} GFLOP/s, "
              f"the step's mix {mix / 1e9:.0f} GFLOP/s (runs: {peaks})")
        for name, values in rates.items():
            frac = [v * per_token / peak for v in values]
            print(f"  {name:<12} {summary(values)} tokens/s = {100 * max(frac):.0f}% (best) / "
                  f"{100 * statistics.median(frac):.0f}% (median) of the peak, "
                  f"{100 * statistics.median(values) * per_token / mix:.0f}% of the step's mix (median)")
        if gpu:
            for name in ("ours", "ours_compiled", "hf_loop", "hf_loop_compiled", "hf_trainer"):
                mfu = med[name] * per_token / H100_BF16_PEAK
                print(f"  MFU {name:<16} (H100/H200 dense bf16 peak {H100_BF16_PEAK / 1e12:.0f} TFLOP/s): "
                      f"{100 * mfu:.1f}% (median)")
            hf_top = max(("hf_loop", "hf_loop_compiled", "hf_trainer"), key=med.get)
            print(f"  ours_compiled / transformers' best setting here ({hf_top}): "
                  f"{med['ours_compiled'] / med[hf_top]:.2f}x (medians)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--suite", default="all", choices=["train", "sft", "lora", "all"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16"], default=None,
                   help="compute dtypes of the train suite (default: bfloat16 on a GPU; float32 and, on a CPU "
                        "with AMX or AVX512-BF16, bfloat16 too)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every candidate (default: torch's)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time steps in wall seconds, or in each process's CPU seconds (with --threads 1: a "
                        "per-core rate that other load on a shared machine barely changes)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # so the machine line names the candidates' threads
    gpu = torch.cuda.is_available()
    dtypes = args.dtype or (["bfloat16"] if gpu else ["float32"] + (["bfloat16"] if cpu_has_fast_bf16() else []))
    batch, length = (16, 1024) if gpu else (4, 256)
    base = {"steps": args.steps, "batch": batch, "length": length, "threads": args.threads, "clock": args.clock}
    print(f"machine: {machine()}; batch {batch} x {length} tokens, {args.steps} steps per run (first one not timed); "
          f"threads {args.threads or 'default'}, {args.clock} clock; load average {os.getloadavg()[0]:.1f} at start")

    if args.suite in ("train", "all"):
        train_suite(base, dtypes, args.rounds, gpu)

    if args.suite in ("sft", "all"):
        sft = {"steps": args.steps, "batch": 8, "length": 256}
        runs = measure({"ours": {"kind": "ours_sft", **sft}, "trl_sft": {"kind": "trl_sft", **sft}}, args.rounds)
        report("SFT examples/s, GPT-2 124M, bundled instruction set, batch 8", {k: [r["rate"] for r in v]
                                                                               for k, v in runs.items()},
               "examples/s", "trl_sft")
        runs = measure({"ours": {"kind": "ours", **base, "masked": 0.5},
                        "unmasked": {"kind": "ours", **base}}, args.rounds)
        report("our step with half the labels masked vs none (tokens/s)", {k: [r["rate"] for r in v]
                                                                         for k, v in runs.items()},
               "tokens/s", "unmasked")

    if args.suite in ("lora", "all"):
        runs = measure({"ours": {"kind": "ours_lora", **base}, "ours_full": {"kind": "ours", **base},
                        "hf_peft": {"kind": "hf_peft", **base},
                        "ours_ckpt": {"kind": "ours_lora", "checkpointing": True, **base}}, args.rounds)
        rates = {k: [r["rate"] for r in v] for k, v in runs.items()}
        med = report("LoRA r=8 training tokens/s, GPT-2 124M", rates, "tokens/s", "hf_peft")
        mem = {k: min(r["peak_mb"] for r in v) for k, v in runs.items()}
        kind = "max allocated (GPU)" if gpu else "peak RSS"
        print(f"  peak memory ({kind}): " + ", ".join(f"{k} {v:.0f} MiB" for k, v in mem.items()))
        print(f"  LoRA peak memory / full fine-tuning: {mem['ours'] / mem['ours_full']:.2f} "
              f"({mem['ours_ckpt'] / mem['ours_full']:.2f} with --gradient-checkpointing); "
              f"LoRA tokens/s vs full: {med['ours'] / med['ours_full']:.2f}x "
              f"({med['ours_ckpt'] / med['ours_full']:.2f}x with checkpointing)")


if __name__ == "__main__":
    main()
