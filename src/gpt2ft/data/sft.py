"""Conversations -> token ids with the loss on assistant replies only; truncation to the context,
per-record weights, and batches (dynamic padding or packing). SFT, DPO and eval share these."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from ..losses import IGNORE
from ..templates import Template, message_text

TRUNCATION_COUNTS = ("response truncated", "prompt truncated", "no supervised token")


@dataclass
class TokenizedExample:
    ids: list[int]  # the whole sequence, prompt and response and EOS
    supervised: list[bool]  # per token: is it a target the loss trains?


def tokenize_messages(messages: list[dict], template: Template, tokenizer, train_on_prompt: bool = False,
                      add_generation_prompt: bool = False) -> TokenizedExample:
    """Render with the template and tokenise segment by segment; EOS follows each reply, and the
    reply tokens and their EOS are supervised (all tokens with train_on_prompt). A reply with no text
    before it (an empty prompt) follows an <|endoftext|>, as generation starts from one (Engine.add)."""
    segments = template.render(messages, add_generation_prompt)
    ids, sup = ([tokenizer.eos_id], [train_on_prompt]) if segments and segments[0].trained else ([], [])
    for seg in segments:
        piece = tokenizer.encode(seg.text) + ([tokenizer.eos_id] if seg.trained else [])
        ids += piece
        sup += [(seg.trained and seg.weight != 0) or train_on_prompt] * len(piece)
    return TokenizedExample(ids, sup)


def prompt_ids(messages: list[dict], template: Template, tokenizer) -> list[int]:
    """The tokens a reply continues, exactly as in training (earlier replies each end with EOS)."""
    return tokenize_messages(messages, template, tokenizer, add_generation_prompt=True).ids


def fit_to_length(ex: TokenizedExample, max_len: int) -> tuple[TokenizedExample | None, str | None]:
    """Make the example fit max_len predicted positions (max_len + 1 tokens), keeping >= 1 supervised
    token: cut the response tail first, else the prompt from the left. Returns (example, what happened):
    None or one of TRUNCATION_COUNTS (the example is None for "no supervised token")."""
    if len(ex.ids) <= max_len + 1:
        return ex, None
    first = ex.supervised.index(True) if True in ex.supervised else None
    if first is None:
        return None, "no supervised token"
    if first < max_len:  # the prompt fits: cut the response's tail
        return TokenizedExample(ex.ids[:max_len + 1], ex.supervised[:max_len + 1]), "response truncated"
    start = first - max_len  # keep the last max_len prompt tokens and one response token
    return TokenizedExample(ex.ids[start:first + 1], ex.supervised[start:first + 1]), "prompt truncated"


def build_examples(records, template: Template, tokenizer, max_len: int, train_on_prompt: bool = False,
                   oversample: tuple[str | None, float] = (None, 1.0)):
    """Tokenise and fit every record; weight = the record's weight, times `factor` when its raw row
    contains `keyword` (case-insensitive). Returns (examples, weights, counts of what was cut)."""
    keyword, factor = oversample
    examples, weights, hits = [], [], 0
    counts = dict.fromkeys(TRUNCATION_COUNTS, 0)
    for r in records:
        ex, what = fit_to_length(tokenize_messages(r.messages, template, tokenizer, train_on_prompt), max_len)
        if what:
            counts[what] += 1
        if ex is None:
            continue
        examples.append(ex)
        # the conversation's own text: not the field names, nor JSON's escapes of non-ASCII letters
        hit = bool(keyword) and keyword.lower() in "\n".join(message_text(m) for m in r.messages).lower()
        hits += hit
        weights.append(r.weight * (factor if hit else 1.0))
    if keyword and examples and hits in (0, len(examples)):
        raise UserError(f"--oversample-keyword {keyword!r} is in {'none' if not hits else 'every one'} of the "
                        f"{len(examples)} training records, so it changes nothing: pick a word only some contain")
    if keyword:
        print(f"--oversample-keyword {keyword!r}: {hits} of {len(examples)} training records, weighted x{factor:g}")
    return examples, weights, counts


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
