"""`gpt2ft serve` under load: many concurrent streams, a full queue (429), a client that leaves
(its slot is freed at once), and SIGTERM while a reply streams (it finishes; exit 0)."""
from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest

from conftest import hf_tiny
from test_serve import AUTH, Server, adapter_dir, server  # noqa: F401 - fixtures

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory):
    """A tiny model with a 1024-token context, so one reply can take seconds."""
    from gpt2ft.tokenizer import gpt2_tokenizer

    folder = tmp_path_factory.mktemp("long")
    hf_tiny(n_positions=1024, n_layer=4, n_embd=64).save_pretrained(folder)
    gpt2_tokenizer().save(folder)
    return folder


def open_stream(url, max_tokens, timeout=60):
    """Start a streaming completion and return (client, response, first data line)."""
    client = httpx.Client(timeout=timeout)
    body = {"model": "tiny", "prompt": "Go", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    response = client.send(client.build_request("POST", url + "/v1/completions", json=body, headers=AUTH), stream=True)
    assert response.status_code == 200, response.read()
    lines = response.iter_lines()
    first = next(line for line in lines if line.startswith("data: "))
    return client, response, lines, first


def running(url) -> int:
    return httpx.get(url + "/health").json()["running"]


def test_32_concurrent_streams_equal_one_at_a_time(server):  # noqa: F811
    prompts = [f"Client {i} says" for i in range(32)]
    client = server.client()
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0).choices[0].text
             for p in prompts]

    async def main():
        aclient = server.async_client()

        async def stream(p):
            text = ""
            async for chunk in await aclient.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0,
                                                                stream=True):
                text += chunk.choices[0].text if chunk.choices else ""
            return text

        return await asyncio.gather(*map(stream, prompts))

    assert asyncio.run(main()) == alone


def test_full_queue_429_and_disconnect_frees_the_slot(long_dir, tmp_path):
    srv = Server(long_dir, "--max-batch", "1", "--max-queue", "0", "--max-tokens", "1000", log=tmp_path / "log")
    try:
        body = {"model": "tiny", "prompt": "Go", "max_tokens": 900, "temperature": 0}
        start = time.monotonic()
        full = srv.post("/v1/completions", body)
        t_full = time.monotonic() - start
        assert full.status_code == 200 and full.json()["usage"]["completion_tokens"] == 900

        r = srv.post("/v1/completions", {**body, "n": 2})  # 2 choices never fit 1 slot + 0 queue: no retry would
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"

        client, response, lines, _ = open_stream(srv.url, 900)  # keep `lines`: dropping it closes the stream
        assert running(srv.url) == 1
        busy = srv.post("/v1/completions", {**body, "max_tokens": 2})
        assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
        assert busy.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            srv.client().completions.create(model="tiny", prompt="x", max_tokens=2)

        left = time.monotonic()
        response.close()
        client.close()
        while running(srv.url):
            assert time.monotonic() - left < t_full / 2, "the slot was not freed when the client left"
            time.sleep(0.01)
        assert srv.post("/v1/completions", {**body, "max_tokens": 2}).status_code == 200

        # a plain (non-streaming) request whose client gives up is cancelled too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", json=body, headers=AUTH, timeout=0.5)
        left = time.monotonic()
        while running(srv.url):
            assert time.monotonic() - left < t_full / 2, "a plain request kept its slot after the client left"
            time.sleep(0.01)
    finally:
        assert srv.stop() == 0, srv.output()


def test_sigterm_finishes_the_stream_in_flight_and_exits_0(long_dir, tmp_path):
    srv = Server(long_dir, "--max-tokens", "1000", log=tmp_path / "log")
    client, response, lines, first = open_stream(srv.url, 300)
    srv.proc.send_signal(signal.SIGTERM)
    data = [first] + [line for line in lines if line.startswith("data: ")]
    response.close()
    client.close()
    assert data[-1] == "data: [DONE]"
    chunks = [json.loads(d[6:]) for d in data[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert srv.proc.wait(timeout=60) == 0, srv.output()
    assert "Finished server process" in srv.output()


def test_sigterm_cancels_what_outlives_the_shutdown_timeout(long_dir, tmp_path):
    srv = Server(long_dir, "--max-tokens", "1000", "--shutdown-timeout", "0.5", log=tmp_path / "log")
    client, response, lines, _ = open_stream(srv.url, 1000)  # noqa: F841
    start = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=60) == 0, srv.output()
    assert time.monotonic() - start < 10
    response.close()
    client.close()
