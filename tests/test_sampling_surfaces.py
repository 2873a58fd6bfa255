"""One sampling schema, one verdict: the same values given to `gpt2ft generate`'s flags, the chat REPL's
commands, the server's request fields and the playground's input bounds (GET /v1/sampling) are
accepted or refused alike, and every refusal names the option."""
from __future__ import annotations

import math

import pytest

from gpt2ft.cli import UsageError, parse
from gpt2ft.errors import UserError
from gpt2ft.sampling import OPTIONS, SamplingConfig

# (option, value as a person types it); the verdict comes from the surfaces, compared with each other
CASES = [
    ("temperature", "0"), ("temperature", "0.7"), ("temperature", "2"), ("temperature", "2.01"),
    ("temperature", "-0.1"), ("temperature", "nan"), ("temperature", "inf"), ("temperature", "abc"),
    ("top_k", "0"), ("top_k", "-1"), ("top_k", "-2"), ("top_k", "40"), ("top_k", "1.5"),
    ("top_p", "0"), ("top_p", "0.0001"), ("top_p", "1"), ("top_p", "1.01"),
    ("repetition_penalty", "0.01"), ("repetition_penalty", "0.009"), ("repetition_penalty", "100"),
    ("repetition_penalty", "1000"), ("repetition_penalty", "1.2"),
    ("presence_penalty", "-2"), ("presence_penalty", "2.5"), ("frequency_penalty", "2"),
    ("frequency_penalty", "-2.01"),
    ("max_new_tokens", "1"), ("max_new_tokens", "0"), ("max_new_tokens", "-5"), ("max_new_tokens", "8"),
    ("seed", "0"), ("seed", "-1"), ("seed", "7"), ("seed", str(2**64 - 1)), ("seed", str(2**64)),
]


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def cli_verdict(model_dir, name: str, text: str) -> bool:
    flag = OPTIONS[name].flag
    try:
        parse(["generate", str(model_dir), "--prompt", "hi", f"{flag}={text}"])
        return True
    except UsageError as e:
        assert name in str(e) or flag in str(e), e
        return False


def repl_verdict(chat, notes, name: str, text: str) -> bool:
    before = getattr(chat.settings, name)
    notes.clear()
    chat.handle(f"/{OPTIONS[name].command} {text}")
    refused = any("nothing changed" in n for n in notes)
    if refused:
        assert getattr(chat.settings, name) == before and name in notes[-1], notes
    return not refused


def server_verdict(client, name: str, text: str) -> bool:
    field = OPTIONS[name].api
    value = _number(text)
    if isinstance(value, float) and not math.isfinite(value):
        value = text  # JSON has no NaN/inf: a client can only send it as text, which is refused too
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 1, "temperature": 0, field: value}
    r = client.post("/v1/completions", json=body)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert r.json()["error"]["param"] == field, r.text
    return r.status_code == 200


def playground_verdict(described: dict, name: str, text: str) -> bool:
    """What the playground's input bounds allow (the page builds its inputs from /v1/sampling)."""
    d = described[OPTIONS[name].api]
    value = _number(text)
    if isinstance(value, str) or (d["type"] == "int" and not isinstance(value, int)) or not math.isfinite(value):
        return False
    low_ok = d["min"] is None or (value > d["min"] if d["min_exclusive"] else value >= d["min"])
    high_ok = d["max"] is None or (value < d["max"] if d["max_exclusive"] else value <= d["max"])
    return low_ok and high_ok


@pytest.fixture(scope="module")
def surfaces(tiny_model, hf_dir):
    from fastapi.testclient import TestClient

    from gpt2ft.chat import Chat, chat_settings
    from gpt2ft.serve import ServeConfig, create_app, served_model

    model, tok = tiny_model
    notes: list[str] = []
    chat = Chat(model, tok, None, chat_settings(), write=lambda *_: None, note=notes.append)
    app = create_app([served_model("tiny", model, tok)], ServeConfig())
    with TestClient(app) as client:
        described = {d["api"]: d for d in client.get("/v1/sampling").json()}
        yield hf_dir, chat, notes, client, described


@pytest.mark.parametrize("name,text", CASES)
def test_every_surface_gives_the_same_verdict(surfaces, name, text):
    model_dir, chat, notes, client, described = surfaces
    try:
        expected = OPTIONS[name].parse_text(text) is not None or OPTIONS[name].none is not None
    except UserError:
        expected = False
    verdicts = {"schema": expected, "cli": cli_verdict(model_dir, name, text),
                "repl": repl_verdict(chat, notes, name, text), "server": server_verdict(client, name, text),
                "playground": playground_verdict(described, name, text)}
    if name == "max_new_tokens" and expected:  # the REPL also keeps room in the context (64 here)
        assert verdicts["repl"] == (int(text) < chat.context)
        verdicts["repl"] = expected
    assert len(set(verdicts.values())) == 1, verdicts


def test_every_option_reaches_every_surface_it_names(surfaces):
    _, chat, notes, client, described = surfaces
    from gpt2ft.chat_commands import help_text

    for opt in OPTIONS.values():
        if opt.api:
            assert opt.api in described and described[opt.api]["accepts"] == opt.accepts
        if opt.command:
            assert f"/{opt.command}" in help_text()
    SamplingConfig()  # the defaults themselves pass the one check
