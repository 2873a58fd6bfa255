"""Constrained decoding: a random-weight model under a grammar writes text the grammar accepts."""
from __future__ import annotations

import json
import re

import pytest
import torch

from gpt2ft.errors import UserError
from gpt2ft.grammar import GrammarSpec, GrammarState, apply_bitmask, new_bitmask

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")


def _decode(model, tok, spec, prompt=(464,), n=80, seed=0):
    """Sample under the grammar's mask; the text, and whether the grammar finished."""
    g = torch.Generator().manual_seed(seed)
    state, mask, ids, out = GrammarState(spec, tok, model.config.vocab_size), new_bitmask(1, model.config.vocab_size), list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            state.fill_mask(mask, 0)
            logits = apply_bitmask(model(torch.tensor([ids]))[0, -1:].float(), mask)
            nxt = int(torch.multinomial(logits.softmax(-1), 1, generator=g))
            if nxt == tok.eos_id:
                break
            state.accept(nxt)
            ids.append(nxt), out.append(nxt)
            if state.finished:
                break
    return tok.decode(out), state.finished or nxt == tok.eos_id


SCHEMA = {"type": "object", "properties": {"play": {"enum": ["Macbeth", "Hamlet"]},
                                           "acts": {"type": "integer", "minimum": 1, "maximum": 5},
                                           "ok": {"type": "boolean"}},
          "required": ["play", "acts", "ok"], "additionalProperties": False}


@pytest.mark.parametrize("seed", range(3))
def test_schema_regex_and_choice_hold_on_a_random_model(tiny_model, seed):
    model, tok = tiny_model
    text, done = _decode(model, tok, GrammarSpec.json_schema(SCHEMA), seed=seed)
    assert done, text
    jsonschema.validate(json.loads(text), SCHEMA)
    text, done = _decode(model, tok, GrammarSpec("regex", r"[0-9]{3}-[a-z]{2}"), seed=seed)
    assert done and re.fullmatch(r"[0-9]{3}-[a-z]{2}", text), text
    text, done = _decode(model, tok, GrammarSpec.choice(["yes", "no", "maybe so"]), seed=seed)
    assert done and text in ("yes", "no", "maybe so"), text


def test_mask_forbids_what_the_grammar_does_not_allow(tiny_model):
    model, tok = tiny_model
    state, mask = GrammarState(GrammarSpec.choice(["yes"]), tok, model.config.vocab_size), new_bitmask(1, model.config.vocab_size)
    state.fill_mask(mask, 0)
    logits = apply_bitmask(torch.zeros(1, model.config.vocab_size), mask)
    allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    assert allowed and all("yes".startswith(tok.decode([t])) for t in allowed)
    assert tok.encode("yes")[0] in allowed and tok.encode("no")[0] not in allowed


@pytest.mark.parametrize("spec", [GrammarSpec("json_schema", "{not json"), GrammarSpec("regex", "(unclosed"),
                                  GrammarSpec("lark", "start: nothing_defined")])
def test_malformed_grammars_are_one_user_error(tiny_model, spec):
    model, tok = tiny_model
    with pytest.raises(UserError, match="malformed"):
        GrammarState(spec, tok, model.config.vocab_size)
