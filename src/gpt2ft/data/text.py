"""Raw text -> token memmaps (train.bin, val.bin, meta.json) -> fixed-length blocks for LM training."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


def find_text_files(inputs: list[str | Path]) -> list[Path]:
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        elif item.is_file():
            files.append(item)
        else:
            raise UserError(f"{item}: no such file or folder")
    if not files:
        raise UserError(f"no .txt, .md or .jsonl files in {', '.join(map(str, inputs))}")
    return files


def read_lines(path: Path):
    """(line number, text) for each line; strips a UTF-8 BOM and CRLF; invalid UTF-8 names the line."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{n}: invalid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None
            yield n, line.replace("\r\n", "\n").replace("\r", "\n")


def read_jsonl(path: Path):
    """(where, value) for each non-blank line of a JSON Lines file, where = "file:line"; a line that is
    not JSON gives a UserError as its value, so a caller can stop or collect it."""
    for n, line in read_lines(path):
        if not line.strip():
            continue
        try:
            yield f"{path}:{n}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path}:{n}", UserError(f"invalid JSON ({e.msg})")


def read_json(path: Path):
    """A whole JSON file; a syntax error names its line."""
    try:
        return json.loads("".join(line for _, line in read_lines(path)))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def iter_documents(path: Path, text_field: str = "text", val_fraction: float = 0.0, chunk_chars: int = 1 << 20):
    """Yield (text, ends_document, is_val) pieces of at most ~chunk_chars, cut at line ends, so files
    larger than RAM stream through. Text files: the last val_fraction of the bytes is validation.
    A .jsonl file has one document per line (in `text_field`); every 1/val_fraction-th is validation."""
    if path.suffix == ".jsonl":
        every = round(1 / val_fraction) if val_fraction > 0 else 0
        index = 0
        for where, record in read_jsonl(path):
            if isinstance(record, UserError):
                raise UserError(f"{where}: {record}")
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise UserError(f"{where}: expected an object with a string field {text_field!r}")
            yield record[text_field], True, bool(every) and index % every == every - 1
            index += 1
        return
    val_from = path.stat().st_size * (1 - val_fraction) if val_fraction > 0 else float("inf")
    buf: list[str] = []
    size = done = 0
    in_val = False
    for _, line in read_lines(path):
        if not in_val and done >= val_from and buf:
            yield "".join(buf), True, False  # the held-out tail is its own document
            buf, size, in_val = [], 0, True
        buf.append(line)
        size += len(line)
        done += len(line.encode("utf-8"))
        if size >= chunk_chars and line.strip() == "":  # cut at a blank line: paragraphs stay whole
            yield "".join(buf), False, in_val
            buf, size = [], 0
    yield "".join(buf), True, in_val or done >= val_from


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def prepare(inputs: list[str | Path], out: str | Path, tokenizer: Tokenizer, val_fraction: float = 0.1,
            tokenizer_dir: str | None = None, text_field: str = "text", progress: bool = True) -> dict:
    """Tokenize files into out/train.bin and out/val.bin; documents end with <|endoftext|>.
    The last val_fraction of each text file (every 1/val_fraction-th .jsonl document) goes to val."""
    from tqdm import tqdm

    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), not {val_fraction}")
    files = find_text_files(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    counts = {"train": 0, "val": 0}
    digest = hashlib.sha256()
    tmp = {split: out / f".tmp-{split}.bin" for split in counts}
    handles = {split: open(tmp[split], "wb") for split in counts}
    bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="prepare",
               disable=not progress)
    try:
        for path in files:
            for text, ends, is_val in iter_documents(path, text_field, val_fraction):
                split = "val" if is_val else "train"
                ids = tokenizer.encode(text) + ([tokenizer.eos_id] if ends else [])
                arr = np.asarray(ids, dtype=dtype)
                handles[split].write(arr.tobytes())
                digest.update(arr.tobytes())
                counts[split] += len(arr)
                bar.update(len(text.encode("utf-8")))
    finally:
        bar.close()
        for h in handles.values():
            h.close()
    if counts["train"] < 2:
        raise UserError(f"{', '.join(map(str, inputs))}: too little text to train on ({counts['train']} tokens)")
    for split in counts:
        os.replace(tmp[split], out / f"{split}.bin")
    meta = {
        "tokenizer": {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint(), "dir": tokenizer_dir,
                      "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
        "dtype": np.dtype(dtype).name,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "fingerprint": digest.hexdigest()[:16],
        "sources": [str(f) for f in files],
    }
    from ..fileio import atomic_write_text

    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    return meta


def read_meta(data_dir: Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise UserError(f"{data_dir}: not a prepared data folder (no meta.json); run `gpt2ft prepare` first")
    return json.loads(path.read_text())


class TokenBlocks:
    """Non-overlapping windows of block_size + 1 tokens from a token memmap (input and shifted target)."""

    def __init__(self, path: Path, dtype: str, block_size: int):
        self.path, self.block_size = Path(path), block_size
        n = self.path.stat().st_size // np.dtype(dtype).itemsize if self.path.exists() else 0
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r") if n else np.zeros(0, dtype=dtype)
        self.n_blocks = max((len(self.tokens) - 1) // block_size, 0)

    def __len__(self) -> int:
        return self.n_blocks

    def sample_prompt(self, tokenizer, n_tokens: int = 8) -> list[str]:
        """The opening tokens of this split, decoded: a prompt for sample generations during training."""
        head = self.tokens[:n_tokens].tolist()
        if tokenizer.eos_id in head:
            head = head[:head.index(tokenizer.eos_id)]
        return [tokenizer.decode(head)] if head else []

    def batch(self, indices) -> dict:
        T = self.block_size
        rows = np.stack([self.tokens[i * T: i * T + T + 1].astype(np.int64) for i in indices])
        rows = torch.from_numpy(rows)
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:].clone()}  # labels may be masked in place
