"""`gpt2ft serve`: a real server on 127.0.0.1 with a tiny model, talked to with the official openai
client (sync and async), raw HTTP for every error case, and schemathesis fuzzing of /openapi.json."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from conftest import assert_clean_error, run_cli

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def chat_ids(tokenizer, user: str) -> list[int]:
    """One user turn as a model without a template sees it (the plain transcript), written out by hand."""
    return tokenizer.encode(f"User: {user}\nAssistant:")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`gpt2ft serve MODEL FLAGS` in a subprocess on a free loopback port."""

    def __init__(self, model_dir, *flags, name: str = "tiny", key: str | None = KEY, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log)
        cmd = [sys.executable, "-m", "gpt2ft.cli", "serve", str(model_dir), "--name", name, "--port", str(self.port),
               *(["--api-key", key] if key else []), *map(str, flags)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("GPT2FT_API_KEY", None)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.proc.kill()
        raise AssertionError(f"server did not start:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, **kw)

    def async_client(self):
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0)

    def post(self, path, body=None, headers=AUTH, **kw):
        return httpx.post(self.url + path, json=body, headers=headers, timeout=60, **kw)


@pytest.fixture(scope="session")
def adapter_dir(hf_dir, tmp_path_factory):
    """A LoRA adapter with non-zero weights, saved as training saves one."""
    from gpt2ft.checkpoint import commit_checkpoint, load, write_adapter_files
    from gpt2ft.lora import LoRAConfig, apply_lora

    model, tokenizer = load(hf_dir)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("c_attn", "c_proj")))
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B"):
                torch.nn.init.normal_(m.lora_B.weight, std=0.5)
    root = tmp_path_factory.mktemp("adapter")
    write_adapter_files(root / "tmp", model, tokenizer, {"base_model": str(hf_dir)})
    return commit_checkpoint(root / "tmp", root / "poet")


@pytest.fixture(scope="session")
def server(hf_dir, adapter_dir, tmp_path_factory):
    srv = Server(hf_dir, "--lora", f"poet={adapter_dir}", "--max-n", "4", "--max-tokens", "40", "--dtype", "float32",
                 "--max-body", "20000", log=tmp_path_factory.mktemp("serve") / "server.log")
    yield srv
    assert srv.stop() == 0, srv.output()


def greedy(**kw):
    return dict(temperature=0, **kw)


# ----- the openai client -------------------------------------------------------------------------
def test_greedy_completion_equals_gpt2ft_generate(server, hf_dir, tiny_model):
    prompt = "The meaning of life is"
    r = server.client().completions.create(model="tiny", prompt=prompt, max_tokens=12, **greedy())
    cli = run_cli("generate", hf_dir, "--prompt", prompt, "--max-new-tokens", 12, "--temperature", 0,
                  "--dtype", "float32", check=True)
    assert r.choices[0].text == cli.stdout[:-1]  # generate prints the completion and a newline
    assert r.choices[0].finish_reason == "length"
    n_prompt = len(tiny_model.tokenizer.encode(prompt))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 12, n_prompt + 12)
    assert r.model == "tiny" and r.object == "text_completion"


def test_chat_sync_streaming_and_not(server, tiny_model):
    client = server.client()
    messages = [{"role": "user", "content": "Hello there"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, **greedy())
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}, **greedy()))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    # the prompt is the chat template applied to the messages, counted as the tokenizer counts it
    n_prompt = len(chat_ids(tiny_model.tokenizer, "Hello there"))
    assert whole.usage.prompt_tokens == chunks[-1].usage.prompt_tokens == n_prompt
    # the reply equals raw completion of the rendered prompt
    raw = client.completions.create(model="tiny", prompt=chat_ids(tiny_model.tokenizer, "Hello there"), max_tokens=10, **greedy())
    assert raw.choices[0].text == text


