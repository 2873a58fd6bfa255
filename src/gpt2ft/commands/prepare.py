"""Tokenize text files or folders (.txt, .md, .jsonl with a text field) into train.bin/val.bin
memmaps and meta.json, streaming, so a corpus larger than memory works. Documents are separated by
<|endoftext|>.

    gpt2ft prepare shakespeare/ --out data/shakespeare --val-fraction 0.1
"""
from __future__ import annotations

from . import required



def add_args(p):
    p.add_argument("text", nargs="+", metavar="TEXT", help="text files or folders")
    required(p.add_argument("--out", help="data folder to write"))
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer folder (from `gpt2ft tokenizer train` or a checkpoint); default GPT-2 BPE")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the text held out for validation")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl files")


def run(args):
    from ..data.text import prepare
    from ..tokenizer import load_tokenizer

    meta = prepare(args.text, args.out, load_tokenizer(args.tokenizer), args.val_fraction,
                   tokenizer_dir=args.tokenizer, text_field=args.text_field)
    print(f"{args.out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens")
    return 0
