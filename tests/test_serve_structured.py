"""Structured outputs through the server (in process, the official openai client over a TestClient):
JSON schemas, regex, choices, forced tool calls, logit_bias, min_tokens, best_of, echo-only scoring,
and every unknown or unsupported field refused with a 400 naming it. LangChain's structured output
and tool binding on top."""
from __future__ import annotations

import asyncio
import json

import pytest
import torch

pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
from fastapi.testclient import TestClient  # noqa: E402

KEY = "k"
AUTH = {"Authorization": f"Bearer {KEY}"}
USER = [{"role": "user", "content": "Answer in JSON"}]

OBJ = lambda props, req=None, **kw: {"type": "object", "properties": props, "required": list(props) if req is None else req,
                                     "additionalProperties": False, **kw}
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0,
                                                                         "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
        "required": ["id", "tags"]}}, "required": ["user"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"x": {"type": "number", "minimum": -1, "maximum": 1}}, "required": ["x"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["a"],
     "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
     "required": ["code"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": ["string", "null"]}},
     "required": ["ok", "note"]},
    {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 5}]},
    {"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 6}}, "required": ["s"],
     "additionalProperties": False},
    # nested objects, arrays of objects, enums, consts, bounds, optional fields, patterns, refs, unions
    OBJ({"id": {"type": "string", "pattern": "^[a-f0-9]{8}$"}, "count": {"type": "integer", "minimum": 1, "maximum": 5}}),
    OBJ({"a": OBJ({"b": OBJ({"c": {"type": "boolean"}})})}),  # three levels deep
    {"type": "array", "items": OBJ({"k": {"type": "string", "maxLength": 4}, "v": {"type": "integer"}}),
     "minItems": 1, "maxItems": 3},
    {"enum": [1, "two", None, True]},
    OBJ({"version": {"const": 2}, "mode": {"enum": ["fast", "slow"]}}),
    OBJ({"p": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}}),
    {"type": "integer", "minimum": -50, "maximum": -10},
    OBJ({"x": {"type": "integer"}, "y": {"type": "integer"}}, req=[]),  # every field optional
    {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 5},
    OBJ({"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}}),
    OBJ({"email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}}),
    {"type": "array", "prefixItems": [{"type": "string", "maxLength": 5}, {"type": "integer"}, {"type": "boolean"}],
     "items": False, "minItems": 3},
    {"oneOf": [OBJ({"kind": {"const": "circle"}, "r": {"type": "number", "minimum": 0}}),
               OBJ({"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1}})]},
    {"$defs": {"pt": OBJ({"x": {"type": "integer"}, "y": {"type": "integer"}})},
     **OBJ({"start": {"$ref": "#/$defs/pt"}, "end": {"$ref": "#/$defs/pt"}})},
    {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 3}, "maxItems": 3},
     "minItems": 1, "maxItems": 3},
    OBJ({"n": {"type": ["integer", "null"], "minimum": 0, "maximum": 10}}),
    {"type": "boolean"},
    {"type": "string", "enum": ["yes", "no", "maybe"]},
    OBJ({"first": {"type": "string", "maxLength": 8}, "last": {"type": "string", "maxLength": 8},
         "age": {"type": "integer", "minimum": 18, "maximum": 99}, "member": {"type": "boolean"},
         "score": {"type": "number", "minimum": 0, "maximum": 100}}, req=["first", "last", "age"]),
    {"type": "array", "items": {"type": "string", "pattern": "^[A-Z][a-z]{1,5}$"}, "minItems": 1, "maxItems": 3},
    {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}, "maxProperties": 3},
    {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
               {"type": "object", "properties": {"b": {"type": "string", "maxLength": 3}}, "required": ["b"]}]},
    OBJ({"when": {"type": "string", "format": "date"}, "uid": {"type": "string", "format": "uuid"}}),
    OBJ({"n": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100}}),
    OBJ({"t": {"type": "string", "format": "date-time"}, "ip": {"type": "string", "format": "ipv4"}}),
    {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},  # more properties allowed
    OBJ({"s": {"type": "string", "minLength": 3}}),
]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                           "unit": {"enum": ["C", "F"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}


@pytest.fixture(scope="module")
def app(tiny_model):
    from gpt2ft.serve import ServeConfig, create_app, served_model

    return create_app([served_model("tiny", tiny_model.model, tiny_model.tokenizer)],
                      ServeConfig(api_key=KEY, max_tokens=48, max_n=8))


@pytest.fixture(scope="module")
def http(app):
    with TestClient(app, headers=AUTH) as client:
        yield client


@pytest.fixture(scope="module")
def client(http):
    return openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0)


def schema_format(schema, name="out"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def chat(client, **kw):
    return client.chat.completions.create(model="tiny", messages=kw.pop("messages", USER),
                                          max_tokens=kw.pop("max_tokens", 40), **kw)


def assert_error(r, param):
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    return err["message"]


# ----- JSON schemas ------------------------------------------------------------------------------------
@pytest.mark.parametrize("i", range(len(SCHEMAS)))
def test_reply_validates_against_the_schema_whole_and_streamed(client, i):
    schema = SCHEMAS[i]
    for kw in ({"temperature": 0}, {"temperature": 1.0, "seed": i}):
        r = chat(client, response_format=schema_format(schema), **kw)
        validate(r.choices[0].message.content, schema)
        assert r.choices[0].finish_reason == "stop"
        chunks = chat(client, response_format=schema_format(schema), stream=True, **kw)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == r.choices[0].message.content


@pytest.mark.parametrize("first", range(0, len(SCHEMAS), 8))
def test_eight_concurrent_constrained_requests(app, http, first):
    batch = SCHEMAS[first:first + 8]

    async def main():
        async with openai.AsyncOpenAI(base_url="http://testserver/v1", api_key=KEY, max_retries=0,
                                      http_client=_AsyncBridge(app)) as ac:
            return await asyncio.gather(*[ac.chat.completions.create(
                model="tiny", messages=USER, max_tokens=40, temperature=1.0, seed=first + s,
                response_format=schema_format(schema)) for s, schema in enumerate(batch)])

    for schema, r in zip(batch, asyncio.run(main())):
        validate(r.choices[0].message.content, schema)


def validate(text: str, schema: dict) -> None:
    """`text` parses and validates against `schema`, formats (date, uuid, email, date-time) included."""
    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())


def test_keywords_the_grammar_cannot_enforce_are_400_naming_them(http):
    for schema, word in (({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
                         ({"type": "object", "properties": {"a": {"type": "integer"}}, "maxProperties": 1},
                          "maxProperties")):
        r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": USER, "max_tokens": 5,
                                                    "response_format": schema_format(schema)})
        assert word in assert_error(r, "response_format.json_schema.schema")


def _AsyncBridge(app):
    import httpx

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver", headers=AUTH)


def test_greedy_schema_output_equals_in_process_generate(client, tiny_model):
    from gpt2ft.generation import generate
    from gpt2ft.sampling import GrammarSpec

    schema = SCHEMAS[0]
    r = chat(client, response_format=schema_format(schema), temperature=0)
    want = generate(tiny_model.model, tiny_model.tokenizer, "User: Answer in JSON\nAssistant:", max_new_tokens=40, temperature=0,
                    template_stop=["\nUser:", "\nAssistant:"], grammar=GrammarSpec.json_schema(schema))
    assert r.choices[0].message.content == want


def test_json_object_regex_choice_and_vllm_fields(client, http):
    r = chat(client, response_format={"type": "json_object"}, temperature=1.0, seed=3)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    for body, check in (
            ({"guided_regex": "[a-z]{3}-[0-9]{2}"}, lambda t: len(t) == 6 and t[3] == "-" and t[4:].isdigit()),
            ({"structured_outputs": {"regex": "(yes|no)!"}}, lambda t: t in ("yes!", "no!")),
            ({"guided_choice": ["alpha", "beta", "gamma"]}, lambda t: t in ("alpha", "beta", "gamma")),
            ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down")),
            ({"guided_json": {**SCHEMAS[2], "additionalProperties": False}}, lambda t: json.loads(t)["color"] in ("red", "green", "blue")),
            ({"guided_grammar": 'start: "a" "b"+'}, lambda t: t[0] == "a" and set(t[1:]) == {"b"})):
        for path, payload in (("/v1/chat/completions", {"messages": USER}), ("/v1/completions", {"prompt": "x"})):
            res = http.post(path, json={"model": "tiny", "max_tokens": 20, "temperature": 1.0, "seed": 1,
                                        **payload, **body})
            assert res.status_code == 200, res.text
            choice = res.json()["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
            assert check(text), (body, text)


def test_constraint_errors_name_the_field(http):
    base = {"model": "tiny", "messages": USER, "max_tokens": 5}
    assert "guided_regex" in assert_error(http.post("/v1/chat/completions", json={
        **base, "guided_regex": "a", "response_format": {"type": "json_object"}}), "guided_regex")
    assert_error(http.post("/v1/chat/completions", json={**base, "guided_regex": "(unclosed"}), "guided_regex")
    assert_error(http.post("/v1/chat/completions", json={
        **base, "response_format": schema_format({"type": "no-such-type"})}), "response_format.json_schema.schema")
    assert_error(http.post("/v1/chat/completions", json={**base, "guided_choice": []}), "guided_choice")
    assert_error(http.post("/v1/chat/completions", json={**base, "guided_grammar": "start: ???"}), "guided_grammar")
    r = http.post("/v1/chat/completions", json={**base, "response_format": {"type": "text"}})
    assert r.status_code == 200


# ----- logit_bias, min_tokens, ignore_eos, best_of, echo -----------------------------------------------
def test_logit_bias_bans_and_forces(client, tiny_model):
    kw = dict(model="tiny", prompt="The", max_tokens=12, temperature=0, logprobs=0)
    plain = client.completions.create(**kw).choices[0]
    first = plain.logprobs.tokens[0]
    token = tiny_model.tokenizer.encode(first)[0]
    banned = client.completions.create(**kw, logit_bias={str(token): -100}).choices[0]
    assert token not in [tiny_model.tokenizer.encode(t)[0] for t in banned.logprobs.tokens]
    forced = client.completions.create(**{**kw, "temperature": 1.0}, seed=5, logit_bias={"318": 100}).choices[0]
    assert forced.text == tiny_model.tokenizer.decode([318] * 12)


def test_min_tokens_and_ignore_eos(client, tiny_model):
    eos = tiny_model.tokenizer.eos_id
    r = client.completions.create(model="tiny", prompt="x", max_tokens=10, temperature=0,
                                  logit_bias={str(eos): 100}, extra_body={"min_tokens": 6})
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "stop"  # six, then EOS
    r = client.completions.create(model="tiny", prompt="x", max_tokens=10, temperature=0,
                                  logit_bias={str(eos): 100}, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 10 and r.choices[0].finish_reason == "length"


def test_best_of_returns_the_most_likely_candidates(client):
    kw = dict(model="tiny", prompt="Once", max_tokens=6, temperature=1.0, seed=11, logprobs=0)
    every = client.completions.create(n=4, **kw).choices
    score = {c.text: sum(c.logprobs.token_logprobs) for c in every}
    best = client.completions.create(n=2, best_of=4, **kw)
    assert [c.text for c in best.choices] == sorted(score, key=score.get, reverse=True)[:2]
    assert best.usage.completion_tokens == 4 * 6


def test_echo_with_max_tokens_zero_scores_the_prompt(client, hf_model, tiny_model):
    tok = tiny_model.tokenizer
    ids = tok.encode("Hello world, again")
    r = client.completions.create(model="tiny", prompt="Hello world, again", max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "Hello world, again" and lp.token_logprobs[0] is None
    with torch.no_grad():
        logp = hf_model(torch.tensor([ids])).logits[0].log_softmax(-1)
    want = [float(logp[i, t]) for i, t in enumerate(ids[1:])]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    chunks = list(client.completions.create(model="tiny", prompt="Hi", max_tokens=0, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "Hi"


# ----- tool calls ---------------------------------------------------------------------------------------
def test_forced_tool_call_has_schema_valid_arguments(client):
    for tools, choice in (([WEATHER], "required"), ([WEATHER, ADD], {"type": "function", "function": {"name": "add"}}),
                          ([WEATHER, ADD], "required")):
        r = chat(client, tools=tools, tool_choice=choice, temperature=1.0, seed=2)
        choice0 = r.choices[0]
        assert choice0.finish_reason == "tool_calls" and choice0.message.content is None
        (call,) = choice0.message.tool_calls
        schema = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
        if isinstance(choice, dict):
            assert call.function.name == "add"
        jsonschema.validate(json.loads(call.function.arguments), schema[call.function.name])
        # streamed: the deltas add up to the same call
        chunks = list(chat(client, tools=tools, tool_choice=choice, temperature=1.0, seed=2, stream=True))
        deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
        assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
        assert {d.function.name for d in deltas} - {None} == {call.function.name}
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_tool_result_continues_the_conversation(client, tiny_model):
    r = chat(client, tools=[WEATHER], tool_choice="required", temperature=0)
    call = r.choices[0].message.tool_calls[0]
    messages = USER + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                       {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    follow = chat(client, messages=messages, max_tokens=5, temperature=0)
    text = follow.choices[0].message.content
    arguments = json.loads(call.function.arguments)
    rendered = ("User: Answer in JSON\nAssistant:" + json.dumps({"name": "get_weather", "arguments": arguments}))
    ids = tiny_model.tokenizer.encode(rendered) + [tiny_model.tokenizer.eos_id] + \
        tiny_model.tokenizer.encode("Tool: sunny, 21 C\nAssistant:")
    assert follow.usage.prompt_tokens == len(ids)
    raw = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    assert raw.choices[0].text == text


def test_tool_choice_errors(http):
    base = {"model": "tiny", "messages": USER, "max_tokens": 5}
    assert "tool-call format" in assert_error(http.post("/v1/chat/completions", json={**base, "tools": [ADD]}),
                                              "tool_choice")
    assert_error(http.post("/v1/chat/completions", json={**base, "tools": [ADD], "tool_choice": "auto"}), "tool_choice")
    assert_error(http.post("/v1/chat/completions", json={**base, "tool_choice": "required"}), "tool_choice")
    assert_error(http.post("/v1/chat/completions", json={
        **base, "tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "nope"}}}), "tool_choice")
    assert_error(http.post("/v1/chat/completions", json={**base, "tools": [ADD, ADD], "tool_choice": "required"}),
                 "tools")
    r = http.post("/v1/chat/completions", json={**base, "tools": [ADD], "tool_choice": "none"})
    assert r.status_code == 200 and isinstance(r.json()["choices"][0]["message"]["content"], str)


def test_two_tools_whose_schemas_have_defs_can_be_required(client):
    """With several tools the schemas sit inside one anyOf: their own "#/$defs/..." references still resolve."""
    nested = {"type": "function", "function": {"name": "place", "parameters": {
        "$defs": {"pt": OBJ({"x": {"type": "integer"}, "y": {"type": "integer"}})},
        **OBJ({"at": {"$ref": "#/$defs/pt"}})}}}
    r = chat(client, tools=[nested, ADD], tool_choice="required", temperature=1.0, seed=4)
    (call,) = r.choices[0].message.tool_calls
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in (nested, ADD)}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema)


@pytest.mark.parametrize("tools", [[WEATHER], [WEATHER, ADD]])
def test_a_forced_call_cut_short_is_still_a_call_whole_and_streamed(client, tools):
    """OpenAI's shape for a call that ran out of tokens: tool_calls with the arguments so far, finish_reason
    "length", content null: never the JSON fragment as text; the stream sends the same."""
    r = chat(client, tools=tools, tool_choice="required", max_tokens=4, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and choice.message.content is None
    (call,) = choice.message.tool_calls
    if len(tools) == 1:
        assert call.function.name == "get_weather" and call.function.arguments.startswith("{")
    chunks = list(chat(client, tools=tools, tool_choice="required", max_tokens=4, temperature=0, stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(not c.choices[0].delta.content for c in chunks if c.choices)


def test_null_means_the_default_where_openai_allows_it(http):
    for path, body in (("/v1/chat/completions", {"messages": USER, "n": None, "stream": None, "logprobs": None,
                                                  "stream_options": None}),
                       ("/v1/completions", {"prompt": "x", "echo": None, "n": None})):
        r = http.post(path, json={"model": "tiny", "max_tokens": 2, **body})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 1


def test_an_assistants_refusal_is_rendered_as_what_it_said(http):
    def prompt_tokens(assistant):
        body = {"model": "tiny", "max_tokens": 1, "messages": USER + [assistant, {"role": "user", "content": "ok"}]}
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    said = prompt_tokens({"role": "assistant", "content": "I cannot help with that"})
    assert prompt_tokens({"role": "assistant", "content": None, "refusal": "I cannot help with that"}) == said


def test_logprobs_cover_the_returned_text_only(client):
    """Tokens of a stop string cut from the text are not in its log-probabilities; the first prompt token of
    an echo has none (null, as its token_logprobs entry)."""
    free = client.completions.create(model="tiny", prompt="The", max_tokens=12, temperature=0, logprobs=0)
    text = free.choices[0].text
    assert "".join(free.choices[0].logprobs.tokens).startswith(text)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.completions.create(model="tiny", prompt="The", max_tokens=12, temperature=0, logprobs=0, stop=stop)
    kept, lp = cut.choices[0].text, cut.choices[0].logprobs
    assert cut.choices[0].finish_reason == "stop" and len(kept) < len(text)
    assert all(offset < len(kept) for offset in lp.text_offset) and "".join(lp.tokens).startswith(kept)
    streamed = list(client.completions.create(model="tiny", prompt="The", max_tokens=12, temperature=0, logprobs=0,
                                              stop=stop, stream=True))  # the stream sends the same tokens
    assert [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == lp.tokens
    echo = client.completions.create(model="tiny", prompt="The king", max_tokens=1, temperature=0, logprobs=1,
                                     echo=True)
    assert echo.choices[0].logprobs.token_logprobs[0] is None and echo.choices[0].logprobs.top_logprobs[0] is None


def test_a_conversation_an_instruction_template_cannot_answer_is_400(tiny_model):
    from gpt2ft.serve.prompts import chat_prompt
    from gpt2ft.serve.responses import APIError
    from gpt2ft.serve.schema import Message
    from gpt2ft.templates import TEMPLATES

    msgs = [Message(role="user", content="a"), Message(role="assistant", content="b")]
    with pytest.raises(APIError, match="must end with a user"):
        chat_prompt(TEMPLATES["alpaca"], msgs, tiny_model.tokenizer)
    ids, _ = chat_prompt(TEMPLATES["chat"], msgs, tiny_model.tokenizer)  # a chat template opens the next reply
    assert tiny_model.tokenizer.decode(ids).endswith(TEMPLATES["chat"].assistant)


def test_template_renders_tool_turns_as_its_jinja_does():
    jinja2 = pytest.importorskip("jinja2")
    from gpt2ft.templates import TEMPLATES, Template

    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "{\"a\": 1}"},
            {"role": "tool", "content": "42"}]
    for t in TEMPLATES.values():
        want = "".join(s.text + ("<eos>" if s.trained else "") for s in t.render(msgs, add_generation_prompt=True))
        got = jinja2.Template(t.to_jinja()).render(messages=msgs, eos_token="<eos>", add_generation_prompt=True)
        assert got == want, t.name
    assert "### Tool:\n42\n\n" in TEMPLATES["chat"].prompt(msgs)
    old = Template.from_dict({"name": "old", "kind": "chat", "system": "{content}", "user": "U: {content}\n"})
    assert old.prompt(msgs[2:]) == "U: 42\n"  # a saved template without a tool format: the user format


# ----- every field honoured or refused -------------------------------------------------------------------
@pytest.mark.parametrize("path, change, param", [
    ("/v1/chat/completions", {"functions": [ADD["function"]]}, "functions"),
    ("/v1/chat/completions", {"frobnicate": 1}, "frobnicate"),
    ("/v1/chat/completions", {"audio": {"voice": "x"}}, "audio"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),            # without logprobs: true
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages.0.extra"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format"),
    ("/v1/chat/completions", {"logit_bias": {"99999999": 1}}, "logit_bias"),  # not in the vocabulary
    ("/v1/chat/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"5": 1, "05": -1}}, "logit_bias"),  # one token, two spellings
    ("/v1/chat/completions", {"min_tokens": 9}, "min_tokens"),                # over max_tokens 5
    ("/v1/chat/completions", {"echo": True}, "echo"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/completions", {"best_of": 1, "n": 2}, "best_of"),
    ("/v1/completions", {"best_of": 2, "stream": True}, "best_of"),
    ("/v1/completions", {"best_of": 9}, "best_of"),                           # over --max-n 8
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),                     # 0 only with echo
    ("/v1/completions", {"tools": [ADD]}, "tools"),
    ("/v1/completions", {"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
    # what a constraint decides (the end of the output) is not also asked of stop / min_tokens / ignore_eos
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}, "stop": ":"}, "stop"),
    ("/v1/chat/completions", {"guided_choice": ["yes", "no"], "min_tokens": 2}, "min_tokens"),
    ("/v1/chat/completions", {"guided_choice": ["yes"], "ignore_eos": True}, "ignore_eos"),
    ("/v1/completions", {"guided_regex": "[ab]+", "stop": "a"}, "stop"),
    ("/v1/chat/completions", {"stop": ""}, "stop"),                            # an empty stop string
    # the length limit: the two names of it must agree; errors name the one the client sent
    ("/v1/chat/completions", {"max_completion_tokens": 2}, "max_tokens"),      # max_tokens 5 beside it
    ("/v1/chat/completions", {"max_tokens": None, "max_completion_tokens": 5000}, "max_completion_tokens"),
    # echo with max_tokens 0 generates nothing: what shapes generated text is refused, the rest checked
    ("/v1/completions", {"echo": True, "max_tokens": 0, "guided_regex": "("}, "guided_regex"),
    ("/v1/completions", {"echo": True, "max_tokens": 0, "logit_bias": {"5": 1}}, "logit_bias"),
    ("/v1/completions", {"echo": True, "max_tokens": 0, "best_of": 3}, "best_of"),
    ("/v1/completions", {"echo": True, "max_tokens": 0, "min_tokens": 5}, "min_tokens"),
    ("/v1/completions", {"echo": True, "max_tokens": 0, "temperature": 3}, "temperature"),
    # message fields the conversation cannot hold
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "refusal": "no"}]}, "messages.0.refusal"),
    ("/v1/chat/completions", {"messages": USER + [{"role": "assistant", "content": None}]}, "messages.1.content"),
    ("/v1/chat/completions", {"messages": USER + [{"role": "tool", "content": "r"}]}, "messages.1.tool_call_id"),
    ("/v1/chat/completions", {"messages": USER + [{"role": "tool", "content": "r", "tool_call_id": "c1"}]},
     "messages.1.tool_call_id"),                                               # answers no call made
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "tool_call_id": "c1"}]},
     "messages.0.tool_call_id"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages.0.tool_calls"),
    # tools are checked whatever tool_choice is
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "blob"}}}],
                              "tool_choice": "none"}, "tools[0].function.parameters"),
    # values OpenAI's API does not take
    ("/v1/chat/completions", {"service_tier": "ultra"}, "service_tier"),
    ("/v1/chat/completions", {"prediction": {"type": "content", "content": "x", "foo": 1}}, "prediction.foo"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "a b!"}}},
     "response_format.json_schema.name"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}},
     "response_format.json_schema.schema"),                                    # no member tag in the path
    ("/v1/chat/completions", {"response_format": {"type": "text", "x": 1}}, "response_format.x"),
    ("/v1/chat/completions", {"tools": [ADD], "tool_choice": {"type": "function"}}, "tool_choice"),
])
def test_unknown_and_unsupported_fields_are_400_naming_them(http, path, change, param):
    body = {"model": "tiny", "max_tokens": 5, **({"messages": USER} if "chat" in path else {"prompt": "x"}), **change}
    assert param.split(".")[-1] in assert_error(http.post(path, json=body), param)


