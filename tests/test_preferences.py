"""Preference data: formats, validation, SFT-identical prompt rendering, truncation, batch layout."""
import json

import pytest
import torch

from gpt2ft.data.instructions import load_records
from gpt2ft.data.preferences import (PreferenceDataset, TokenizedPair, fit_pair, is_preference_data, load_pairs,
                                     pair_row, tokenize_pair, tokenize_pairs)
from gpt2ft.data.sft import tokenize_messages
from gpt2ft.errors import UserError
from gpt2ft.losses import IGNORE, sequence_logps
from gpt2ft.templates import get_template
from gpt2ft.tokenizer import gpt2_tokenizer

ALPACA, CHAT = get_template("alpaca"), get_template("chat")


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_every_format_reads_to_the_same_pair(tmp_path):
    user = [{"role": "user", "content": "Name a colour."}]
    rows = [{"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
            {"instruction": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
            {"prompt": user, "chosen": [{"role": "assistant", "content": "Blue."}],
             "rejected": [{"role": "assistant", "content": "Seven."}]},
            {"chosen": user + [{"role": "assistant", "content": "Blue."}],
             "rejected": user + [{"role": "assistant", "content": "Seven."}]}]
    pairs, bad = load_pairs(_jsonl(tmp_path / "p.jsonl", rows))
    (tmp_path / "p.csv").write_text('question,good,bad\n"Name a colour.",Blue.,Seven.\n')
    csv_pairs, _ = load_pairs(tmp_path / "p.csv", columns={"question": "prompt", "good": "chosen", "bad": "rejected"})
    (tmp_path / "p.json").write_text(json.dumps([{"q": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}]))
    json_pairs, _ = load_pairs(tmp_path / "p.json", columns={"q": "prompt"})
    assert not bad
    for p in pairs + csv_pairs + json_pairs:
        assert (p.prompt, p.chosen, p.rejected) == (user, "Blue.", "Seven.")
    assert pair_row(user, "Blue.", "Seven.") == rows[0] and is_preference_data(tmp_path / "p.jsonl")
    conversational = pair_row([{"role": "system", "content": "Be brief."}] + user, "Blue.", "Seven.")
    assert load_pairs(_jsonl(tmp_path / "c.jsonl", [conversational]))[0][0].prompt[1:] == user


def test_bad_pairs_are_listed_by_line_and_can_be_skipped(tmp_path):
    data = _jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Q1", "chosen": "a", "rejected": "b"},
        {"prompt": "Q2", "chosen": "a"},
        "{not json",
        {"prompt": "", "chosen": "a", "rejected": "b"},
        {"prompt": "Q5", "chosen": "same", "rejected": "same "},
        {"prompt": "Q6", "chosen": "a", "rejected": "  "},
        {"prompt": [{"role": "user", "content": "Q7"}, {"role": "assistant", "content": "x"}],
         "chosen": "a", "rejected": "b"},
    ])
    with pytest.raises(UserError) as e:
        load_pairs(data)
    msg = str(e.value)
    assert msg.startswith("4 invalid pair(s)") and "p.jsonl:2: missing field 'rejected'" in msg
    assert "p.jsonl:3: invalid JSON" in msg and "p.jsonl:4: empty prompt" in msg and "p.jsonl:7:" in msg
    invalid, _, left_out = msg.partition("left out in any case")  # identical / empty answers: dropped, not errors
    assert ":5:" not in invalid and invalid.endswith("(and 2 ")
    assert "p.jsonl:5: chosen and rejected are identical" in left_out and "p.jsonl:6: empty rejected" in left_out
    pairs, bad = load_pairs(data, on_invalid="skip")
    assert [p.where.split(":")[-1] for p in pairs] == ["1"]
    reasons = {b["where"].split(":")[-1]: b["reason"] for b in bad}
    assert reasons["5"] == "chosen and rejected are identical" and reasons["6"] == "empty rejected answer"
    with pytest.raises(UserError, match="no valid pairs"):
        load_pairs(_jsonl(tmp_path / "q.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "a"}]))


@pytest.mark.parametrize("template", [ALPACA, CHAT])
def test_prompt_and_answers_are_tokenized_exactly_as_sft(tmp_path, template):
    tok = gpt2_tokenizer()
    system = [{"role": "system", "content": "Be brief."}]
    pref = _jsonl(tmp_path / "p.jsonl", [
        {"instruction": "Translate", "input": "bonjour", "chosen": "hello", "rejected": "goodbye"},
        {"prompt": system + [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Go away."}])
    sft = _jsonl(tmp_path / "s.jsonl", [
        {"instruction": "Translate", "input": "bonjour", "output": "hello"},
        {"messages": system + [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}])
    pairs, _ = load_pairs(pref)
    records, _ = load_records(sft)
    for pair, record in zip(pairs, records):
        ex = tokenize_messages(record.messages, template, tok)
        tp = tokenize_pair(pair, template, tok)
        assert tp.prompt + tp.chosen == ex.ids
        assert tp.chosen == [t for t, s in zip(ex.ids, ex.supervised) if s]
        assert tp.rejected == tok.encode(pair.rejected) + [tok.eos_id]


def test_truncation_cuts_answers_then_the_prompt_from_the_left():
    pair = TokenizedPair([1, 2, 3, 4], [10, 11, 12], [20, 21])
    assert fit_pair(pair, 6) == (pair, None)
    assert fit_pair(pair, 5) == (TokenizedPair([1, 2, 3, 4], [10, 11], [20, 21]), "response truncated")
    assert fit_pair(pair, 3) == (TokenizedPair([2, 3, 4], [10], [20]), "prompt truncated")
    assert fit_pair(pair, 2) == (TokenizedPair([3, 4], [10], [20]), "prompt truncated")
    assert fit_pair(TokenizedPair([1, 2, 3], [5, 6], [5, 7]), 3) == (None, "identical after truncation")


def test_batch_lays_out_chosen_then_rejected_and_scores_each_like_alone(tiny_model, tmp_path):
    model, tok = tiny_model
    data = _jsonl(tmp_path / "p.jsonl", [{"prompt": "Q one?", "chosen": "A fine answer.", "rejected": "No."},
                                         {"prompt": "A longer second question?", "chosen": "Yes.",
                                          "rejected": "A rambling answer that goes on."}])
    pairs, _ = load_pairs(data)
    tokenized, kept, counts = tokenize_pairs(pairs, ALPACA, tok, max_len=60)
    assert len(kept) == 2 and not any(counts.values())
    ds = PreferenceDataset(tokenized, tok.eos_id)
    batch = ds.batch([1, 0])
    assert batch["input_ids"].shape[0] == 4 and batch["index"].tolist() == [1, 0]
    rows = [(1, "chosen"), (0, "chosen"), (1, "rejected"), (0, "rejected")]
    for row, (i, side) in enumerate(rows):
        answer = getattr(tokenized[i], side)
        assert batch["labels"][row][batch["labels"][row] != IGNORE].tolist() == answer
    with torch.no_grad():
        together, n = sequence_logps(model, batch)
        for row, (i, side) in enumerate(rows):
            ids = torch.tensor([tokenized[i].prompt + getattr(tokenized[i], side)])
            logp = torch.log_softmax(model(ids[:, :-1]).float(), -1)[0]
            k = len(tokenized[i].prompt) - 1
            alone = logp[k:].gather(-1, ids[0, k + 1:, None]).sum()
            assert torch.allclose(together[row], alone, atol=1e-4)
            assert n[row] == len(getattr(tokenized[i], side))
    ds.reference = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    b = ds.batch([1])
    assert b["ref_chosen"].tolist() == [-3.0] and b["ref_rejected"].tolist() == [-4.0]


def test_hh_rlhf_transcripts_share_their_prompt(tmp_path):
    """Anthropic's HH-RLHF rows: two whole transcripts; the turns they share are the prompt."""
    from gpt2ft.data.preferences import load_pairs

    row = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: What is 2+2?\n\nAssistant: 4",
           "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: What is 2+2?\n\nAssistant: five"}
    unprompted = {"chosen": "good", "rejected": "bad"}
    (tmp_path / "hh.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(unprompted) + "\n")
    pairs, rejected = load_pairs(tmp_path / "hh.jsonl", on_invalid="skip")
    (pair,) = pairs
    assert [m["role"] for m in pair.prompt] == ["user", "assistant", "user"]
    assert pair.prompt[-1]["content"] == "What is 2+2?"
    assert (pair.chosen, pair.rejected) == ("4", "five")
    assert "no prompt beside it" in rejected[0]["reason"]
