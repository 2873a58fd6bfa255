"""Instruction data: read Alpaca / instruction-response / chat messages / CSV / HF datasets, validate
every record before a model loads, render with a template, and tokenize with loss on responses only.

A record is normalised to {"messages": [{"role": ..., "content": ...}, ...]} (an Alpaca record is a
user turn holding instruction and input, then an assistant turn) plus optional "weight".
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..losses import IGNORE
from ..templates import format_prompt
from .text import read_lines

FORMATS = ("auto", "alpaca", "instruction-response", "messages", "csv")
ROLES = ("system", "user", "assistant")
MAX_LISTED = 20


@dataclass
class Record:
    messages: list[dict]
    weight: float = 1.0
    where: str = ""  # file:line, for messages about this record
    raw: dict = field(default_factory=dict)

    @property
    def instruction(self) -> str:
        return next(m["content"] for m in self.messages if m["role"] == "user")

    @property
    def response(self) -> str:
        return [m["content"] for m in self.messages if m["role"] == "assistant"][-1]


# ----- reading --------------------------------------------------------------------------------
def _rows(path: Path, fmt: str, split: str, columns: dict[str, str]):
    """(where, row dict) from a file or hf:dataset; a row that is not an object yields (where, error)."""
    if str(path).startswith("hf:"):
        yield from _hf_rows(str(path)[3:], split)
        return
    if not path.exists():
        raise UserError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if fmt == "csv" or suffix in (".csv", ".tsv"):
        yield from _csv_rows(path, "\t" if suffix == ".tsv" else ",", columns)
    elif suffix == ".json":
        text = "".join(line for _, line in read_lines(path))
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON array of records")
        for i, row in enumerate(data):
            yield f"{path}: record {i}", row
    else:  # JSON Lines
        for n, line in read_lines(path):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{n}", UserError(f"invalid JSON ({e.msg})")


def _csv_rows(path: Path, delimiter: str, columns: dict[str, str]):
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            start = reader.line_num + 1
            for row in reader:
                yield f"{path}:{start}", {columns.get(k, k): v for k, v in row.items() if k is not None}
                start = reader.line_num + 1
        except UnicodeDecodeError as e:
            raise UserError(f"{path}:{reader.line_num + 1}: invalid UTF-8 (byte {e.start})") from None
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def _hf_rows(dataset_id: str, split: str):
    try:
        import datasets
    except ImportError:
        raise UserError("hf: datasets need the package datasets: pip install datasets") from None
    try:
        data = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # noqa: BLE001 - offline, unknown id, missing split
        raise UserError(f"hf:{dataset_id} (split {split}) could not be loaded ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); offline it must be in the datasets cache") from None
    for i, row in enumerate(data):
        yield f"hf:{dataset_id}[{split}][{i}]", row


def detect_format(row: dict) -> str:
    if "messages" in row:
        return "messages"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "instruction" in row and "response" in row:
        return "instruction-response"
    return "unknown"


def normalize(row, fmt: str, where: str) -> Record:
    """One raw row -> Record, or UserError(reason) explaining what is wrong with it."""
    if isinstance(row, Exception):
        raise row
    if not isinstance(row, dict):
        raise UserError(f"expected an object, got {type(row).__name__}")
    kind = detect_format(row) if fmt in ("auto", "csv") else fmt
    weight = row.get("weight", 1.0)
    try:
        weight = float(weight if weight not in (None, "") else 1.0)
    except (TypeError, ValueError):
        raise UserError(f"weight {weight!r} is not a number") from None
    if not weight > 0 or weight != weight or weight == float("inf"):
        raise UserError(f"weight must be a positive number, not {weight}")
    if kind == "messages":
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise UserError("'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise UserError(f"messages[{i}] needs a role in {ROLES} and a string content")
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            raise UserError("the last message must be a non-empty assistant reply")
        if not any(m["role"] == "user" for m in messages):
            raise UserError("messages need at least one user turn")
        return Record([dict(role=m["role"], content=m["content"]) for m in messages], weight, where, row)
    if kind in ("alpaca", "instruction-response"):
        response_key = "output" if kind == "alpaca" else "response"
        instruction, response = row.get("instruction"), row.get(response_key)
        extra = row.get("input") or ""
        for name, value in (("instruction", instruction), (response_key, response), ("input", extra)):
            if not isinstance(value, str):
                raise UserError(f"missing or non-string field {name!r}")
        if not instruction.strip():
            raise UserError("empty instruction")
        if not response.strip():
            raise UserError(f"empty {response_key}")
        user = instruction if not extra else {"instruction": instruction, "input": extra}
        return Record([{"role": "user", "content": user}, {"role": "assistant", "content": response}], weight,
                      where, row)
    raise UserError("cannot tell the format: expected 'messages', 'instruction'+'output' (Alpaca) or "
                    "'instruction'+'response' fields (or pass --format / --columns)")


def load_records(path: str | Path, fmt: str = "auto", split: str = "train", columns: dict[str, str] | None = None,
                 on_invalid: str = "error") -> tuple[list[Record], list[dict]]:
    """Read and validate every record. on_invalid='error' raises one error listing file:line: reason
    for each bad record (capped); 'skip' returns the valid ones and the rejected ones with reasons."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if on_invalid not in ("error", "skip"):
        raise UserError(f"--on-invalid must be error or skip, not {on_invalid!r}")
    path = Path(path) if not str(path).startswith("hf:") else path
    good, bad = [], []
    for where, row in _rows(path, fmt, split, columns or {}):
        try:
            good.append(normalize(row, fmt, where))
        except UserError as e:
            bad.append({"where": where, "reason": str(e), "record": row if isinstance(row, dict) else None})
    if bad and on_invalid == "error":
        listed = "; ".join(f"{b['where']}: {b['reason']}" for b in bad[:MAX_LISTED])
        more = f" (and {len(bad) - MAX_LISTED} more)" if len(bad) > MAX_LISTED else ""
        raise UserError(f"{len(bad)} invalid record(s): {listed}{more}. Fix them, or pass --on-invalid skip "
                        "to train on the valid ones")
    if not good:
        raise UserError(f"{path}: no valid records")
    return good, bad


