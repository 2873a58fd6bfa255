"""Preference data: read prompt / chosen / rejected pairs (JSON, JSONL, CSV, hf:), validate each pair
before a model loads, render the prompt with the model's template exactly as SFT does, fit each pair to
the sequence length, and batch chosen rows then rejected rows for one forward pass.

Accepted rows:
  {"prompt": "...", "chosen": "...", "rejected": "..."}
  {"instruction": "...", "input": "...", "chosen": "...", "rejected": "..."}        (input optional)
  {"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]}  (TRL conversational)
  {"chosen": [messages], "rejected": [messages]}    (TRL implicit prompt: the shared leading messages)
  {"chosen": "\n\nHuman: ...\n\nAssistant: ...", "rejected": "..."}     (Anthropic HH-RLHF transcripts)
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..losses import IGNORE
from ..templates import ROLES, Template, message_text
from .instructions import PAIR_FIELDS, LeftOut, collect_valid, read_rows as read_instruction_rows
from .sft import prompt_ids as sft_prompt_ids


@dataclass
class PreferencePair:
    prompt: list[dict]  # the conversation before the answer (system / user / earlier assistant turns)
    chosen: str
    rejected: str
    where: str = ""  # file:line, for messages about this pair
    raw: dict = field(default_factory=dict)


# ----- reading --------------------------------------------------------------------------------
def _messages(value, name: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{name!r} must be a string or a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"{name}[{i}] needs a role in {ROLES} and a string content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _answer(value, name: str) -> str:
    """A response given as a string, or as messages ending with the assistant's reply."""
    if isinstance(value, str):
        return value
    messages = _messages(value, name)
    if messages[-1]["role"] != "assistant":
        raise UserError(f"the last message of {name!r} must be the assistant's reply")
    return messages[-1]["content"]


HH_TURN = re.compile(r"\n\n(Human|Assistant): ")  # Anthropic's HH-RLHF transcripts


def _transcript(text: str, name: str) -> list[dict]:
    """An HH-RLHF string ("\n\nHuman: ...\n\nAssistant: ...") as messages."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise UserError(f"{name!r} is a string with no prompt beside it: give a 'prompt' field, or whole "
                        "conversations (message lists, or HH-RLHF's \"\\n\\nHuman: ... \\n\\nAssistant: ...\")")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": said} for who, said in zip(parts[1::2], parts[2::2])]


def normalize_pair(row, where: str) -> PreferencePair:
    """One raw row -> PreferencePair; UserError(reason) if malformed, LeftOut(reason) if it prefers nothing."""
    if isinstance(row, Exception):
        raise row
    if not isinstance(row, dict):
        raise UserError(f"expected an object, got {type(row).__name__}")
    for name in ("chosen", "rejected"):
        if name not in row or row[name] is None:
            raise UserError(f"missing field {name!r} (map other names with --columns, e.g. chosen=good)")
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" in row or "instruction" in row:
        prompt = row.get("prompt", row.get("instruction"))
        if isinstance(prompt, str):
            extra = row.get("input") or ""
            if not isinstance(extra, str):
                raise UserError("'input' must be a string")
            if not prompt.strip():
                raise UserError("empty prompt")
            messages = [{"role": "user", "content": prompt, **({"input": extra} if extra else {})}]
        else:
            messages = _messages(prompt, "prompt")
        chosen, rejected = _answer(chosen, "chosen"), _answer(rejected, "rejected")
    elif isinstance(chosen, (str, list)) and type(chosen) is type(rejected):  # implicit prompt: the shared turns
        c, r = (_transcript(chosen, "chosen"), _transcript(rejected, "rejected")) if isinstance(chosen, str) else \
            (_messages(chosen, "chosen"), _messages(rejected, "rejected"))
        if len(c) < 2 or len(c) != len(r) or c[:-1] != r[:-1]:
            raise UserError("'chosen' and 'rejected' conversations must share every turn but the last")
        messages, chosen, rejected = c[:-1], _answer(c, "chosen"), _answer(r, "rejected")
    else:
        raise UserError("missing field 'prompt' (or 'instruction'); map other names with --columns, e.g. prompt=question")
    if not any(m["role"] == "user" for m in messages):
        raise UserError("the prompt needs a user turn")
    if messages[-1]["role"] == "assistant":
        raise UserError("the prompt must not end with an assistant turn")
    if not chosen.strip() or not rejected.strip():
        raise LeftOut(f"empty {'chosen' if not chosen.strip() else 'rejected'} answer")
    if chosen.strip() == rejected.strip():
        raise LeftOut("chosen and rejected are identical")
    return PreferencePair(messages, chosen, rejected, where, row)


def load_pairs(path, split: str = "train", columns: dict[str, str] | None = None,
               on_invalid: str = "error") -> tuple[list[PreferencePair], list[dict]]:
    """Read and validate every pair. Malformed pairs stop with one error listing file:line: reason for
    each (capped) unless on_invalid='skip'; pairs that prefer nothing (identical or empty answers) are
    always left out. Returns (pairs, left out with reasons)."""
    rows = read_instruction_rows(path, "auto", split, columns, PAIR_FIELDS)
    return collect_valid(rows, normalize_pair, on_invalid, path, "pair")


# ----- tokenizing -----------------------------------------------------------------------------
@dataclass
class TokenizedPair:
    prompt: list[int]
    chosen: list[int]  # response tokens and the EOS that ends them
    rejected: list[int]


def tokenize_pair(pair: PreferencePair, template: Template, tokenizer) -> TokenizedPair:
    """The prompt's tokens exactly as SFT tokenises everything before a reply; each answer and its EOS."""
    eos = [tokenizer.eos_id]
    return TokenizedPair(sft_prompt_ids(pair.prompt, template, tokenizer), tokenizer.encode(pair.chosen) + eos,
                         tokenizer.encode(pair.rejected) + eos)