def test_async_client_concurrent_requests_match_sequential(server, tiny_model):
    prompts = ["Once upon a time", "To be or not", "In the beginning", "Hello"]
    sync = [server.client().completions.create(model="tiny", prompt=p, max_tokens=8, **greedy()).choices[0].text
            for p in prompts]

    async def main():
        client = server.async_client()

        async def stream(p):
            out = ""
            async for chunk in await client.completions.create(model="tiny", prompt=p, max_tokens=8, stream=True,
                                                               **greedy()):
                out += chunk.choices[0].text if chunk.choices else ""
            return out

        async def chat(p):
            r = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}],
                                                     max_tokens=8, **greedy())
            return r.choices[0].message.content

        return await asyncio.gather(*map(stream, prompts), *map(chat, prompts))

    results = asyncio.run(main())
    assert results[:4] == sync
    chats = [server.client().completions.create(model="tiny", prompt=chat_ids(tiny_model.tokenizer, p), max_tokens=8,
                                                **greedy()).choices[0].text for p in prompts]
    assert results[4:] == chats


def test_stop_cuts_before_the_stop_string(server):
    client = server.client()
    full = client.completions.create(model="tiny", prompt="Stop here", max_tokens=20, **greedy()).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = client.completions.create(model="tiny", prompt="Stop here", max_tokens=20, stop=[stop], **greedy())
    assert cut.choices[0].text == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Stop here", max_tokens=20, stop=stop, stream=True, **greedy()) if c.choices)
    assert streamed == cut.choices[0].text


def test_n_and_seed(server):
    client = server.client()
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Pick"}], max_tokens=6, temperature=1.0)
    a = client.chat.completions.create(n=3, seed=7, **kw)
    b = client.chat.completions.create(n=3, seed=7, **kw)
    c = client.chat.completions.create(n=3, seed=8, **kw)
    texts = lambda r: [ch.message.content for ch in sorted(r.choices, key=lambda ch: ch.index)]  # noqa: E731
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert texts(a) == texts(b)                     # same seed, same choices
    assert len(set(texts(a))) > 1                   # the n choices are different samples
    assert texts(a) != texts(c)
    assert a.usage.completion_tokens == 3 * 6
    single = client.completions.create(model="tiny", prompt="abc", max_tokens=6, temperature=1.0, seed=5)
    again = client.completions.create(model="tiny", prompt="abc", max_tokens=6, temperature=1.0, seed=5)
    assert single.choices[0].text == again.choices[0].text


def test_seeded_sampling_equals_in_process_stream(server, tiny_model):
    from gpt2ft.generation import stream

    model, tok = tiny_model
    r = server.client().completions.create(model="tiny", prompt="Sampled", max_tokens=9, temperature=0.9, top_p=0.9,
                                           seed=123, extra_body={"top_k": 50})
    ref = stream(model, tok, "Sampled", max_new_tokens=9, temperature=0.9, top_p=0.9, top_k=50, seed=123)
    assert r.choices[0].text == "".join(ref)


def test_logprobs_match_the_model(server, hf_model, tiny_model):
    tok = tiny_model.tokenizer
    r = server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=4, logprobs=True, top_logprobs=3, **greedy())
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    ids = chat_ids(tok, "Hi")
    with torch.no_grad():
        logp = hf_model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)  # transformers as the oracle
    top = torch.topk(logp, 3)
    first = content[0]
    assert first.token == tok.decode([int(top.indices[0])])  # greedy picks the most likely token
    assert first.logprob == pytest.approx(float(top.values[0]), abs=1e-4)
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert bytes(first.bytes) == tok.decode_bytes([int(top.indices[0])])
    # completions: logprobs=k, echo gives the prompt's tokens first (the very first has no logprob)
    c = server.client().completions.create(model="tiny", prompt="One two", max_tokens=3, logprobs=2, echo=True,
                                           **greedy())
    lp = c.choices[0].logprobs
    n_prompt = len(tok.encode("One two"))
    assert len(lp.tokens) == n_prompt + 3 and lp.token_logprobs[0] is None
    assert c.choices[0].text.startswith("One two")
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])
    assert lp.text_offset[n_prompt] == len("One two")


def test_presence_and_frequency_penalties_change_greedy_text(server):
    client = server.client()
    kw = dict(model="tiny", prompt="Repeat repeat", max_tokens=12, **greedy())
    plain = client.completions.create(**kw).choices[0].text
    penalized = client.completions.create(frequency_penalty=2.0, presence_penalty=2.0, **kw).choices[0].text
    assert plain != penalized  # the tiny model repeats one token greedily; the penalties forbid that


