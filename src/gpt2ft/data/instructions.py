"""Instruction data: read Alpaca / instruction-response / chat messages / CSV / HF datasets and validate
every record before a model loads (tokenising is in data/sft.py, rendering in templates.py).

A record is normalised to messages [{"role": ..., "content": str}, ...] plus an optional weight. An
Alpaca record is a user turn whose content is the instruction, with its input (if any) under "input",
then an assistant turn.
"""
from __future__ import annotations

import collections
import csv
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..fileio import MAX_DATA_FILE, check_size
from ..templates import ROLES, message_text
from .formats import FORMATS, SHAREGPT_ROLES
from .text import read_json, read_jsonl

MAX_LISTED = 20
DATA_LIMIT_HINT = "its records are held in memory: split it into smaller files, or use hf:DATASET_ID"


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
# the fields --columns can rename a file's names to: an instruction record's, a preference pair's
RECORD_FIELDS = ("messages", "instruction", "input", "output", "response", "weight", "prompt", "completion",
                 "conversations", "system", "history")
PAIR_FIELDS = ("prompt", "instruction", "input", "chosen", "rejected")


def read_rows(path: str | Path, fmt: str = "auto", split: str = "train", columns: dict[str, str] | None = None,
              fields: tuple[str, ...] = RECORD_FIELDS):
    """(where, row) for every row of a .json/.jsonl/.csv/.tsv file or hf:DATASET_ID; `where` is
    "file:line" (CSV: the header is line 1), "file: record i" or "hf:id[split][i]". A JSONL line that is
    not JSON yields a UserError as its row (validate with `normalize` or your own check). `columns`
    renames fields ({name in the file: field}: CSV headers, a dataset's columns, JSON keys) in every
    format, each to one of `fields`. A file over MAX_DATA_FILE bytes is refused, naming the limit."""
    check_column_targets(columns or {}, fields)
    seen: set[str] = set()
    for where, row in _rows(path, fmt, split):
        if columns and isinstance(row, dict):
            seen.update(row)
            clash = [k for k in row if k in columns and columns[k] in row and columns[k] not in columns]
            row = UserError(f"--columns renames {clash[0]!r} to {columns[clash[0]]!r}, which the record already has: "
                            "one of the two would be lost") if clash else {columns.get(k, k): v for k, v in row.items()}
        yield where, row
    if columns and (unused := sorted(set(columns) - seen)):  # a typo would rename nothing, unsaid
        raise UserError(f"--columns names {', '.join(map(repr, unused))}, which no record of {path} has (its "
                        f"fields: {', '.join(sorted(seen)) or 'none'})")


def check_column_targets(columns: dict[str, str], fields: tuple[str, ...]) -> None:
    """Every --columns FIELD=HEADER names one of `fields` (a reversed pair is the usual slip: said so)."""
    for header, target in columns.items():
        if target not in fields:
            swapped = f"; did you mean {header}={target}?" if header in fields else ""
            raise UserError(f"--columns {target}={header}: {target!r} is not a field of this data (one of "
                            f"{', '.join(fields)}); write FIELD=HEADER, e.g. instruction=question{swapped}")


