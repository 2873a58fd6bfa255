"""Constrained decoding: a random-weight model under a grammar writes text the grammar accepts."""
from __future__ import annotations

import json
import re

import pytest
import torch

from gpt2ft.errors import UserError
from gpt2ft.grammar import GrammarState, apply_bitmask, new_bitmask
from gpt2ft.sampling import GrammarSpec

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


def test_a_choice_of_thousands_and_of_regex_characters_holds(tiny_model):
    """A choice is one lexeme (an alternation of the literals, each escaped), so thousands of options pass
    the parser's 2000 items a row, and punctuation, newlines and non-ASCII text match only themselves."""
    model, tok = tiny_model
    odd = ["a/b", "x.y*z", "line\nbreak", "tab\there", "back\\slash", "[br]{c}|(d)", "日本", 'q"uote', "^$#&-~"]
    many = [f"opt {i}" for i in range(2500)] + odd
    for seed in range(4):
        text, done = _decode(model, tok, GrammarSpec.choice(many), n=12, seed=seed)
        assert done and text in many, text
    for option in odd:
        text, done = _decode(model, tok, GrammarSpec.choice([option]), n=12)
        assert done and text == option, (text, option)


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


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}}}, "required": ["tags"]},
    {"type": "object", "properties": {"x": {"type": "number", "minimum": -1, "maximum": 1},
                                      "inner": {"type": "object", "properties": {"ok": {"type": "boolean"}},
                                                "required": ["ok"]}}, "required": ["x", "inner"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
                                      "level": {"enum": ["low", "mid", "high"]}, "note": {"type": "string"}},
     "required": ["code", "level"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}, "c": {"type": "string"},
                                      "d": {"type": "integer"}}, "required": ["a", "b", "c", "d"],
     "additionalProperties": False},
]


def test_schemas_parse_within_the_token_budget_in_one_batch(tiny_model):
    """Unbounded strings and numbers on a random model: the row still closes its output in time
    (budget-aware closing), alone and in a batch of rows with and without grammars."""
    from gpt2ft.generation import complete_batch
    from gpt2ft.sampling import SamplingConfig

    model, tok = tiny_model
    cfgs = [SamplingConfig(max_new_tokens=48, temperature=1.0, seed=s, grammar=GrammarSpec.json_schema(schema))
            for s, schema in enumerate(SCHEMAS)]
    prompts = [tok.encode("Reply in JSON:")] * len(cfgs)
    from gpt2ft.generation import Engine

    engine = Engine(model, tok, max_batch=8)
    rows = [engine.add(p, c) for p, c in zip(prompts, cfgs)] + [engine.add(prompts[0], SamplingConfig(max_new_tokens=20))]
    while engine.has_work:
        engine.step()
    for row, schema in zip(rows, SCHEMAS):
        assert row.finish_reason == "stop", (row.text, row.finish_reason)
        jsonschema.validate(json.loads(row.text), schema)
    assert rows[-1].completion_tokens == 20 or rows[-1].finish_reason == "stop"
    greedy = complete_batch(model, tok, prompts[:1], SamplingConfig(max_new_tokens=48, temperature=0.0,
                                                                    grammar=GrammarSpec.json_schema(SCHEMAS[0])))
    jsonschema.validate(json.loads(greedy[0].text), SCHEMAS[0])


def test_closing_keeps_room_for_what_a_schema_still_needs(tiny_model):
    """A schema whose shortest output is long (two nested required objects, a date-time, an address)
    still closes within a tight budget: the row starts closing at twice the shortest output's length
    (counted by hand: '{"', 'start', '":{"', ... 22 tokens for the points), and formats come out as the
    common validators accept them (no year 0000, no lowercase 'z')."""
    from gpt2ft.generation import complete_batch
    from gpt2ft.grammar import shortest_completion
    from gpt2ft.sampling import SamplingConfig

    model, tok = tiny_model
    point = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
             "required": ["x", "y"], "additionalProperties": False}
    schemas = [{"type": "object", "properties": {"start": point, "end": point}, "required": ["start", "end"],
                "additionalProperties": False},
               {"type": "object", "properties": {"t": {"type": "string", "format": "date-time"},
                                                 "ip": {"type": "string", "format": "ipv4"}},
                "required": ["t", "ip"], "additionalProperties": False}]
    assert shortest_completion(GrammarSpec.json_schema({"type": "boolean"}), tok, model.config.vocab_size) == 1
    needs = [shortest_completion(GrammarSpec.json_schema(s), tok, model.config.vocab_size) for s in schemas]
    assert 15 <= needs[0] <= 30 and needs[1] >= 15, needs
    for schema, need in zip(schemas, needs):
        for seed in range(3):
            cfg = SamplingConfig(max_new_tokens=need + 8, temperature=1.0, seed=seed, grammar=GrammarSpec.json_schema(schema))
            row = complete_batch(model, tok, [tok.encode("Reply in JSON:")], cfg)[0]
            assert row.finish_reason == "stop", row.text
            jsonschema.validate(json.loads(row.text), schema, format_checker=jsonschema.FormatChecker())


def test_a_string_closing_token_leaves_no_string_open():
    """GPT-2's single token `":"","` closes a string and opens another: counted as closing, a row near its
    budget took it again and again and the JSON never ended (`{"":"","":"",...`)."""
    from gpt2ft.grammar import closing_tiers
    from gpt2ft.tokenizer import gpt2_tokenizer

    tok = gpt2_tokenizer()
    tiers = closing_tiers(tok, 50257)
    (reopening,) = tok.encode('":"","')
    (closing,) = tok.encode('"}')
    assert tiers[1, closing] and not tiers[1, reopening]