def test_lora_adapter_chosen_by_model_field(server, hf_dir, adapter_dir):
    from gpt2ft.checkpoint import load
    from gpt2ft.generation import generate

    client = server.client()
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny", "poet"]
    kw = dict(prompt="Roses are", max_tokens=8, **greedy())
    base = client.completions.create(model="tiny", **kw).choices[0].text
    poet = client.completions.create(model="poet", **kw).choices[0].text
    model, tok = load(hf_dir, lora=str(adapter_dir))
    assert poet == generate(model, tok, "Roses are", max_new_tokens=8, temperature=0)
    assert poet != base


def test_models_and_health(server):
    r = httpx.get(server.url + "/v1/models", headers=AUTH).json()
    assert r["object"] == "list" and r["data"][0]["id"] == "tiny" and r["data"][0]["context_length"] == 64
    assert httpx.get(server.url + "/v1/models/poet", headers=AUTH).json()["lora"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # no key needed
    assert "openapi" in httpx.get(server.url + "/openapi.json", headers=AUTH).json()


def test_empty_prompt_is_unconditional_generation(server, tiny_model):
    from gpt2ft.generation import generate

    model, tok = tiny_model
    want = generate(model, tok, "", max_new_tokens=10, temperature=0)  # starts from <|endoftext|>
    client = server.client()
    for prompt in ("", []):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, **greedy())
        assert r.choices[0].text == want
        assert r.usage.prompt_tokens == 1  # the <|endoftext|> it starts from


def test_usage_counts_each_prompt_once_and_every_choice(server, tiny_model):
    tok = tiny_model.tokenizer
    prompts = ["One two three", "Four"]
    r = server.client().completions.create(model="tiny", prompt=prompts, n=2, max_tokens=3, **greedy())
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    assert r.usage.completion_tokens == 4 * 3 and r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_sampling_endpoint_is_the_schema(server):
    from gpt2ft.sampling import OPTIONS

    r = httpx.get(server.url + "/v1/sampling", headers=AUTH)
    assert r.status_code == 200
    # the schema's options, with the defaults a request that leaves the field out gets (OpenAI's temperature
    # 1; no max_tokens: what the context leaves), as the OpenAPI document states them
    api_defaults = {"temperature": 1.0, "max_tokens": None}
    want = [{**o.describe(), **({"default": api_defaults[o.api], "optional": o.optional or api_defaults[o.api] is None}
                                if o.api in api_defaults else {})} for o in OPTIONS.values() if o.api]
    assert r.json() == json.loads(json.dumps(want))
    openapi = httpx.get(server.url + "/openapi.json", headers=AUTH).json()["components"]["schemas"]["ChatRequest"]
    assert openapi["properties"]["temperature"]["default"] == 1.0
    assert {d["api"] for d in r.json()} >= {"temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop"}
    assert_error(httpx.get(server.url + "/v1/sampling"), 401)


def _candidates(opt):
    """Values at and just past each bound of an option, and a few of the wrong type."""
    r = opt.range
    if r is None:
        return ["a", ["a", "b"], ["s"] * 16, ["s"] * 17, 5, [1], True]
    eps = 1 if r.kind is int else 1e-3
    values = [v for b in (r.lo, r.hi) if b is not None for v in (b - eps, b, b + eps)]
    values += [(r.lo or 0) + (1 if r.hi is None else (r.hi - (r.lo or 0)) / 2), "1", True, None, float("nan")]
    return values + ([1.0, 1.5] if r.kind is int else [1])


