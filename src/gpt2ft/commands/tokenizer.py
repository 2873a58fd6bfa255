"""Train a tokenizer for a from-scratch model and save it to a folder that `prepare --tokenizer` and
`pretrain --tokenizer` use (it is then saved in every checkpoint).

    gpt2ft tokenizer train shakespeare.txt --kind word --vocab-size 8000 --out tok/
"""
from __future__ import annotations

from . import required



def add_args(p):
    p.add_argument("action", choices=["train"], help="what to do")
    p.add_argument("text", nargs="+", metavar="TEXT", help="text files or folders (.txt, .md, .jsonl)")
    p.add_argument("--kind", default="bpe", choices=["word", "bpe"], help="word-level or byte-level BPE")
    p.add_argument("--vocab-size", type=int, default=8000, help="vocabulary size, special tokens included")
    p.add_argument("--lowercase", action="store_true", help="word tokenizer: lowercase the text")
    required(p.add_argument("--out", help="folder to write the tokenizer to"))


def run(args):
    from ..data.text import find_text_files, iter_documents
    from ..tokenizer import train_tokenizer

    texts = [text for path in find_text_files(args.text) for text, _, _ in iter_documents(path)]
    tok = train_tokenizer(texts, args.kind, args.vocab_size, args.lowercase)
    from pathlib import Path

    Path(args.out).mkdir(parents=True, exist_ok=True)
    tok.save(Path(args.out))
    print(f"{args.kind} tokenizer with {tok.vocab_size} ids written to {args.out}")
    return 0
