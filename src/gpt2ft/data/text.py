"""Raw text -> token memmaps (train.bin, val.bin, meta.json) -> fixed-length blocks for LM training."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..fileio import atomic_write_text
from ..runtime import progress_bar
from ..tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
PREPARED_FILES = ("train.bin", "val.bin", "meta.json")  # what prepare writes into its folder


STRUCTURED_SUFFIXES = (".json", ".csv", ".tsv")  # records, not text: their syntax would be trained on


def find_text_files(inputs: list[str | Path], note: bool = True) -> list[Path]:
    """The text files to tokenise: those given, and in a folder those with a TEXT_SUFFIXES suffix (any case;
    how many others were passed over is said). A JSON or CSV file is refused: its syntax is not text."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and not p.name.startswith("."))
            texts = [p for p in found if p.suffix.lower() in TEXT_SUFFIXES]
            files += texts
            passed = len(found) - len(texts)
            if passed and note:
                print(f"note: {item}: passed over {passed} file(s) that are not {', '.join(TEXT_SUFFIXES)}",
                      file=sys.stderr)
        elif item.is_file() and item.suffix.lower() in STRUCTURED_SUFFIXES:
            raise UserError(f"{item}: a {item.suffix} file holds records, not text (its syntax would be trained on): "
                            "write one JSON object per line with a text field to a .jsonl file (--text-field names "
                            "it), or give the plain text as .txt")
        elif item.is_file():
            files.append(item)
        else:
            raise UserError(f"{item}: no such file or folder")
    if not files:
        raise UserError(f"no .txt, .md or .jsonl files in {', '.join(map(str, inputs))}")
    return files