def test_request_fields_accept_exactly_what_the_cli_accepts():
    """Every sampling option with an API name is a request field of both endpoints, with the schema's
    bounds, and the server's verdict on a value is sampling.check's (which the CLI and REPL use)."""
    from pydantic import ValidationError

    from gpt2ft.errors import UserError
    from gpt2ft.sampling import OPTIONS, check
    from gpt2ft.serve import ChatRequest, CompletionRequest

    bodies = {CompletionRequest: {"model": "m", "prompt": "x"},
              ChatRequest: {"model": "m", "messages": [{"role": "user", "content": "x"}]}}
    chat_names = {"logprobs": "top_logprobs"}  # chat's logprobs is a flag; top_logprobs is the option
    zero_ok = {(CompletionRequest, "max_tokens")}  # the one exception: 0 with echo scores the prompt
    for opt in (o for o in OPTIONS.values() if o.api):
        for model in (CompletionRequest, ChatRequest):
            field = chat_names.get(opt.api, opt.api) if model is ChatRequest else opt.api
            schema = model.model_json_schema()["properties"][field]
            if opt.range is not None:
                low = "exclusiveMinimum" if opt.range.lo_open else "minimum"
                lo = 0 if (model, field) in zero_ok else opt.range.lo
                assert schema.get(low) == lo and schema.get("maximum") == opt.range.hi, (field, schema)
            for value in _candidates(opt):
                try:
                    want = check(opt.name, value)
                except UserError:
                    want = UserError
                extra = {"logprobs": True} if model is ChatRequest and field == "top_logprobs" else {}
                try:
                    got = model.model_validate({**bodies[model], **extra, field: value}).options()[opt.name]
                except ValidationError:
                    got = UserError
                if (model, field) in zero_ok and value == 0 and not isinstance(value, bool):
                    want = 0
                if value is not None:  # null is the field's default (as in OpenAI's API)
                    assert got == want, (field, value, want, got)


# ----- errors: OpenAI's shape and status, never a 500 ----------------------------------------------
def assert_error(r, status: int, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


@pytest.mark.parametrize("change, param", [
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 5}, "n"),                       # over --max-n 4
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 41}, "max_tokens"),    # over --max-tokens 40
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": "hello"}, "messages"),
    ({"stop": ["s"] * 17}, "stop"),        # the schema's limit: 16
    ({"stop": 5}, "stop"),
    ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": 5e-324}, "repetition_penalty"),  # found by the fuzzer: logits / 5e-324 overflow
    ({"repetition_penalty": 101}, "repetition_penalty"),
    ({"top_k": -2}, "top_k"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"),
    # strict types: no string for a number or a flag, no flag for a number
    ({"stream": "yes"}, "stream"),
    ({"temperature": "0.5"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"max_tokens": 2.0}, "max_tokens"),
    ({"logprobs": 1}, "logprobs"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    # valid alone, refused rather than ignored
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream: true
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages.0.name"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
])
def test_invalid_values_are_400(server, change, param):
    err = assert_error(server.post("/v1/chat/completions", {**CHAT, **change}), 400, param)
    assert err["type"] == "invalid_request_error" and param.split(".")[0] in err["message"]