# ----- rendering and tokenizing ---------------------------------------------------------------
def render(record: Record, template: dict) -> list[tuple[str, bool]]:
    """The record as (text, supervised) segments. Supervised segments are assistant replies; each is
    followed by EOS (added at tokenization, and also supervised)."""
    segments: list[tuple[str, bool]] = []
    if "user" in template:  # chat template: every turn
        for m in record.messages:
            if m["role"] == "assistant":
                segments.append((template["assistant"], False))
                segments.append((m["content"], True))
            else:
                content = m["content"] if isinstance(m["content"], str) else \
                    f"{m['content']['instruction']}\n\n{m['content']['input']}"
                segments.append((template[m["role"]].format(content=content), False))
        return segments
    # instruction templates: the system turn (if any) leads, then one instruction and its response
    system = "".join(m["content"] + "\n\n" for m in record.messages if m["role"] == "system")
    user = record.messages[[m["role"] for m in record.messages].index("user")]["content"]
    instruction, extra = (user["instruction"], user["input"]) if isinstance(user, dict) else (user, "")
    return [(system + format_prompt(template, instruction, extra), False), (record.response, True)]


def prompt_text(record: Record, template: dict) -> str:
    """Everything before the final response: what the model is given at generation time."""
    segments = render(record, template)
    return "".join(text for text, _ in segments[:-1])


@dataclass
class TokenizedExample:
    ids: list[int]  # the whole sequence, prompt and response and EOS
    supervised: list[bool]  # per token: is it a target the loss trains?


def tokenize(record: Record, template: dict, tokenizer, train_on_prompt: bool = False) -> TokenizedExample:
    ids, sup = [], []
    for text, supervised in render(record, template):
        piece = tokenizer.encode(text) + ([tokenizer.eos_id] if supervised else [])
        ids += piece
        sup += [supervised or train_on_prompt] * len(piece)
    return TokenizedExample(ids, sup)