def _rows(path: str | Path, fmt: str, split: str):
    if str(path).startswith("hf:"):
        yield from _hf_rows(str(path)[3:], split)
        return
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if split != "train":  # the default, harmless on a file; any other split would be silently ignored
        raise UserError(f"--split {split} picks a split of an hf: dataset; {path} is a local file: drop --split")
    check_size(path, "data file", MAX_DATA_FILE, DATA_LIMIT_HINT)
    suffix = path.suffix.lower()
    if fmt == "csv" or suffix in (".csv", ".tsv"):
        yield from _csv_rows(path, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".json":
        data = read_json(path)
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON array of records")
        for i, row in enumerate(data):
            yield f"{path}: record {i}", row
    else:  # JSON Lines
        yield from read_jsonl(path)


def _csv_rows(path: Path, delimiter: str):
    """(file:line, row) of a CSV/TSV file with a header (names stripped of spaces and a BOM). A row with
    more or fewer fields than the header is an invalid record (an unquoted comma would shift every field
    after it), not a row cut to fit."""
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = [name.strip() for name in next(reader, [])]
            if twice := sorted({name for name in header if header.count(name) > 1}):
                raise UserError(f"{path}:1: the header names column {twice[0]!r} twice: give each column its own "
                                "name (--columns maps them)")
            start = reader.line_num + 1
            for fields in reader:
                if fields and len(fields) != len(header):
                    quote = "commas" if delimiter == "," else "tabs"
                    yield f"{path}:{start}", UserError(
                        f"{len(fields)} fields where the header ({', '.join(header)}) has {len(header)}: put "
                        f"double quotes around a field that contains {quote}")
                elif fields:
                    yield f"{path}:{start}", dict(zip(header, fields))
                start = reader.line_num + 1
        except UnicodeDecodeError:  # the reader decodes ahead of the row it is on: find the byte's own line
            data = path.read_bytes()
            try:
                data.decode("utf-8-sig")
                offset = 0
            except UnicodeDecodeError as e:
                offset = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
            line = data[:offset].count(b"\n") + 1
            raise UserError(f"{path}:{line}: invalid UTF-8 (byte {offset}); re-encode the file as UTF-8") from None
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
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row and "response" in row:
        raise UserError("both 'output' and 'response': which is the answer? Drop one, or rename one with --columns")
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "instruction" in row and "response" in row:
        return "instruction-response"
    if "prompt" in row and "completion" in row:
        return "prompt-completion"
    return "unknown"


def _messages(value, name: str, roles=ROLES) -> list[dict]:
    """A list of {"role", "content"} messages, an assistant's with OpenAI's optional "weight" (0: the reply
    is context, not trained on; 1: trained); any other key is refused (it would be dropped unsaid)."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{name!r} must be a non-empty list")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in roles or not isinstance(m.get("content"), str):
            raise UserError(f"{name}[{i}] needs a role in {roles} and a string content")
        if "weight" in m and (m["role"] != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], bool)):
            raise UserError(f"{name}[{i}]: a message's weight is 0 or 1 on an assistant message (OpenAI's), not "
                            f"{m['weight']!r} on a {m['role']} one")
        if extra := sorted(set(m) - {"role", "content", "weight"}):
            raise UserError(f"{name}[{i}] has {', '.join(map(repr, extra))}, which training cannot honour: drop it")
        out.append({"role": m["role"], "content": m["content"], **({"weight": m["weight"]} if "weight" in m else {})})
    return out


def _conversation(messages: list[dict], where: str, row: dict, weight: float) -> "Record":
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise UserError("the last message must be a non-empty assistant reply")
    if all(m.get("weight", 1) == 0 for m in messages if m["role"] == "assistant"):
        raise UserError("every assistant message has weight 0: nothing to train on")
    if not any(m["role"] == "user" for m in messages):
        raise UserError("messages need at least one user turn")
    return Record(messages, weight, where, row)


def _sharegpt(turns) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise UserError("'conversations' must be a non-empty list")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES or not isinstance(t.get("value"), str):
            raise UserError(f"conversations[{i}] needs \"from\" in ({', '.join(SHAREGPT_ROLES)}) and a string "
                            "\"value\"")
        out.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    return out


def _alpaca_context(row: dict) -> list[dict]:
    """An Alpaca record's optional `system` prompt and `history` ([[instruction, response], ...], earlier
    turns: LLaMA-Factory's fields) as the messages before its instruction."""
    system, history = row.get("system") or "", row.get("history") or []
    if not isinstance(system, str):
        raise UserError("'system' must be a string")
    if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 and
                                                all(isinstance(x, str) for x in h) for h in history):
        raise UserError("'history' must be a list of [instruction, response] pairs of strings")
    turns = [{"role": "system", "content": system}] if system else []
    for instruction, response in history:
        turns += [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]
    return turns


def normalize(row, fmt: str, where: str, empty_instruction: bool = False) -> Record:
    """One raw row -> Record, or UserError(reason) explaining what is wrong with it. An empty
    instruction is refused unless `empty_instruction` (eval: the prompt is then the template's frame)."""
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
        return _conversation(_messages(row.get("messages"), "messages"), where, row, weight)
    if kind == "sharegpt":
        return _conversation(_sharegpt(row.get("conversations")), where, row, weight)
    if kind == "prompt-completion":  # TRL's: strings, or conversational (message lists)
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            if not prompt.strip() and not empty_instruction:
                raise UserError("empty prompt")
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        else:
            messages = _messages(prompt, "prompt") + _messages(completion, "completion", ("assistant",))
        return _conversation(messages, where, row, weight)
    if kind in ("alpaca", "instruction-response"):
        response_key = "output" if kind == "alpaca" else "response"
        instruction, response = row.get("instruction"), row.get(response_key)
        extra = row.get("input") or ""
        for name, value in (("instruction", instruction), (response_key, response), ("input", extra)):
            if not isinstance(value, str):
                raise UserError(f"missing or non-string field {name!r}")
        if not instruction.strip() and not empty_instruction:
            raise UserError("empty instruction")
        if not response.strip():
            raise UserError(f"empty {response_key}")
        user = {"role": "user", "content": instruction, **({"input": extra} if extra else {})}
        return Record(_alpaca_context(row) + [user, {"role": "assistant", "content": response}], weight, where, row)
    raise UserError(f"cannot tell the format from the fields {', '.join(map(repr, row)) or '(none)'}: expected "
                    "'messages', 'conversations' (ShareGPT), 'instruction'+'output' (Alpaca), 'instruction'+'response' "
                    "or 'prompt'+'completion'; name yours with --columns, e.g. --columns instruction=question,"
                    "output=answer")