def test_metadata_fields_are_accepted(http):
    r = http.post("/v1/chat/completions", json={
        "model": "tiny", "messages": USER, "max_tokens": 3, "user": "u", "metadata": {"k": "v"}, "store": False,
        "service_tier": "auto", "parallel_tool_calls": False, "prediction": {"type": "content", "content": "x"},
        "safety_identifier": "s", "prompt_cache_key": "p"})
    assert r.status_code == 200, r.text
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2, "safety_identifier": "s",
                                           "prompt_cache_key": "p", "user": "u"})
    assert r.status_code == 200, r.text
    schema = http.get("/openapi.json").json()["components"]["schemas"]
    chat_fields = set(schema["ChatRequest"]["properties"])
    assert {"response_format", "tools", "tool_choice", "logit_bias", "min_tokens", "ignore_eos",
            "guided_json", "structured_outputs"} <= chat_fields
    assert {"best_of", "echo", "suffix"} <= set(schema["CompletionRequest"]["properties"])


# ----- LangChain ----------------------------------------------------------------------------------------
def test_langchain_structured_output_and_bind_tools(http):
    pytest.importorskip("langchain_openai")
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=10)
        age: int = Field(ge=0, le=99)

    llm = ChatOpenAI(base_url="http://testserver/v1", api_key=KEY, model="tiny", temperature=0, max_tokens=40,
                     http_client=http, max_retries=0)
    for method in ("json_schema", "function_calling"):
        person = llm.with_structured_output(Person, method=method).invoke("Who?")
        assert isinstance(person, Person), method

    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    msg = llm.bind_tools([multiply], tool_choice="multiply").invoke("3 times 4?")
    (call,) = msg.tool_calls
    assert call["name"] == "multiply" and set(call["args"]) == {"a", "b"}
    assert all(isinstance(v, int) for v in call["args"].values())


@pytest.mark.parametrize("change", [
    {"response_format": schema_format({"$ref": "#/nope"})},
    {"response_format": schema_format({"type": "string", "pattern": "(a|"})},
    {"response_format": schema_format({"type": "integer", "minimum": "x"})},
    {"response_format": schema_format({"allOf": [{"type": "integer"}, {"type": "string"}]})},
    {"response_format": schema_format({"properties": 5})},
    {"guided_json": "{not json"},
    {"guided_json": {"type": "object", "properties": {"a": {"type": "object"} for _ in range(1)}} | {"x-guidance": 5}},
    {"guided_grammar": "root ::= \"a\" | "},
    {"guided_regex": "\\"},
    {"guided_json": json.loads('{"type": "object", "properties": {"a": ' * 300 + '{"type": "integer"}' + '}}' * 300)},
    {"guided_regex": "a{1000000}"},  # llguidance gives up mid-decode: that row ends ("error"), not the batch
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array", "items": 3}}}],
     "tool_choice": "required"},
])
def test_malformed_constraints_are_400_never_500(http, change):
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": USER, "max_tokens": 5, **change})
    assert r.status_code in (200, 400), r.text