def fit_to_length(ex: TokenizedExample, max_len: int) -> tuple[TokenizedExample | None, str | None]:
    """Make the example fit max_len predicted positions (max_len + 1 tokens), keeping >= 1 supervised
    token: cut the response tail first, else the prompt from the left. Returns (example, what happened)."""
    if len(ex.ids) <= max_len + 1:
        return ex, None
    first = ex.supervised.index(True) if True in ex.supervised else None
    if first is None:
        return None, "no supervised token"
    if first < max_len:  # the prompt fits: cut the response's tail
        return TokenizedExample(ex.ids[:max_len + 1], ex.supervised[:max_len + 1]), "response truncated"
    start = first - max_len  # keep the last max_len prompt tokens and one response token
    return TokenizedExample(ex.ids[start:first + 1], ex.supervised[start:first + 1]), "prompt truncated"


class InstructionDataset:
    """Tokenized examples -> batches with dynamic padding (or packed rows with no cross-example attention)."""

    def __init__(self, examples: list[TokenizedExample], pad_id: int, packing_length: int | None = None):
        self.pad_id = pad_id
        self.rows: list[list[TokenizedExample]] = [[ex] for ex in examples]
        if packing_length:
            self.rows = _pack(examples, packing_length)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices) -> dict:
        """input_ids, labels (-100 off the supervised positions and on padding), position_ids and, for
        packed rows, a block-diagonal causal attention mask (B, T, T)."""
        rows = [self.rows[i] for i in indices]
        seqs = []
        for parts in rows:
            inp, lab, pos, doc = [], [], [], []
            for d, ex in enumerate(parts):
                inp += ex.ids[:-1]
                lab += [t if s else IGNORE for t, s in zip(ex.ids[1:], ex.supervised[1:])]
                pos += list(range(len(ex.ids) - 1))
                doc += [d] * (len(ex.ids) - 1)
            seqs.append((inp, lab, pos, doc))
        T = max(len(s[0]) for s in seqs)
        B = len(seqs)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        position_ids = torch.zeros((B, T), dtype=torch.long)
        docs = torch.full((B, T), -1, dtype=torch.long)
        for i, (inp, lab, pos, doc) in enumerate(seqs):
            n = len(inp)
            input_ids[i, :n], labels[i, :n] = torch.tensor(inp), torch.tensor(lab)
            position_ids[i, :n], docs[i, :n] = torch.tensor(pos), torch.tensor(doc)
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                 "n_tokens": sum(len(s[0]) for s in seqs)}
        if any(len(parts) > 1 for parts in rows):
            same = docs[:, :, None] == docs[:, None, :]
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            batch["attention_mask"] = (same & causal) | torch.eye(T, dtype=torch.bool)
        return batch


def _pack(examples: list[TokenizedExample], length: int) -> list[list[TokenizedExample]]:
    """First-fit packing of examples into rows of at most `length` input positions."""
    rows: list[list[TokenizedExample]] = []
    room: list[int] = []
    for ex in sorted(examples, key=lambda e: -len(e.ids)):
        need = len(ex.ids) - 1
        for i, free in enumerate(room):
            if need <= free:
                rows[i].append(ex)
                room[i] -= need
                break
        else:
            rows.append([ex])
            room.append(length - need)
    return rows


def split_records(records: list[Record], val_fraction: float, test_fraction: float, seed: int):
    """Seeded shuffle into (train, val, test)."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must be in [0, 1) "
                        "and leave some training data")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_test = round(len(records) * test_fraction)
    n_val = round(len(records) * val_fraction)
    test = [records[i] for i in order[:n_test]]
    val = [records[i] for i in order[n_test:n_test + n_val]]
    train = [records[i] for i in order[n_test + n_val:]]
    if not train:
        raise UserError(f"only {len(records)} records: nothing left to train on after the val/test split")
    return train, val, test


def record_to_json(record: Record) -> dict:
    """A record as a messages row (the canonical file format of splits and conversions)."""
    out = []
    for m in record.messages:
        content = m["content"]
        if isinstance(content, dict):
            content = f"{content['instruction']}\n\n{content['input']}"
        out.append({"role": m["role"], "content": content})
    row = {"messages": out}
    if record.weight != 1.0:
        row["weight"] = record.weight
    return row


def record_to_alpaca(record: Record) -> dict:
    user = record.messages[[m["role"] for m in record.messages].index("user")]["content"]
    instruction, extra = (user["instruction"], user["input"]) if isinstance(user, dict) else (user, "")
    row = {"instruction": instruction, "input": extra, "output": record.response}
    if record.weight != 1.0:
        row["weight"] = record.weight
    return row
