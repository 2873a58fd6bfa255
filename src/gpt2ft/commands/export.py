"""Write a plain Hugging Face folder (config.json, model.safetensors, tokenizer) that
transformers.AutoModelForCausalLM.from_pretrained loads as is; or, with --format gguf, one GGUF file
for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile beside it.

    gpt2ft export runs/demo/sft --out exported/ --dtype bfloat16
    gpt2ft export runs/demo/sft --format gguf --outtype q8_0 --out sft.gguf   # then: ollama create sft -f sft.Modelfile
"""
from __future__ import annotations

from ..errors import UserError
from . import add_no_verify, only_with, required


def add_args(p):
    p.add_argument("model", metavar="MODEL", help="Hub id, HF folder, gpt2ft checkpoint or run folder")
    required(p.add_argument("--out", help="folder to write (never the model itself; a non-empty folder that "
                                           "export did not make needs --overwrite); with --format gguf, the "
                                           ".gguf file"))
    p.add_argument("--format", choices=("hf", "gguf"), default="hf",
                   help="hf: a Hugging Face folder; gguf: one GGUF file (LoRA merged first) and an Ollama Modelfile")
    only_with(p.add_argument("--outtype", choices=("f32", "f16", "bf16", "q8_0"), default="f16",
                             help="--format gguf: the weights' type (norms and biases stay f32)"), "format", "gguf")
    only_with(p.add_argument("--dtype", default="float32", help="float32|bfloat16|float16"), "format", "hf")
    p.add_argument("--merge-lora", action="store_true", help="merge a LoRA adapter into the weights")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty folder that export did not make (never over a model or tokenizer "
                        "file of yours; other files are left alone)")
    add_no_verify(p)


def run(args):
    from ..checkpoint import export

    if args.format == "gguf":
        return export_gguf(args)
    out = export(args.model, args.out, dtype=args.dtype, merge_lora=args.merge_lora, overwrite=args.overwrite,
                 verify=args.verify)
    print(f"exported {args.model} to {out}")
    return 0


def export_gguf(args) -> int:
    """--format gguf: MODEL (LoRA merged) -> one .gguf file, and a Modelfile beside it (both guarded)."""
    from pathlib import Path

    from ..checkpoint import load
    from ..fileio import atomic_write_by_path, check_writable, record_written, write_user_file
    from ..gguf_file import modelfile_text, write_gguf
    from ..lora import merge_lora

    out = Path(args.out).expanduser()
    if out.suffix != ".gguf":
        raise UserError(f"--out {out}: with --format gguf, name the file to write, ending in .gguf")
    modelfile = out.with_suffix(".Modelfile")  # one per GGUF file: several can share a folder
    guard = dict(overwrite=args.overwrite, inputs=(args.model,))
    for path, what in ((out, "--out"), (modelfile, f"the Modelfile beside --out {out.name}")):  # before loading
        check_writable(path, what=what, **guard)
    loaded = load(args.model, device="cpu", dtype="float32", verify=args.verify)
    check_writable(out, what="--out", overwrite=args.overwrite, inputs=(args.model, loaded.source))
    if loaded.model.lora_config is not None:
        merge_lora(loaded.model)
    elif args.merge_lora:
        raise UserError(f"{args.model} has no LoRA adapter to merge: drop --merge-lora")
    atomic_write_by_path(out, lambda tmp: write_gguf(tmp, loaded.model, loaded.tokenizer, loaded.template,
                                                      args.outtype, name=out.stem))
    record_written(out)
    from ..chat import CHAT_DEFAULTS  # Ollama's default sampling: gpt2ft chat's

    sampling = {k: CHAT_DEFAULTS[k] for k in ("temperature", "top_k", "top_p")}
    write_user_file(modelfile, modelfile_text(out.name, loaded.template, **sampling),
                    what=f"the Modelfile beside --out {out.name}", **guard)
    print(f"exported {args.model} to {out} ({args.outtype}) and {modelfile} (ollama create NAME -f {modelfile})")
    if (context := loaded.model.config.block_size) != 1024:  # llama.cpp reads it; transformers 5 takes 1024
        print(f"note: transformers reads this file's context ({context}) as GPT-2's 1024 unless told: "
              f"AutoModelForCausalLM.from_pretrained(FOLDER, gguf_file=\"{out.name}\", n_positions={context})")
    return 0