def fit_pair(pair: TokenizedPair, max_len: int) -> tuple[TokenizedPair | None, str | None]:
    """Fit prompt + each answer into max_len predicted positions (max_len + 1 tokens) by SFT's rule: cut the
    answers' tails if the prompt leaves room, else the prompt from the left, each answer keeping >= 1 token.
    Returns (pair or None, what happened); None when the cut answers became identical."""
    limit = max_len + 1
    longest = max(len(pair.chosen), len(pair.rejected))
    if len(pair.prompt) + longest <= limit:
        return pair, None
    if len(pair.prompt) < limit:
        room = limit - len(pair.prompt)
        fitted, what = TokenizedPair(pair.prompt, pair.chosen[:room], pair.rejected[:room]), "response truncated"
    else:
        fitted, what = TokenizedPair(pair.prompt[-(limit - 1):], pair.chosen[:1], pair.rejected[:1]), "prompt truncated"
    if fitted.chosen == fitted.rejected:
        return None, "identical after truncation"
    return fitted, what


def tokenize_pairs(pairs: list[PreferencePair], template: Template, tokenizer, max_len: int):
    """(tokenized pairs, kept PreferencePairs, counts of what truncation did)."""
    kept, tokenized = [], []
    counts = {"response truncated": 0, "prompt truncated": 0, "identical after truncation": 0}
    for pair in pairs:
        fitted, what = fit_pair(tokenize_pair(pair, template, tokenizer), max_len)
        if what:
            counts[what] += 1
        if fitted is not None:
            kept.append(pair)
            tokenized.append(fitted)
    return tokenized, kept, counts


def fingerprint(tokenized: list[TokenizedPair]) -> str:
    data = json.dumps([[p.prompt, p.chosen, p.rejected] for p in tokenized])
    return hashlib.sha256(data.encode()).hexdigest()[:16]


class PreferenceDataset:
    """Tokenized pairs -> batches of 2B rows: the B chosen sequences, then the same B prompts with their
    rejected answers; right-padded, labels -100 on prompt and padding. When reference log-probs were
    precomputed (`reference`, (N, 2)), batches carry them as ref_chosen / ref_rejected."""

    def __init__(self, pairs: list[TokenizedPair], pad_id: int):
        self.pairs, self.pad_id = pairs, pad_id
        self.reference: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, indices) -> dict:
        indices = [int(i) for i in indices]
        seqs = [(self.pairs[i].prompt, self.pairs[i].chosen) for i in indices] + \
               [(self.pairs[i].prompt, self.pairs[i].rejected) for i in indices]
        T = max(len(p) + len(r) for p, r in seqs) - 1
        input_ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
        for row, (prompt, response) in enumerate(seqs):
            full = prompt + response
            input_ids[row, :len(full) - 1] = torch.tensor(full[:-1])
            labels[row, len(prompt) - 1:len(full) - 1] = torch.tensor(response)
        batch = {"input_ids": input_ids, "labels": labels, "index": torch.tensor(indices),
                 "n_tokens": sum(len(p) + len(r) - 1 for p, r in seqs)}
        if self.reference is not None:
            ref = self.reference[indices]
            batch["ref_chosen"], batch["ref_rejected"] = ref[:, 0], ref[:, 1]
        return batch


def pair_row(messages: list[dict], chosen: str, rejected: str) -> dict:
    """A preference row: {"prompt": str} (with "instruction"/"input" for an Alpaca input) for a single
    user turn, else TRL's conversational form."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        user = messages[0]
        if user.get("input"):
            return {"instruction": user["content"], "input": user["input"], "chosen": chosen, "rejected": rejected}
        return {"prompt": user["content"], "chosen": chosen, "rejected": rejected}
    prompt = [{"role": m["role"], "content": message_text(m)} for m in messages]
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def is_preference_data(path) -> bool:
    """Whether a data file holds chosen/rejected pairs (its first row has both)."""
    for _, row in read_instruction_rows(path, "auto"):
        return isinstance(row, dict) and "chosen" in row and "rejected" in row
    return False
