"""The playground page in headless Chromium (Playwright driving Debian's chromium), and the Semantic
Kernel example, both against a real `gpt2ft serve`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")

from test_serve import KEY, adapter_dir, server  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("GPT2FT_TEST_ARTIFACTS", ROOT / "test-artifacts"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing (apt-get install -y chromium)")
        pytest.skip("chromium is not installed")
    return path


def test_playground_streams_a_reply_with_the_chosen_settings(server):  # noqa: F811
    sync_api = pytest.importorskip("playwright.sync_api")
    client = server.client()
    want = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello page"}],
                                          max_tokens=12, temperature=0).choices[0].message.content
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            requests, urls = [], []
            page.on("request", lambda r: requests.append(r) if r.url.endswith("/chat/completions") else None)
            page.on("request", lambda r: urls.append(r.url))
            page.goto(server.url + "/")
            assert page.title() == "gpt2ft playground"
            page.fill("#apikey", KEY)
            page.dispatch_event("#apikey", "change")
            page.wait_for_function("document.querySelectorAll('#model option').length == 2")
            assert "context: 64 tokens" in page.inner_text("#info")
            # the sampling inputs are the schema's (GET /v1/sampling): bounds, default and help
            schema = httpx.get(server.url + "/v1/sampling", headers={"Authorization": f"Bearer {KEY}"}).json()
            for opt in (o for o in schema if o["api"] != "logprobs"):
                attrs = page.eval_on_selector(f"#{opt['api']}", "e => ({tag: e.tagName, min: e.min, max: e.max, "
                                                                  "value: e.value, title: e.title, type: e.type, "
                                                                  "checked: e.checked})")
                assert opt["help"] in attrs["title"], (opt, attrs)
                if opt["type"] == "bool":
                    assert attrs["type"] == "checkbox" and attrs["checked"] == opt["default"], (opt, attrs)
                    continue
                if opt["type"] in ("list", "dict"):
                    assert attrs["tag"] == "TEXTAREA"
                    continue
                for bound in ("min", "max"):  # as the browser's doubles hold them (2^64 - 1 rounds)
                    shown = float(attrs[bound]) if attrs[bound] else None
                    assert shown == (None if opt[bound] is None else float(opt[bound])), (opt["api"], bound, attrs)
                assert (float(attrs["value"]) if attrs["value"] else None) == opt["default"], (opt, attrs)
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "12")
            page.fill("#system", "")
            page.fill("#input", "Hello page")
            page.press("#input", "Enter")
            page.wait_for_selector(".assistant[data-state=done]", timeout=30000)
            reply = page.inner_text(".assistant span")
            assert reply == want
            assert "finish: length" in page.inner_text(".assistant .meta")
            sent = json.loads(requests[-1].post_data)
            assert sent["temperature"] == 0 and sent["max_tokens"] == 12 and sent["stream"] is True
            assert sent["messages"] == [{"role": "user", "content": "Hello page"}]
            # a setting changes the request: a stop string and another model
            page.fill("#stop", want[3:6])
            page.fill("#seed", str(2**64 - 1))  # the schema's largest seed, sent exactly (not as a double)
            page.select_option("#model", "poet")
            page.click("#retry")
            page.wait_for_selector(".assistant[data-state=done]", timeout=30000)
            sent = json.loads(requests[-1].post_data)
            assert sent["stop"] == [want[3:6]] and sent["model"] == "poet" and sent["seed"] == 2**64 - 1
            assert "error" not in page.get_attribute(".assistant", "class")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "playground.png"))
            page.click("#clear")
            assert page.query_selector_all(".msg") == []
            assert urls and all(u.startswith(server.url + "/") for u in urls), urls  # nothing from a CDN
        finally:
            browser.close()
    assert (ARTIFACTS / "playground.png").stat().st_size > 5000


def test_semantic_kernel_example_keeps_the_conversation(server, tiny_model):  # noqa: F811
    pytest.importorskip("semantic_kernel")
    turns = ["Hi there", "Tell me more"]
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "semantic_kernel_chat.py"), "--base-url",
                           server.url + "/v1", "--api-key", KEY, "--model", "tiny", "--temperature", "1", "--seed", "3",
                           "--max-tokens", "6", *[a for t in turns for a in ("--say", t)]],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    used = [int(line.split()[0][1:]) for line in proc.stdout.splitlines() if line.startswith("  (")]
    assert len(used) == 2, proc.stdout
    # the replies are what the openai client gets for the same conversation (a reply may hold a newline,
    # so they are looked for in the whole output, not line by line)
    client = server.client()
    messages, replies = [], []
    for user in turns:
        messages.append({"role": "user", "content": user})
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=1, seed=3)
        got = r.choices[0].message.content
        assert f"assistant> {got}\n" in proc.stdout, (got, proc.stdout)
        replies.append(got)
        messages.append({"role": "assistant", "content": got})
    # the second request carried the first exchange: its prompt is the whole conversation, rendered as
    # the plain transcript of a model without a template (written out here by hand), each earlier reply
    # ending with EOS as SFT trains
    tok = tiny_model.tokenizer
    first = tok.encode("User: Hi there\nAssistant:")
    second = first + tok.encode(replies[0]) + [tok.eos_id] + tok.encode("User: Tell me more\nAssistant:")
    assert used == [len(first), len(second)]