def test_nan_and_non_json_are_400(server):
    body = json.dumps(CHAT)[:-1] + ', "temperature": NaN}'
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert_error(r, 400, "temperature")
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{oops", headers={**AUTH, "Content-Type": "application/json"})
    assert "JSON" in assert_error(r, 400)["message"]
    assert_error(server.post("/v1/chat/completions", {"model": "tiny"}), 400, "messages")
    for body in (b"", b"null"):  # no body at all: say what to send
        r = httpx.post(server.url + "/v1/completions", content=body, headers={**AUTH, "Content-Type": "application/json"})
        assert "the request body is empty: send a JSON object" in assert_error(r, 400)["message"]
    r = httpx.post(server.url + "/v1/completions", content=b"[1]", headers={**AUTH, "Content-Type": "application/json"})
    assert "must be a JSON object" in assert_error(r, 400)["message"]
    r = httpx.post(server.url + "/v1/completions", content=json.dumps({"model": "tiny", "prompt": "a"}).encode(),
                   headers={**AUTH, "Content-Type": "text/plain"})
    assert "Content-Type" in assert_error(r, 400)["message"]


def test_a_request_bigger_than_the_server_holds_is_400_not_429(server):
    """A 429 would be retried by clients forever: no retry admits more than --max-batch + --max-queue."""
    r = server.post("/v1/completions", {"model": "tiny", "prompt": ["a"] * 40, "n": 4, "max_tokens": 1})  # 160 > 8 + 64
    assert "--max-queue" in assert_error(r, 400, "prompt")["message"]


def test_context_length_exceeded(server, tiny_model):
    long = "word " * 80  # > 64 tokens
    assert_error(server.post("/v1/completions", {"model": "tiny", "prompt": long}), 400, "prompt",
                 "context_length_exceeded")
    err = assert_error(server.post("/v1/completions", {"model": "tiny", "prompt": "word " * 30, "max_tokens": 40}),
                       400, "prompt", "context_length_exceeded")
    assert "64" in err["message"]
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": long}])
    assert e.value.code == "context_length_exceeded"


def test_wrong_or_missing_key_is_401(server):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
        assert_error(server.post("/v1/chat/completions", CHAT, headers=headers), 401, code="invalid_api_key")
        assert_error(httpx.get(server.url + "/v1/models", headers=headers), 401)
        assert_error(httpx.get(server.url + "/openapi.json", headers=headers), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_unknown_model_and_route_are_404(server):
    err = assert_error(server.post("/v1/chat/completions", {**CHAT, "model": "gpt-4"}), 404, "model", "model_not_found")
    assert err["type"] == "invalid_request_error"  # OpenAI's type for an unknown model
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="nope", prompt="x", max_tokens=2)
    assert_error(httpx.get(server.url + "/v1/nothing", headers=AUTH), 404)
    assert_error(httpx.get(server.url + "/v1/models/nope", headers=AUTH), 404, "model")


def test_oversized_body_is_413(server):
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 30000}]}
    assert_error(server.post("/v1/chat/completions", big), 413, code="request_too_large")

    def chunks():  # no Content-Length: the cap holds on the bytes actually read
        for _ in range(30):
            yield b"x" * 1000

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers=AUTH)
    assert_error(r, 413)
    assert server.post("/v1/chat/completions", CHAT).status_code == 200


