"""Write a plain Hugging Face folder (config.json, model.safetensors, tokenizer) that
transformers.AutoModelForCausalLM.from_pretrained loads as is.

    gpt2ft export runs/demo/sft --out exported/ --dtype bfloat16
"""
from __future__ import annotations

from . import add_no_verify, required


def add_args(p):
    p.add_argument("model", metavar="MODEL", help="Hub id, HF folder, gpt2ft checkpoint or run folder")
    required(p.add_argument("--out", help="folder to write (never the model itself; a non-empty folder that "
                                           "export did not make needs --overwrite)"))
    p.add_argument("--dtype", default="float32", help="float32|bfloat16|float16")
    p.add_argument("--merge-lora", action="store_true", help="merge a LoRA adapter into the weights")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty folder that export did not make (same-named files are replaced)")
    add_no_verify(p)


def run(args):
    from ..checkpoint import export

    out = export(args.model, args.out, dtype=args.dtype, merge_lora=args.merge_lora, overwrite=args.overwrite,
                 verify=args.verify)
    print(f"exported {args.model} to {out}")
    return 0
