"""DPO training throughput and peak memory: `gpt2ft dpo`'s objective and loop vs TRL's DPOTrainer, on
the same GPT-2 124M (random weights), the bundled preference pairs (instruction-response template),
batch, max length, beta 0.1 and sigmoid loss. Each candidate runs in a fresh process (its own peak
memory), alternating A B C A B C ... for --rounds rounds in one run; prints best and median. Neither
side writes checkpoints (TRL: save_strategy "no"; ours: the run folder's save is stubbed out).

  ours      live frozen copy as the reference (the default for full fine-tuning)
  ours_pre  --precompute-reference: one pass caches the reference log-probs, training holds the policy only
  trl       DPOTrainer with a reference model (a frozen copy)

    python -m benchmarks.bench_dpo [--rounds 5] [--steps 4] [--batch 4]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine, peak_memory_mb, run_isolated

CANDIDATES = ("ours", "ours_pre", "trl")


def bench_pairs(n: int):
    from gpt2ft.data.preferences import load_pairs
    from gpt2ft.templates import get_template

    prefs = Path(__file__).resolve().parent.parent / "src" / "gpt2ft" / "assets" / "shakespeare_preferences.jsonl"
    pairs, _ = load_pairs(prefs)
    return pairs[:n], get_template("instruction-response")


def run_ours(cfg: dict) -> dict:
    """The real loop (train.train) with the DPO objective; per-step pairs/s from its metrics.jsonl."""
    from gpt2ft.config import preset
    from gpt2ft.model import GPT
    from gpt2ft.objectives_pref import FrozenCopy, Precomputed, PreferenceConfig, PreferenceOptimization
    from gpt2ft.runtime import resolve_device, resolve_dtype
    from gpt2ft.tokenizer import gpt2_tokenizer
    from gpt2ft.train import TrainConfig, run_folder, train

    run_folder.RunFolder.save = lambda self, *a, **k: self.path  # measure training, not checkpoint writes (as TRL)
    pairs, template = bench_pairs(cfg["batch"] * (cfg["steps"] + 1))
    tok = gpt2_tokenizer()
    torch.manual_seed(0)
    model = GPT(preset("gpt2", dropout=0.0))
    pre = cfg["kind"] == "ours_pre"
    reference = Precomputed(FrozenCopy(model, shared=True)) if pre else FrozenCopy(model)
    objective = PreferenceOptimization(pairs, [], tok, template, cfg["length"], PreferenceConfig("sigmoid", 0.1),
                                       reference)
    out = Path(tempfile.mkdtemp()) / "run"
    precompute_s = 0.0
    if pre:
        device = resolve_device("auto")
        start = time.perf_counter()
        objective.precompute_reference(model.to(device), out.parent / "ref.pt", device,
                                       resolve_dtype("auto", device), cfg["batch"], log=lambda m: None)
        precompute_s = time.perf_counter() - start
    tc = TrainConfig(out=str(out), max_steps=cfg["steps"], batch_size=cfg["batch"], log_every=1, eval_every=0,
                     save_every=10**9, progress=False, warmup_steps=0, lr=1e-6)
    train(model, tok, objective, tc, {}, {})
    records = [json.loads(line) for line in open(out / "metrics.jsonl") if "tokens_per_s" in line]
    seen = [0] + [r["tokens_seen"] for r in records]
    step_s = [(b - a) / r["tokens_per_s"] for a, b, r in zip(seen, seen[1:], records)]
    return {"rates": [cfg["batch"] / s for s in step_s], "precompute_s": precompute_s}


def run_trl(cfg: dict) -> dict:
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    from trl import DPOConfig, DPOTrainer

    from benchmarks.worker import _StepTimer
    from gpt2ft.tokenizer import gpt2_tokenizer

    folder = Path(tempfile.mkdtemp())
    gpt2_tokenizer().save(folder)
    hf_tok = GPT2TokenizerFast.from_pretrained(folder)
    hf_tok.pad_token = hf_tok.eos_token
    pairs, template = bench_pairs(cfg["batch"] * (cfg["steps"] + 1))
    data = Dataset.from_list([{"prompt": template.prompt(p.prompt), "chosen": p.chosen, "rejected": p.rejected}
                              for p in pairs])
    gpu = torch.cuda.is_available()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(attn_implementation="sdpa", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    timer = _StepTimer()
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=cfg["batch"], max_steps=cfg["steps"],
                     learning_rate=1e-6, beta=0.1, loss_type=["sigmoid"], max_length=cfg["length"],
                     report_to=[], save_strategy="no", logging_strategy="no", bf16=gpu, use_cpu=not gpu,
                     dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data,
                         processing_class=hf_tok, callbacks=[timer.hook()])
    trainer.train()
    return {"rates": [cfg["batch"] / t for t in timer.times], "precompute_s": 0.0}


def worker(config: dict) -> None:
    result = (run_trl if config["kind"] == "trl" else run_ours)(config)
    rates = result["rates"][1:] or result["rates"]  # the first step warms up
    print(json.dumps({"rate": statistics.median(rates), "rates": result["rates"], "peak_mb": peak_memory_mb(),
                      "precompute_s": result["precompute_s"]}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is not timed)")
    p.add_argument("--batch", type=int, default=4, help="pairs per step")
    p.add_argument("--length", type=int, default=256, help="max tokens per sequence")
    args = p.parse_args()
    base = {"steps": args.steps, "batch": args.batch, "length": args.length}
    print(f"machine: {machine()}; GPT-2 124M, {args.batch} pairs per step, max length {args.length}, "
          f"{args.steps} steps per run, {args.rounds} rounds alternating {' '.join(CANDIDATES)}", flush=True)
    runs = {name: [] for name in CANDIDATES}
    for r in range(args.rounds):
        for name in CANDIDATES:
            runs[name].append(run_isolated("benchmarks.bench_dpo", {"kind": name, **base}))
            print(f"  round {r + 1} {name}: {runs[name][-1]['rate']:.2f} pairs/s, "
                  f"peak {runs[name][-1]['peak_mb']:.0f} MiB", flush=True)
    kind = "max allocated (GPU)" if torch.cuda.is_available() else "peak RSS"
    print(f"\nDPO pairs/s and peak memory ({kind}), best / median of {args.rounds} runs:")
    med = {}
    for name, rs in runs.items():
        rates, mems = [x["rate"] for x in rs], [x["peak_mb"] for x in rs]
        med[name] = (statistics.median(rates), statistics.median(mems))
        extra = f", reference precompute {statistics.median(x['precompute_s'] for x in rs):.1f} s" \
            if name == "ours_pre" else ""
        print(f"  {name:<9} {max(rates):6.2f} / {med[name][0]:6.2f} pairs/s   "
              f"{min(mems):7.0f} / {med[name][1]:7.0f} MiB{extra}")
    for name in ("ours", "ours_pre"):
        print(f"  {name} / trl: {med[name][0] / med['trl'][0]:.2f}x pairs/s, {med[name][1] / med['trl'][1]:.2f}x memory")


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):
        worker(json.loads(sys.argv[1]))
    else:
        main()