def test_fuzz_openapi_no_5xx(server):
    """schemathesis: bodies that fit the schema and bodies that do not; no 5xx, and the server lives."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", headers=AUTH)
    failures, calls = [], 0
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [schemathesis.GenerationMode.POSITIVE]
        if operation.method.upper() == "POST":  # GETs without parameters have no invalid inputs
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:
            @settings(max_examples=30, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                nonlocal calls
                bodies = [case.body]
                if isinstance(case.body, dict) and "model" in case.body:  # also reach generation
                    bodies.append({**case.body, "model": "tiny"})
                for body in bodies:
                    case.body = body
                    r = case.call(base_url=server.url, headers=AUTH, timeout=60)
                    calls += 1
                    if r.status_code >= 500:
                        failures.append((case.method, case.path, case.body, r.status_code, r.text[:300]))

            check()
    assert calls > 200
    assert not failures, "\n".join(map(str, failures[:3]))
    assert server.post("/v1/chat/completions", CHAT).status_code == 200


# ----- the command line -----------------------------------------------------------------------------
def test_public_host_needs_a_key(hf_dir):
    assert_clean_error(run_cli("serve", hf_dir, "--host", "0.0.0.0"), "--api-key", "--insecure")
    assert_clean_error(run_cli("serve", hf_dir, "--lora", "nameonly"), "NAME=ADAPTER_DIR")


@pytest.mark.parametrize("flags, needle", [
    (["--max-batch", "0"], "--max-batch"),         # argparse refuses these at parse time, with the range
    (["--port", "70000"], "65535"),
    (["--timeout", "0"], "--timeout"),
    (["--max-queue", "-1"], "--max-queue"),
    (["--api-key", "ключ"], "printable ASCII"),    # no client could send it in a header
    (["--api-key", " key"], "--api-key"),
    (["--allowed-origins", "localhost:3000"], "scheme://host"),  # a browser sends scheme://host[:port]
])
def test_bad_serve_flags_are_one_line_errors(hf_dir, flags, needle):
    assert_clean_error(run_cli("serve", hf_dir, *flags), needle)


def test_non_ascii_key_in_the_environment_is_refused(hf_dir):
    assert_clean_error(run_cli("serve", hf_dir, env={"GPT2FT_API_KEY": "clé"}), "$GPT2FT_API_KEY", "printable ASCII")


def test_check_bind():
    from gpt2ft.errors import UserError
    from gpt2ft.serve import check_bind

    check_bind("127.0.0.1", None, False)
    check_bind("::1", None, False)
    check_bind("localhost", None, False)
    check_bind("0.0.0.0", "k", False)
    check_bind("0.0.0.0", None, True)
    with pytest.raises(UserError):
        check_bind("192.168.1.5", None, False)


def test_extreme_sampling_values_decode_greedily(server):
    """Found by the fuzzer: temperature 1e-30 overflows float32 logits, top_p 5e-324 reads as 0."""
    kw = dict(model="tiny", prompt="Edge", max_tokens=5)
    want = server.post("/v1/completions", {**kw, "temperature": 0}).json()["choices"][0]["text"]
    for change in ({"temperature": 1e-30}, {"top_p": 5e-324, "temperature": 1.0}):
        r = server.post("/v1/completions", {**kw, **change})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, r.text


def test_chat_prompt_follows_the_template_as_sft_tokenizes_it(tiny_model):
    from gpt2ft.data.sft import prompt_ids
    from gpt2ft.serve import Message, chat_prompt
    from gpt2ft.templates import TEMPLATES, pick_template

    tok = tiny_model.tokenizer
    msgs = [Message(role="system", content="Be brief."), Message(role="user", content="Hi"),
            Message(role="assistant", content="Hello."), Message(role="user", content=[{"type": "text", "text": "Bye"}])]
    ids, stops = chat_prompt(None, msgs, tok)
    # no saved template: the plain transcript, written out by hand; each earlier reply ends with EOS (as SFT trains)
    want = (tok.encode("Be brief.\n\nUser: Hi\nAssistant:") + tok.encode("Hello.") + [tok.eos_id]
            + tok.encode("User: Bye\nAssistant:"))
    assert ids == want and stops == ["\nUser:", "\nAssistant:"]
    # ... which is what the one template picker gives chat for an untuned model
    plain = [{"role": m.role, "content": m.text()} for m in msgs]
    assert ids == prompt_ids(plain, pick_template(None, None), tok)
    ids, stops = chat_prompt(TEMPLATES["chat"], msgs[:2], tok)
    assert tok.decode(ids) == "### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\n"
    ids, stops = chat_prompt(TEMPLATES["alpaca"], msgs[:2], tok)
    assert tok.decode(ids) == ("Be brief.\n\nBelow is an instruction that describes a task. Write a response that "
                               "appropriately completes the request.\n\n### Instruction:\nHi\n\n### Response:\n")
    assert stops == ["\n### Instruction:", "\n### Input:"]


def test_timeout_and_shutdown_are_503_with_retry_after(tiny_model):
    """In process: an engine that never finishes (the request times out), then a stopped scheduler."""
    from fastapi.testclient import TestClient

    from gpt2ft.serve import ServeConfig, create_app, served_model

    class Stuck:
        def add(self, *args, **kw):
            return types.SimpleNamespace(finish_reason=None, logprobs=[], text="", prompt_tokens=1, completion_tokens=0,
                                         drafted=0, accepted_drafts=0)

        @property
        def has_work(self):
            time.sleep(0.005)
            return False

        def cancel(self, completion):
            pass

    app = create_app([served_model("tiny", tiny_model.model, tiny_model.tokenizer)], ServeConfig(timeout=0.3),
                     engine_factory=lambda served: Stuck())
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        err = assert_error(r, 503, code="timeout")
        assert "--timeout" in err["message"] and r.headers["Retry-After"] == "1"
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2, "stream": True,
                                                 "n": 2, "stream_options": {"include_usage": True}})
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        events = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
        # no choice ends with a finish_reason OpenAI does not have; the usage comes before the error event
        ended = [e["choices"][0]["finish_reason"] for e in events if e.get("choices") and e["choices"][0]["finish_reason"]]
        assert ended == []
        assert events[-2]["usage"]["prompt_tokens"] == 1 and events[-1]["error"]["code"] == "timeout"
        app.state.scheduler.stop()
        r = client.post("/v1/chat/completions", json=CHAT)
        assert_error(r, 503, code="unavailable")
        assert r.headers["Retry-After"] == "1"


def test_prompt_scoring_has_the_limits_of_generation(tiny_model):
    """echo with max_tokens 0 (a forward per prompt, nothing generated) is bounded as generating is: at most
    --max-batch + --max-queue prompts a request (400), and the --timeout (503)."""
    from fastapi.testclient import TestClient

    from gpt2ft.serve import ServeConfig, create_app, served_model

    def scoring(n: int) -> dict:
        return {"model": "tiny", "prompt": ["One two three"] * n, "max_tokens": 0, "echo": True, "logprobs": 1}

    model = [served_model("tiny", tiny_model.model, tiny_model.tokenizer)]
    with TestClient(create_app(model, ServeConfig(max_batch=1, max_queue=1))) as client:
        assert client.post("/v1/completions", json=scoring(2)).status_code == 200
        assert "scores 3 prompts, more than the 2" in assert_error(client.post("/v1/completions", json=scoring(3)),
                                                                    400, "prompt")["message"]
    with TestClient(create_app(model, ServeConfig(timeout=1e-9))) as client:
        assert "--timeout" in assert_error(client.post("/v1/completions", json=scoring(2)), 503,
                                           code="timeout")["message"]


def test_text_offsets_index_the_returned_text_when_tokens_split_characters(tiny_model):
    """An emoji and CJK characters take several byte-level tokens each: every token's text_offset is the
    index in `text` of the character it begins in (each part of one character: that character's)."""
    from fastapi.testclient import TestClient

    from gpt2ft.serve import ServeConfig, create_app, served_model

    text = "a\U0001F600b\u65e5\u672cc"
    with TestClient(create_app([served_model("tiny", tiny_model.model, tiny_model.tokenizer)], ServeConfig())) as client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": text, "echo": True, "max_tokens": 0,
                                                 "logprobs": 0})
    choice = r.json()["choices"][0]
    assert choice["text"] == text
    tok = tiny_model.tokenizer
    ids = tok.encode(text)
    starts, at = [], 0  # the oracle: each token's first byte, as the index of the character holding it
    for t in ids:
        starts.append(len(tok.decode_bytes(ids)[:at].decode("utf-8", errors="ignore")))
        at += len(tok.decode_bytes([t]))
    assert len(ids) > len(text) and choice["logprobs"]["text_offset"] == starts
    assert choice["logprobs"]["text_offset"][-1] == text.index("c")


