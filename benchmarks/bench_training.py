"""Training throughput side by side, each candidate in a fresh process, alternating in one run:

  train: GPT-2 124M (random weights) -- ours vs a plain transformers loop (torch AdamW) vs HF Trainer;
         on a GPU also MFU.
  sft:   the bundled instruction set -- ours vs TRL SFTTrainer (completion-only loss); and our
         half-masked step vs an unmasked one (logits only at supervised positions).
  lora:  LoRA r=8 on c_attn,c_proj vs full fine-tuning (tokens/s, peak memory) and vs HF + PEFT;
         also LoRA with activation checkpointing (ours_ckpt).

    python -m benchmarks.bench_training --suite all [--rounds 2]
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import machine, report, run_isolated

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM


def measure(kinds: dict[str, dict], rounds: int) -> dict[str, list[dict]]:
    """Run each candidate `rounds` times, alternating A B C A B C."""
    out = {name: [] for name in kinds}
    for _ in range(rounds):
        for name, cfg in kinds.items():
            out[name].append(run_isolated("benchmarks.worker", cfg))
    return out


def flops_per_token(n_params: int, n_layer: int, n_embd: int, length: int) -> float:
    """6N for the matrices plus the attention scores (PaLM appendix B)."""
    return 6 * n_params + 12 * n_layer * n_embd * length


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--suite", default="all", choices=["train", "sft", "lora", "all"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    gpu = torch.cuda.is_available()
    batch, length = (16, 1024) if gpu else (4, 256)
    base = {"steps": args.steps, "batch": batch, "length": length}
    print(f"machine: {machine()}; batch {batch} x {length} tokens, {args.steps} steps per run (first one not timed)")

    if args.suite in ("train", "all"):
        runs = measure({"ours": {"kind": "ours", **base}, "hf_loop": {"kind": "hf_loop", **base},
                        "hf_trainer": {"kind": "hf_trainer", **base}}, args.rounds)
        rates = {k: [r["rate"] for r in v] for k, v in runs.items()}
        med = report("training tokens/s, GPT-2 124M", rates, "tokens/s", "hf_loop")
        print(f"  ratio ours / hf_trainer: {med['ours'] / med['hf_trainer']:.2f}x")
        if gpu:
            n_params = 124_439_808 - 50257 * 768 + 50257 * 768  # tied head is one matrix, used twice
            mfu = med["ours"] * flops_per_token(n_params, 12, 768, length) / H100_BF16_PEAK
            print(f"  MFU (H100 bf16 peak {H100_BF16_PEAK / 1e12:.0f} TFLOP/s): {100 * mfu:.1f}%")

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
