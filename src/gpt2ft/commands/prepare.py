"""Tokenize text files or folders (.txt, .md, .jsonl with a text field) into train.bin/val.bin
memmaps and meta.json, streaming, so a corpus larger than memory works. Documents are separated by
<|endoftext|>.

    gpt2ft prepare shakespeare/ --out data/shakespeare --val-fraction 0.1
"""
from __future__ import annotations

from ..argtypes import ranged
from . import add_text_field, refuse_given, required


def add_args(p):
    p.add_argument("text", nargs="+", metavar="TEXT", help="text files or folders")
    required(p.add_argument("--out", help="data folder to write (a new or empty folder, or one prepare made)"))
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer folder (from `gpt2ft tokenizer train` or a checkpoint); default GPT-2 BPE")
    p.add_argument("--val-fraction", type=ranged(float, 0, 1, hi_open=True), default=0.1,
                   help="share of the tokens held out for validation, in [0, 1)")
    add_text_field(p)
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty folder that prepare did not make (never over a train.bin, val.bin "
                        "or meta.json of yours, nor into a TEXT or --tokenizer folder)")


def run(args):
    from ..data.text import PREPARED_FILES, find_text_files, prepare
    from ..fileio import output_dir
    from ..tokenizer import load_tokenizer

    if not any(f.suffix.lower() == ".jsonl" for f in find_text_files(args.text, note=False)):
        refuse_given(args, {"text_field"}, "without .jsonl inputs (it names the field of a JSON Lines record)")
    tokenizer = load_tokenizer(args.tokenizer)
    inputs = {"--tokenizer": args.tokenizer, **{f"TEXT {t}": t for t in args.text}}
    with output_dir(args.out, "gpt2ft prepare", overwrite=args.overwrite, files=PREPARED_FILES, inputs=inputs):
        meta = prepare(args.text, args.out, tokenizer, args.val_fraction,
                       tokenizer_dir=args.tokenizer, text_field=args.text_field)
    print(f"{args.out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens")
    return 0
