"""Shared helpers for the side-by-side benchmarks: alternating A/B timing and a ratio table."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch


def cpu_model() -> str:
    """The CPU's model name and its matrix-relevant flags (AVX-512, bf16, AMX) from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info = {k.strip(): v for k, v in (line.split(":", 1) for line in f if ":" in line)}
    except OSError:
        return platform.processor() or platform.machine()
    name = " ".join(info.get("model name", platform.machine()).split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
    flags = [f for f in wanted if f in info.get("flags", "").split()]
    return f"{name} [{' '.join(flags) or 'no AVX2'}]"


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{cpu_model()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads (torch {torch.__version__})"


def decode_parser(description: str | None = None):
    """The flags every decode benchmark takes: rounds, prompt and new tokens, batch sizes."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    return p


def alternate(candidates: dict, rounds: int) -> dict[str, list[float]]:
    """Call each candidate (a function returning a throughput) in turn, `rounds` times: A B A B ..."""
    results = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            results[name].append(fn())
    return results


def report(title: str, results: dict[str, list[float]], unit: str, baseline: str, higher_is_better: bool = True):
    """Print median per candidate and its ratio to `ours` vs the baseline."""
    print(f"\n{title} ({machine()})")
    medians = {k: statistics.median(v) for k, v in results.items()}
    width = max(map(len, medians))
    for name, value in medians.items():
        spread = f"(runs: {', '.join(f'{x:.1f}' for x in results[name])})"
        print(f"  {name:<{width}}  {value:10.1f} {unit}  {spread}")
    ours = medians["ours"]
    base = medians[baseline]
    ratio = ours / base if higher_is_better else base / ours
    print(f"  ratio ours / {baseline}: {ratio:.2f}x")
    return medians


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def run_isolated(module: str, config: dict) -> dict:
    """Run `python -m module '<json config>'` in a fresh process (clean peak memory); it prints one JSON line."""
    proc = subprocess.run([sys.executable, "-m", module, json.dumps(config)], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {config} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_memory_mb() -> float:
    """Max allocated on a GPU, else this process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
