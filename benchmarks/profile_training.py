"""Where one training step of GPT-2 124M goes: torch.profiler over our step (the loop's own pieces:
autocast, the chunked cross-entropy, clipping, fused AdamW), self time per op grouped into kinds,
the matrix products' GFLOP/s, and page faults per step.

    python -m benchmarks.profile_training --dtype bfloat16 --batch 4 [--top 25]
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from benchmarks.common import machine
from gpt2ft.config import preset
from gpt2ft.losses import masked_lm_loss_sum
from gpt2ft.model import GPT
from gpt2ft.runtime import freed_memory_kept
from gpt2ft.train import TrainConfig
from gpt2ft.train.loop import _autocast, make_optimizer

KINDS = {  # op name -> kind; anything else is "other"
    "aten::mm": "matmul", "aten::addmm": "matmul", "aten::bmm": "attention", "aten::baddbmm": "attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward": "attention",
    "aten::_fused_adamw_": "optimizer", "aten::copy_": "dtype casts and copies", "aten::_to_copy": "dtype casts and copies",
    "aten::native_layer_norm": "layer norm", "aten::native_layer_norm_backward": "layer norm",
    "aten::_softmax": "softmax (attention, cross-entropy)", "aten::_softmax_backward_data": "attention",
    "aten::amax": "cross-entropy elementwise", "aten::masked_fill_": "attention",
    "aten::fill_": "fills", "aten::zero_": "fills", "aten::gelu": "gelu", "aten::gelu_backward": "gelu",
    "aten::embedding_dense_backward": "embedding backward", "aten::index_add_": "embedding backward",
    "aten::linalg_vector_norm": "grad clipping", "aten::_foreach_norm": "grad clipping",
    "aten::_foreach_mul_": "grad clipping",
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--default-allocator", action="store_true",
                   help="glibc's own large-buffer handling, not the loop's freed_memory_kept()")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with freed_memory_kept(not args.default_allocator):
        profile(args)


def profile(args) -> None:
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = GPT(preset("gpt2", dropout=0.0))
    optimizer = make_optimizer(model, TrainConfig(out="unused", lr=1e-4))  # lr unset is derived by the loop
    autocast = _autocast(torch.device("cpu"), dtype)
    x = torch.randint(0, model.config.vocab_size, (args.batch, args.length + 1))
    batch = {"input_ids": x[:, :-1], "labels": x[:, 1:]}

    def step():
        with autocast():
            loss, n = masked_lm_loss_sum(model, batch)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    step()
    wall = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True) as prof:
        step()
    events = prof.key_averages()
    print(f"{machine()}; GPT-2 124M, batch {args.batch} x {args.length}, {args.dtype}: step {wall:.2f} s "
          f"({args.batch * args.length / wall:.0f} tokens/s unprofiled), {faults} page faults, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))
    total = sum(e.self_cpu_time_total for e in events)
    kinds: dict[str, float] = {}
    for e in events:
        kind = KINDS.get(e.key, "other")
        kinds[kind] = kinds.get(kind, 0.0) + e.self_cpu_time_total
    flops = sum(e.flops for e in events if KINDS.get(e.key) == "matmul")
    attention_flops = sum(e.flops for e in events if e.key in ("aten::bmm", "aten::baddbmm"))
    print("self time by kind (profiled step):")
    for kind, t in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<28} {t / 1e6:6.3f} s  {100 * t / total:5.1f}%")
    print(f"  linear layers' matrix products: {flops / 1e9:.0f} GFLOP at {flops / (kinds['matmul'] / 1e6) / 1e9:.0f} "
          f"GFLOP/s; attention's batched products (where explicit): {attention_flops / 1e9:.0f} GFLOP")


if __name__ == "__main__":
    main()
