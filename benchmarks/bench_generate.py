"""Decode throughput for the GPT-2 124M architecture (random weights): gpt2ft vs HF generate, same
weights, prompt and greedy settings, alternating A/B in one run; prints tokens/s and the ratio.

    python -m benchmarks.bench_generate [--rounds 3] [--new-tokens 64] [--compile]
"""
from __future__ import annotations


import torch

from benchmarks.common import alternate, decode_parser, report, timed
from gpt2ft.checkpoint import load_hf_state_dict
from gpt2ft.config import preset
from gpt2ft.generation import SamplingConfig, complete_batch
from gpt2ft.model import GPT
from gpt2ft.tokenizer import gpt2_tokenizer


def main() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    p = decode_parser()
    p.add_argument("--compile", action="store_true", help="also time our static-cache compiled decode (GPU)")
    p.add_argument("--dtype", default=None, help="float32|bfloat16 (default: bfloat16 on a GPU, float32 on CPU)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(attn_implementation="sdpa")).to(device, dtype).eval()
    ours = GPT(preset("gpt2", dropout=0.0))
    load_hf_state_dict(ours, hf.state_dict(), "HF model")
    ours = ours.to(device, dtype).eval()
    tokenizer = gpt2_tokenizer()
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)

    for batch in args.batch:
        prompt = torch.randint(0, 50257, (batch, args.prompt_tokens), device=device)
        rows = prompt.tolist()
        n = batch * args.new_tokens

        def run_ours(compile=False):
            return n / timed(lambda: complete_batch(ours, tokenizer, rows, cfg, batch, compile=compile))

        def run_hf():
            with torch.inference_mode():
                return n / timed(lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                                     max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                                     pad_token_id=50256))

        candidates = {"ours": run_ours, "hf_generate": run_hf}
        if args.compile:
            candidates["ours_compiled"] = lambda: run_ours(compile=True)
        for fn in candidates.values():  # warm-up (and compile) outside the timing
            fn()
        results = alternate(candidates, args.rounds)
        report(f"decode, GPT-2 124M, batch {batch}, {args.prompt_tokens}+{args.new_tokens} tokens, greedy, "
               f"{str(dtype).removeprefix('torch.')}", results, "tokens/s", "hf_generate")


if __name__ == "__main__":
    main()
