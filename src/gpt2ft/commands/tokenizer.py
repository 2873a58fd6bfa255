"""Train a tokenizer for a from-scratch model and save it to a folder that `prepare --tokenizer` and
`pretrain --tokenizer` use (it is then saved in every checkpoint).

    gpt2ft tokenizer train shakespeare.txt --kind word --vocab-size 8000 --out tok/
"""
from __future__ import annotations

from ..argtypes import ranged
from . import only_with, required


def add_args(p):
    p.add_argument("action", choices=["train"], help="what to do")
    p.add_argument("text", nargs="+", metavar="TEXT", help="text files or folders (.txt, .md, .jsonl)")
    p.add_argument("--kind", default="bpe", choices=["word", "bpe"], help="word-level or byte-level BPE")
    p.add_argument("--vocab-size", type=ranged(int, 2), default=8000,
                   help="vocabulary size, special tokens included (BPE: >= 257; word: >= 2)")
    only_with(p.add_argument("--lowercase", action="store_true", help="word tokenizer: lowercase the text"),
              "kind", "word")
    required(p.add_argument("--out", help="folder to write the tokenizer to (a new or empty folder, or one this "
                                         "verb made; never a model or run folder)"))
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty folder that `tokenizer train` did not make (never over tokenizer "
                        "files of yours; others are left alone)")


def run(args):
    from ..data.text import find_text_files, iter_documents
    from ..errors import UserError
    from ..fileio import output_dir
    from ..tokenizer import TOKENIZER_FILES, train_tokenizer

    files = find_text_files(args.text)
    inputs = {f"TEXT {t}": t for t in args.text}
    with output_dir(args.out, "gpt2ft tokenizer train", overwrite=args.overwrite, files=TOKENIZER_FILES,
                    inputs=inputs) as out:  # checked (and a model refused) before training
        texts = [text for path in files for text, _, _ in iter_documents(path)]
        if not any(t.strip() for t in texts):
            raise UserError(f"{', '.join(args.text)}: no text to train a tokenizer on (the files are empty)")
        tok = train_tokenizer(texts, args.kind, args.vocab_size, args.lowercase)
        tok.save(out)
    print(f"{args.kind} tokenizer with {tok.vocab_size} ids written to {args.out}")
    return 0
