"""Train a tokenizer for a from-scratch model and save it to a folder that `prepare --tokenizer` and
`pretrain --tokenizer` use (it is then saved in every checkpoint).

    gpt2ft tokenizer train shakespeare.txt --kind word --vocab-size 8000 --out tok/
"""
from __future__ import annotations

from ..argtypes import ranged
from . import required



def add_args(p):
    p.add_argument("action", choices=["train"], help="what to do")
    p.add_argument("text", nargs="+", metavar="TEXT", help="text files or folders (.txt, .md, .jsonl)")
    p.add_argument("--kind", default="bpe", choices=["word", "bpe"], help="word-level or byte-level BPE")
    p.add_argument("--vocab-size", type=ranged(int, 2), default=8000,
                   help="vocabulary size, special tokens included (BPE: >= 257; word: >= 2)")
    p.add_argument("--lowercase", action="store_true", help="word tokenizer: lowercase the text")
    required(p.add_argument("--out", help="folder to write the tokenizer to (a new or empty folder, or one this "
                                         "verb made; never a model)"))
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty folder that `tokenizer train` did not make (same-named files are "
                        "replaced, others are left alone)")


def run(args):
    from pathlib import Path

    from ..data.text import find_text_files, iter_documents
    from ..errors import UserError
    from ..fileio import claim_output_dir
    from ..tokenizer import train_tokenizer

    out = Path(args.out)
    if (out / "config.json").exists() or (out / "COMPLETE").exists():  # its tokenizer must match its weights
        raise UserError(f"--out {out} holds a model; its tokenizer belongs to its weights: choose a new folder")
    texts = [text for path in find_text_files(args.text) for text, _, _ in iter_documents(path)]
    if not any(t.strip() for t in texts):
        raise UserError(f"{', '.join(args.text)}: no text to train a tokenizer on (the files are empty)")
    tok = train_tokenizer(texts, args.kind, args.vocab_size, args.lowercase)
    claim_output_dir(out, "gpt2ft tokenizer train", overwrite=args.overwrite)
    tok.save(out)
    print(f"{args.kind} tokenizer with {tok.vocab_size} ids written to {args.out}")
    return 0