def test_a_grammar_the_engine_gives_up_on_mid_decoding_is_an_error_not_a_reply(tiny_model):
    """A Lark rule of 2500 alternatives compiles, then passes llguidance's 2000 items a row after the first
    token: a 400 (code grammar_error) or, streamed, the error event; never a 200 whose text does not match
    with a finish_reason OpenAI does not have."""
    from fastapi.testclient import TestClient

    from gpt2ft.serve import ServeConfig, create_app, served_model

    grammar = "start: " + " | ".join(f'"w{i}"' for i in range(2500))
    body = {"model": "tiny", "prompt": "x", "max_tokens": 5, "seed": 1, "guided_grammar": grammar}
    with TestClient(create_app([served_model("tiny", tiny_model.model, tiny_model.tokenizer)], ServeConfig())) as client:
        err = assert_error(client.post("/v1/completions", json=body), 400, code="grammar_error")
        assert "simplify the schema or grammar" in err["message"]
        r = client.post("/v1/completions", json={**body, "stream": True})
        events = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "grammar_error"
        assert all(c["finish_reason"] is None for e in events for c in e.get("choices", []))


def test_each_choice_has_its_own_seed_never_another_requests(tiny_model):
    from fastapi.testclient import TestClient

    from gpt2ft.serve import ServeConfig, create_app, served_model

    def texts(seed: int, n: int) -> list[str]:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 8, "temperature": 1.0, "seed": seed, "n": n,
                "ignore_eos": True}
        return [c["text"] for c in client.post("/v1/completions", json=body).json()["choices"]]

    with TestClient(create_app([served_model("tiny", tiny_model.model, tiny_model.tokenizer)], ServeConfig())) as client:
        two = texts(7, 2)
        assert two[0] == texts(7, 1)[0] and two[1] != texts(8, 1)[0] and two[0] != two[1]


