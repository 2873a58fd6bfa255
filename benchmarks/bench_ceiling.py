"""The decode ceiling on this machine: the GPT-2 model's own linear layers alone (the four of each
block and lm_head, same shapes and dtype), one decode step's worth at batch B, as tokens/s, on the GPU
where there is one. Decoding can go no faster than its matrix products; bench_generate prints ours as a
fraction of this.

    python -m benchmarks.bench_ceiling [--model gpt2] [--batch 1 8 32] [--dtype float32 bfloat16] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import machine, sync
from gpt2ft.config import preset
from gpt2ft.model import Linear
from gpt2ft.runtime import cpu_has_fast_bf16


def linear_shapes(cfg) -> list[tuple[int, int]]:
    """(out, in) of every linear layer one decode step runs, in order."""
    d = cfg.n_embd
    return [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * cfg.n_layer + [(cfg.vocab_size, d)]


def ceiling_tokens_per_s(cfg, batch: int, dtype: torch.dtype, rounds: int = 5, steps: int = 20,
                         device: torch.device | str = "cpu") -> list[float]:
    """Tokens/s of `steps` decode steps' matrix products at `batch` rows, for each of `rounds` runs, through
    the model's own linear layer (gpt2ft.model.Linear: in bf16 on a CPU, a weight packed once for oneDNN,
    the fastest way this torch multiplies it; plain F.linear repacks it at every call). On a GPU one
    step's products replay as one CUDA graph, so kernel launches from Python do not set the bound."""
    device = torch.device(device)
    torch.manual_seed(0)
    layers = [Linear(i, o, bias=False).to(device, dtype).requires_grad_(False) for o, i in linear_shapes(cfg)]
    x = {i: torch.randn(batch, i, dtype=dtype, device=device) for _, i in linear_shapes(cfg)}

    def one_step():
        for layer in layers:
            layer(x[layer.in_features])

    if device.type == "cuda":
        with torch.no_grad():
            one_step()  # cuBLAS picks its kernels outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                one_step()
        one_step = graph.replay
    out = []
    with torch.no_grad():
        for r in range(rounds + 1):
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                one_step()
            sync()
            if r:  # the first run warms up (and packs the weights)
                out.append(batch * steps / (time.perf_counter() - start))
    return out


def ceiling(cfg, batch: int, dtype: torch.dtype, rounds: int = 5) -> float:
    """The best (uncontended) ceiling in tokens/s."""
    return max(ceiling_tokens_per_s(cfg, batch, dtype, rounds))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gpt2")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--dtype", nargs="+", default=None, help="default: float32, and bfloat16 where the CPU has it")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = args.dtype or (["float32", "bfloat16"] if device.type == "cuda" or cpu_has_fast_bf16() else ["float32"])
    cfg = preset(args.model)
    print(f"linear-layer ceiling of {args.model} decode ({machine()})")
    for name in dtypes:
        for batch in args.batch:
            runs = ceiling_tokens_per_s(cfg, batch, getattr(torch, name), args.rounds, device=device)
            print(f"  {name:<9} batch {batch:>3}: best {max(runs):8.1f} tok/s, median {statistics.median(runs):8.1f}")


if __name__ == "__main__":
    main()