def read_lines(path: Path):
    """(line number, text) for each line; strips a UTF-8 BOM and CRLF; invalid UTF-8 names the line; a
    file that cannot be opened (a folder, no permission) is one error naming it."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if b"\x00" in raw:
                raise UserError(f"{path}:{n}: a NUL byte: this is a binary file, not UTF-8 text")
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
        except json.JSONDecodeError as e:  # a JSON array in a .jsonl file fails on its first line: say so
            array = "; the file looks like one JSON array: name it .json" if n == 1 and line.lstrip()[:1] == "[" else ""
            yield f"{path}:{n}", UserError(f"invalid JSON ({e.msg}){array}")


def read_json(path: Path):
    """A whole JSON file; a syntax error names its line."""
    try:
        return json.loads("".join(line for _, line in read_lines(path)))
    except json.JSONDecodeError as e:
        lines = "; one JSON record per line? Then name the file .jsonl" if e.msg == "Extra data" else ""
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg}){lines}") from None


def iter_documents(path: Path, text_field: str = "text", val_fraction: float = 0.0, chunk_chars: int = 1 << 20):
    """Yield (text, ends_document, is_val) pieces of at most ~chunk_chars, cut at blank lines, so files
    larger than RAM stream through. A text file is one document (never validation here: `prepare`
    holds out the last tokens of each file). A .jsonl file has one document per line (in
    `text_field`); every 1/val_fraction-th is validation."""
    if path.suffix.lower() == ".jsonl":
        every = round(1 / val_fraction) if val_fraction > 0 else 0
        index = 0
        for where, record in read_jsonl(path):
            if isinstance(record, UserError):
                raise UserError(f"{where}: {record}")
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                shaped = isinstance(record, dict) and bool({"messages", "conversations", "instruction", "prompt",
                                                             "chosen"} & set(record))
                raise UserError(f"{where}: expected an object with a string field {text_field!r} (--text-field "
                                "names the field that holds the text)" + (
                                    "; this looks like instruction, chat or preference data: `gpt2ft sft` (or `gpt2ft "
                                    "dpo`) trains on that" if shaped else ""))
            yield record[text_field], True, bool(every) and index % every == every - 1
            index += 1
        return
    buf: list[str] = []
    size = 0
    for _, line in read_lines(path):
        buf.append(line)
        size += len(line)
        if size >= chunk_chars and line.strip() == "":  # cut at a blank line: paragraphs stay whole
            yield "".join(buf), False, False
            buf, size = [], 0
    yield "".join(buf), True, False


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def _move_tail(src, dst, n_bytes: int, chunk: int = 1 << 24) -> None:
    """Move the last n_bytes of the open file src to the end of dst, then cut them from src."""
    src.flush()
    end = src.seek(0, os.SEEK_END)
    for pos in range(end - n_bytes, end, chunk):
        src.seek(pos)
        dst.write(src.read(min(chunk, end - pos)))
    src.truncate(end - n_bytes)
    src.seek(0, os.SEEK_END)


def prepare(inputs: list[str | Path], out: str | Path, tokenizer: Tokenizer, val_fraction: float = 0.1,
            tokenizer_dir: str | None = None, text_field: str = "text", progress: bool = True) -> dict:
    """Tokenize files into out/train.bin and out/val.bin; documents end with <|endoftext|>.
    The last val_fraction of each text file's tokens (so a one-line file splits too), and every
    1/val_fraction-th .jsonl document, go to val. A failure or Ctrl-C at any point leaves no temporary
    file, and no train.bin/val.bin without the meta.json that describes them (see discard)."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), not {val_fraction}")
    files = find_text_files(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    # named before they exist, so that an interrupt at any point after this knows what to remove
    tmp = {split: out / f".tmp-{split}.{os.getpid()}.bin" for split in ("train", "val")}
    written: list[Path] = []
    try:
        if progress:
            print(f"prepare: tokenizing {len(files)} file(s) into {out}", file=sys.stderr, flush=True)
        counts, digest = _tokenize_files(files, tmp, tokenizer, dtype, val_fraction, text_field, progress)
        if counts["train"] < 2:
            held = (f" after --val-fraction {val_fraction} held out {counts['val']:,} for validation: lower "
                    "--val-fraction" if counts["val"] else "")
            raise UserError(f"{', '.join(map(str, inputs))}: too little text to train on ({counts['train']} "
                            f"tokens{held})")
        written.append(out / "meta.json")
        (out / "meta.json").unlink(missing_ok=True)  # an older meta.json does not describe the new files
        for split in counts:
            written.append(out / f"{split}.bin")
            os.replace(tmp[split], out / f"{split}.bin")
        meta = {
            "tokenizer": {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint(),
                          "dir": str(Path(tokenizer_dir).resolve()) if tokenizer_dir else None,  # absolute: cwd-free
                          "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
            "dtype": np.dtype(dtype).name,
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
            "fingerprint": digest.hexdigest()[:16],
            "sources": [str(f.resolve()) for f in files],
        }
        atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    except BaseException:
        discard([*tmp.values(), *written])
        raise
    return meta


def discard(paths: list[Path]) -> None:
    """Remove what a failed or interrupted prepare made: its temp files, and the data files it moved in
    before the meta.json that describes them was written."""
    for path in paths:
        path.unlink(missing_ok=True)


def _tokenize_files(files: list[Path], tmp: dict[str, Path], tokenizer: Tokenizer, dtype, val_fraction: float,
                    text_field: str, progress: bool):
    """Stream every file's tokens into the temp files tmp["train"] and tmp["val"]; (counts, digest)."""
    itemsize = np.dtype(dtype).itemsize
    counts = {"train": 0, "val": 0}
    digest = hashlib.sha256()
    bar = progress_bar(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="prepare",
               disable=not progress)
    try:
        with open(tmp["train"], "w+b") as train_f, open(tmp["val"], "wb") as val_f:
            handles = {"train": train_f, "val": val_f}
            for path in files:
                file_start = counts["train"]
                for text, ends, is_val in iter_documents(path, text_field, val_fraction):
                    split = "val" if is_val else "train"
                    ids = tokenizer.encode(text) + ([tokenizer.eos_id] if ends else [])
                    arr = np.asarray(ids, dtype=dtype)
                    handles[split].write(arr.tobytes())
                    digest.update(arr.tobytes())
                    counts[split] += len(arr)
                    bar.update(len(text.encode("utf-8")))
                if path.suffix.lower() != ".jsonl":  # hold out the file's last tokens
                    n_val = int((counts["train"] - file_start) * val_fraction)
                    _move_tail(train_f, val_f, n_val * itemsize)
                    counts["train"] -= n_val
                    counts["val"] += n_val
    finally:
        bar.close()
    return counts, digest


def read_meta(data_dir: Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise UserError(f"{data_dir}: not a prepared data folder (no meta.json); run `gpt2ft prepare` first")
    from ..fileio import read_json

    meta = read_json(path, "meta.json")
    try:
        tok = meta["tokenizer"]
        tok["fingerprint"], meta["fingerprint"]
        if meta["dtype"] not in ("uint16", "uint32"):
            raise KeyError("dtype")
    except (TypeError, KeyError):
        raise UserError(f"{path}: not a meta.json written by `gpt2ft prepare`; prepare the data again") from None
    if tok.get("dir") and not Path(tok["dir"]).is_absolute() and (Path(data_dir) / tok["dir"]).is_dir():
        tok["dir"] = str(Path(data_dir) / tok["dir"])  # an older file's relative path: relative to the data
    return meta


class TokenBlocks:
    """Non-overlapping windows of block_size + 1 tokens from a token memmap (input and shifted target)."""

    def __init__(self, path: Path, dtype: str, block_size: int, n_tokens: int | None = None,
                 vocab_size: int | None = None):
        """n_tokens and vocab_size (from meta.json) check that the file is what `prepare` wrote."""
        self.path, self.block_size = Path(path), block_size
        size = self.path.stat().st_size if self.path.exists() else 0
        itemsize = np.dtype(dtype).itemsize
        n = size // itemsize
        again = "; run `gpt2ft prepare` again"
        if size % itemsize or (n_tokens is not None and n != n_tokens):
            raise UserError(f"{self.path}: {size} bytes, but meta.json records {n_tokens} tokens of {itemsize} "
                            f"bytes: the file was damaged or changed{again}")
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r") if n else np.zeros(0, dtype=dtype)
        if vocab_size is not None and n and int(self.tokens.max()) >= vocab_size:
            raise UserError(f"{self.path}: holds token ids up to {int(self.tokens.max())}, beyond the tokenizer's "
                            f"{vocab_size}: the file is damaged or not from this tokenizer{again}")
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