def test_a_key_given_twice_in_a_body_is_refused_not_resolved(tiny_model):
    from fastapi.testclient import TestClient

    from gpt2ft.serve import ServeConfig, create_app, served_model

    body = b'{"model": "tiny", "prompt": "x", "max_tokens": 2, "max_tokens": 3}'
    with TestClient(create_app([served_model("tiny", tiny_model.model, tiny_model.tokenizer)], ServeConfig())) as client:
        r = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert "gives 'max_tokens' twice" in assert_error(r, 400, "max_tokens")["message"]
        nested = b'{"model": "tiny", "messages": [{"role": "user", "content": "a", "content": "b"}]}'
        r = client.post("/v1/chat/completions", content=nested, headers={"Content-Type": "application/json"})
        assert_error(r, 400, "content")


def test_chat_with_the_checkpoints_template_equals_gpt2ft_generate(tiny_model, tmp_path):
    """A checkpoint saved with the alpaca template: the chat reply is `gpt2ft generate`'s (which applies
    the same template), and the server needs no key when none is given."""
    from gpt2ft.checkpoint import save_model
    from gpt2ft.templates import TEMPLATES

    ckpt = save_model(tmp_path / "sft", tiny_model.model, tiny_model.tokenizer,
                      meta={"template": TEMPLATES["alpaca"].to_dict()})
    srv = Server(ckpt, key=None, log=tmp_path / "log")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="anything", max_retries=0)
        assert client.models.list().data[0].template == "alpaca"
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Name a play"}],
                                           max_tokens=10, temperature=0)
        cli = run_cli("generate", ckpt, "--prompt", "Name a play", "--max-new-tokens", 10, "--temperature", 0,
                      check=True)
        assert r.choices[0].message.content == cli.stdout[:-1]
    finally:
        assert srv.stop() == 0, srv.output()


def test_allowed_origins_answer_a_browsers_preflight_and_mark_replies_others_get_no_cors(tiny_model):
    """--allowed-origins: a page of that origin may call the API from a browser: its preflight (which carries
    no API key) is answered, replies (401s included) name the origin; without the option, and for another
    origin, no CORS header is sent, so the browser keeps the page out."""
    from fastapi.testclient import TestClient

    from gpt2ft.errors import UserError
    from gpt2ft.serve import ServeConfig, create_app, served_model

    models = [served_model("tiny", tiny_model.model, tiny_model.tokenizer)]
    page = "http://localhost:3000"
    preflight = {"Origin": page, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    with TestClient(create_app(models, ServeConfig(api_key="k", allowed_origins=[page]))) as client:
        r = client.options("/v1/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = client.post("/v1/completions", json=body, headers={"Origin": page, "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page
        r = client.post("/v1/completions", json=body, headers={"Origin": page})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == page
        r = client.post("/v1/completions", json=body, headers={"Origin": "http://evil.example", "Authorization": "Bearer k"})
        assert "access-control-allow-origin" not in r.headers
    with TestClient(create_app(models, ServeConfig())) as client:
        r = client.post("/v1/completions", json=body, headers={"Origin": page})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    for bad in ("localhost:3000", "http://localhost:3000/", "http://h:x", "ftp://h"):
        with pytest.raises(UserError, match="is not an origin"):
            ServeConfig(allowed_origins=[bad])


def test_an_empty_prompt_counts_the_same_prompt_tokens_scored_or_generating(tiny_model):
    from fastapi.testclient import TestClient

    from gpt2ft.serve import ServeConfig, create_app, served_model

    with TestClient(create_app([served_model("tiny", tiny_model.model, tiny_model.tokenizer)], ServeConfig())) as client:
        usage = [client.post("/v1/completions", json={"model": "tiny", "prompt": "", "echo": True,
                                                      "max_tokens": n}).json()["usage"]["prompt_tokens"]
                 for n in (0, 1)]
    assert usage == [1, 1]  # the <|endoftext|> an empty prompt starts from