def load_records(path: str | Path, fmt: str = "auto", split: str = "train", columns: dict[str, str] | None = None,
                 on_invalid: str = "error", empty_instruction: bool = False) -> tuple[list[Record], list[dict]]:
    """Read and validate every record. on_invalid='error' raises one error listing file:line: reason
    for each bad record (capped); 'skip' returns the valid ones and the rejected ones with reasons."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    records, rejected = validate_rows(read_rows(path, fmt, split, columns), fmt, on_invalid, path, empty_instruction)
    if ignored := ignored_fields(records, fmt):  # a typo (`sytem`) or a second format's fields would go unsaid
        print(f"note: {path}: fields that their records' format does not read are ignored: " + ", ".join(
            f"{name!r} ({n} record{'s' * (n > 1)})" for name, n in ignored.items()) + "; rename one with --columns "
            "if it holds the instruction, input, answer or system prompt", file=sys.stderr)
    return records, rejected


# the fields each format reads (and `weight`, read in every one)
FORMAT_FIELDS = {"messages": ("messages",), "sharegpt": ("conversations",), "prompt-completion": ("prompt", "completion"),
                 "alpaca": ("instruction", "input", "output", "system", "history"),
                 "instruction-response": ("instruction", "input", "response", "system", "history")}


def ignored_fields(records: list[Record], fmt: str = "auto") -> dict[str, int]:
    """The fields of valid records that their format does not read, with how many records have each."""
    counts: collections.Counter = collections.Counter()
    for r in records:
        if isinstance(r.raw, dict):
            kind = detect_format(r.raw) if fmt in ("auto", "csv") else fmt
            counts.update(k for k in r.raw if k not in (*FORMAT_FIELDS.get(kind, r.raw), "weight"))
    return dict(sorted(counts.items()))


def validate_rows(rows, fmt: str, on_invalid: str, path, empty_instruction: bool = False):
    """(records, rejected) of (where, row) pairs, as load_records gives them."""
    return collect_valid(rows, lambda row, where: normalize(row, fmt, where, empty_instruction), on_invalid, path,
                         "record")


class LeftOut(UserError):
    """A well-formed row with nothing to train on (e.g. a pair whose answers are identical): always left out
    and reported, never an error that --on-invalid decides."""


def collect_valid(rows, normalise, on_invalid: str, path, noun: str) -> tuple[list, list[dict]]:
    """The one validate-and-collect loop over (where, row) pairs: (normalise(row, where) of the good rows,
    the others with their reasons). Invalid rows stop the run with one error listing them unless
    on_invalid='skip'; LeftOut rows are always left out; no good row at all is an error naming the file."""
    if on_invalid not in ("error", "skip"):
        raise UserError(f"--on-invalid must be error or skip, not {on_invalid!r}")
    good, bad = [], []
    for where, row in rows:
        try:
            good.append(normalise(row, where))
        except UserError as e:
            bad.append({"where": where, "reason": str(e), "record": row if isinstance(row, dict) else None,
                        "dropped": isinstance(e, LeftOut)})
    invalid = [b for b in bad if not b["dropped"]]
    if invalid and on_invalid == "error":
        raise invalid_rows_error(invalid, noun, [b for b in bad if b["dropped"]])
    if not good:
        raise UserError(f"{path}: no valid {noun}s" + (f" ({listed_reasons(bad, 3)})" if bad else ""))
    return good, bad


def listed_reasons(bad: list[dict], cap: int = MAX_LISTED) -> str:
    """`file:line: reason; ...` of the first `cap` rows left out, and how many more there are."""
    if len(bad) > 1 and len({b["reason"] for b in bad}) == 1:  # e.g. a header no format has: said once
        return f"all {len(bad)}, from {bad[0]['where']}: {bad[0]['reason']}"
    listed = "; ".join(f"{b['where']}: {b['reason']}" for b in bad[:cap])
    return listed + (f" (and {len(bad) - cap} more)" if len(bad) > cap else "")


def invalid_rows_error(bad: list[dict], noun: str, left_out: list[dict] = ()) -> UserError:
    """One error listing `file:line: reason` for each bad row (capped), and the way out; the rows that will be
    left out whatever --on-invalid says are named too, so one pass over the file finds everything."""
    also = f" (and {len(left_out)} left out in any case: {listed_reasons(left_out, 3)})" if left_out else ""
    return UserError(f"{len(bad)} invalid {noun}(s): {listed_reasons(bad)}{also}. Fix them, or pass --on-invalid "
                     "skip to go on with the valid ones")


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


def record_to_row(record: Record, fmt: str = "messages") -> dict:
    """A record as a row of `fmt`: messages (the canonical format of splits), alpaca, or
    instruction-response (an Alpaca input is joined to the instruction)."""
    if fmt == "messages":
        row = {"messages": [{"role": m["role"], "content": message_text(m),
                             **({"weight": m["weight"]} if "weight" in m else {})} for m in record.messages]}
    else:
        if [m["role"] for m in record.messages] != ["user", "assistant"]:  # the others would be dropped unsaid
            raise UserError(f"{record.where}: a conversation of {len(record.messages)} messages "
                            f"({', '.join(m['role'] for m in record.messages)}) has no {fmt} form, which holds one "
                            "instruction and one response: use --to messages")
        user = record.messages[0]
        if fmt == "alpaca":
            row = {"instruction": user["content"], "input": user.get("input", ""), "output": record.response}
        else:
            row = {"instruction": message_text(user), "response": record.response}
    if record.weight != 1.0:
        row["weight"] = record.weight
    return row
