"""`gpt2ft chat`: model auto-selection, every command, history dropping, save/load, Ctrl-C, pipes and a pty."""
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import assert_clean_error, hf_tiny, run_cli
from gpt2ft.chat import Chat, chat_settings, choose_model, render
from gpt2ft.chat_commands import parse_steps, read_conversation
from gpt2ft.checkpoint import load, save_model
from gpt2ft.errors import UserError
from gpt2ft.templates import TEMPLATES, get_template
from gpt2ft.tokenizer import gpt2_tokenizer

GREEDY = ("--temperature", "0", "--max-new-tokens", "12", "--device", "cpu")


@pytest.fixture(scope="module")
def chat_ckpt(tiny_model, tmp_path_factory):
    """The tiny random model saved as an SFT checkpoint with the chat template (context 64)."""
    model, tokenizer = tiny_model
    return save_model(tmp_path_factory.mktemp("chat") / "ckpt", model, tokenizer,
                      {"objective": "sft", "template": get_template("chat").to_dict()})


def chat_cli(model, *lines, args=(), **kw):
    """Pipe lines into `gpt2ft chat MODEL`."""
    return run_cli("chat", model, *GREEDY, *args, input="".join(line + "\n" for line in lines), **kw)


def in_process(tiny_model, **kw):
    model, tokenizer = tiny_model
    out, notes = [], []
    chat = Chat(model, tokenizer, get_template("chat"), chat_settings(temperature=0, max_new_tokens=12),
                write=out.append, note=notes.append, **kw)
    return chat, out, notes


@pytest.fixture
def user_dir():
    """A folder of the user's, outside pytest's basetemp: that holds pytest's `.lock`, which
    fileio.model_folder_of takes for a training run's lock (so it refuses to write anywhere in it)."""
    folder = Path(tempfile.mkdtemp(prefix="gpt2ft-chat-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


# ----- which model ----------------------------------------------------------------------------
def _make_run(root, name, kind, tiny_model, when, config=True):
    model, tokenizer = tiny_model
    run = root / name
    step = save_model(run / "checkpoints" / "step-00000010", model, tokenizer, {"objective": kind})
    if config:
        (run / "config.yaml").write_text(f"train: {{}}\nrun:\n  objective: {kind}\n")
    os.utime(step / "COMPLETE", (when, when))
    return run


def test_auto_selection_prefers_the_most_tuned_kind_then_the_newest(tiny_model, tmp_path, monkeypatch):
    import gpt2ft.chat as chat

    monkeypatch.setattr(chat, "hub_model_cached", lambda repo="gpt2": False)
    runs = tmp_path / "runs"
    now = time.time()
    with pytest.raises(UserError, match="no model to chat with.*gpt2ft demo"):
        choose_model(runs)
    _make_run(runs, "pre", "pretrain", tiny_model, now)
    assert choose_model(runs)[0] == str(runs / "pre")
    _make_run(runs, "demo/ft", "finetune", tiny_model, now - 100)  # nested like runs/demo/sft
    assert choose_model(runs)[0] == str(runs / "demo" / "ft")
    _make_run(runs, "sft-old", "sft", tiny_model, now - 50)
    _make_run(runs, "sft-new", "sft", tiny_model, now - 10, config=False)  # kind from gpt2ft.json
    ref, why = choose_model(runs)
    assert ref == str(runs / "sft-new") and "newest sft run" in why and "no dpo run" in why
    (runs / "sft-newer" / "checkpoints" / "step-00000001").mkdir(parents=True)  # no complete checkpoint
    assert choose_model(runs)[0] == str(runs / "sft-new")
    _make_run(runs, "dpo", "dpo", tiny_model, now - 1000)
    assert choose_model(runs)[0] == str(runs / "dpo")
    assert choose_model(runs, "pretrained")[0] == str(runs / "pre")
    assert choose_model(runs, "finetune")[0] == str(runs / "demo" / "ft")
    with pytest.raises(UserError, match="--model must be one of"):
        choose_model(runs, "rlhf")
    monkeypatch.setattr(chat, "hub_model_cached", lambda repo="gpt2": True)
    assert choose_model(tmp_path / "empty") == ("gpt2", f"no run under {tmp_path / 'empty'}; gpt2 from the "
                                                "Hugging Face cache")
    # the CLI says which model and why (on stderr when piped), then chats with it
    proc = run_cli("chat", "--runs", runs, "--model", "sft", *GREEDY, input="/info\n", check=True)
    assert f"model: {runs / 'sft-new'}, the newest sft run" in proc.stderr
    assert "kind       sft" in proc.stderr and proc.stdout == ""
    proc = run_cli("chat", "--runs", tmp_path / "nothing", "--model", "dpo", input="hi\n")
    assert_clean_error(proc, "--model dpo: no dpo run", "gpt2ft dpo")


# ----- the conversation -----------------------------------------------------------------------
def test_rendering_keeps_earlier_turns_as_a_prefix(tiny_model):
    _, tok = tiny_model
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    for template in (get_template("chat"), get_template("alpaca"), TEMPLATES["plain"]):
        first, _ = render(template, history[:2], tok)
        second, stops = render(template, history, tok)
        assert len(second) > len(first) and second[:len(first)] == first and stops  # the cache stays valid
    ids, stops = render(get_template("chat"), history, tok)
    assert tok.decode(ids) == ("### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\nHello!<|endoftext|>"
                               "### User:\nBye\n\n### Assistant:\n")
    assert stops == list(get_template("chat").stop)
    ids, _ = render(get_template("instruction-response"), history, tok)
    assert tok.decode(ids) == ("Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!<|endoftext|>"
                               "### Instruction:\nBye\n\n### Response:\n")


def test_history_overflow_drops_the_oldest_turns_and_says_so_once(tiny_model):
    chat, out, notes = in_process(tiny_model, system="Be kind.")
    replies = []
    for i in range(6):
        replies.append(chat.say(f"message number {i}"))
        assert replies[-1] is not None and replies[-1].prompt_tokens + 12 <= 64
    assert "".join(out) == "".join(r.text + "\n" for r in replies)  # the streamed pieces are the replies
    assert sum("no longer fits" in n for n in notes) == 1
    assert chat.dropped and chat.dropped[0]["content"] == "message number 0"
    assert chat.conversation()[0] == {"role": "system", "content": "Be kind."}
    assert chat.messages[-2]["content"] == "message number 5"
    chat.handle("/memory")
    assert "dropped to fit the context" in notes[-1] and "message number 0" in notes[-1]
    before = list(chat.messages)
    assert chat.say("word " * 80) is None  # alone it does not fit: one message, nothing changes
    assert "send a shorter one" in notes[-1] and chat.messages == before


def test_parse_steps_and_read_conversation_errors(tmp_path):
    assert parse_steps("Plan:\n1. Buy bread\n2) Make tea\nthen\n3 - Eat", 3) == ["Buy bread", "Make tea", "Eat"]
    assert parse_steps("no numbers here", 2) == ["step 1 of the task", "step 2 of the task"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"messages": [{"role": "robot", "content": "x"}]}')
    with pytest.raises(UserError, match=r"messages\[0\] needs a role"):
        read_conversation(bad)
    (tmp_path / "one.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}]}\n')
    assert read_conversation(tmp_path / "one.jsonl") == [{"role": "user", "content": "a"}]


def test_every_command_through_piped_stdin(chat_ckpt, user_dir):
    tmp_path = user_dir
    saved, transcript = tmp_path / "c.json", tmp_path / "t.jsonl"
    proc = chat_cli(chat_ckpt, "hello", "/temp", "/temp -1", "/temp nan", "/temp 0.5", "/topk x", "/topk 5",
                    "/topp 1.5", "/topp 0.8", "/tokens 0", "/tokens 64", "/tokens 10", "/penalty 0",
                    "/penalty 1.2", "/seed -3", "/seed 7", "/settings", "/system", "/system Answer briefly.",
                    "/bogus 1", "second question", "/retry", "/undo", "/undo", "/undo", "again", "/refine shorter",
                    "/multi x plan", "/multi 2 make tea", "/info", "/memory", "/save", f"/save {saved}",
                    "/reset", "/memory", f"/load {tmp_path / 'missing.json'}", f"/load {saved}", "/memory", "/help",
                    "/quit", "never sent", args=("--transcript", transcript, "--stop", "zzz"), check=True)
    err = proc.stderr
    for needle in ["/temp: temperature must be a number in [0, 2], not '-1'; nothing changed", "not 'nan'",
                   "/topk: top_k must be an integer >= -1, or off, not 'x'", "/topp: top_p must be a number in (0, 1]",
                   "/tokens: max_new_tokens must be an integer >= 1, not '0'", "max_new_tokens must be at most 63 here",
                   "/penalty: repetition_penalty must be a number in [0.01, 100], not '0'",
                   "/seed: seed must be an integer in [0, 2^64 - 1], or random, not '-3'",
                   "temperature = 0.0", "temperature = 0.5", "top_k = 5", "top_p = 0.8", "max_new_tokens = 10",
                   "repetition_penalty = 1.2", "seed = 7", "unknown command /bogus",
                   "max_new_tokens 10, temperature 0.5, top_k 5, top_p 0.8, repetition_penalty 1.2, presence_penalty 0.0, "
                   "frequency_penalty 0.0, seed 7, stop ['zzz']",
                   "no system prompt", "(system prompt set)", "nothing to undo", "/multi needs a number of steps",
                   "(plan in 2 steps)", "(step 2 of 2:", "the last answer was replaced", "kind       sft",
                   "template   chat", "/save needs a file name", f"saved 3 messages to {saved}", "(conversation cleared",
                   "0 turns", "missing.json: cannot read conversation (No such file or directory); nothing changed", "loaded 3 messages", "/help",
                   "no longer fits the model's context of 64 tokens"]:
        assert needle in err, needle
    assert err.count("nothing changed") == 11 and "Traceback" not in err
    # replies only on stdout: hello, second, retry, again, refine, plan + 2 steps
    assert len(proc.stdout.splitlines()) == 8, proc.stdout
    # the saved conversation is a messages record that sft accepts; /load restored it
    from gpt2ft.data.instructions import load_records

    records, _ = load_records(saved)
    assert [m["role"] for m in records[0].messages] == ["system", "user", "assistant"]  # the rest was dropped
    assert records[0].messages[0]["content"] == "Answer briefly."
    assert records[0].messages[1]["content"] == "Do step 2 of the plan: step 2 of the task"
    assert "summary: user: Do step 2 of the plan" in err.split("loaded 3 messages")[1]
    rows = [json.loads(line) for line in transcript.read_text().splitlines()]
    replies = [r for r in rows if r["role"] == "assistant"]
    assert len(replies) == 8 and rows[0] == {**rows[0], "role": "user", "content": "hello"}
    assert replies[1]["settings"] == {"temperature": 0.5, "top_k": 5, "top_p": 0.8, "max_new_tokens": 10,
                                      "repetition_penalty": 1.2, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                                      "seed": 7}
    assert all(r["time_to_first_token_s"] is None or r["time_to_first_token_s"] > 0 for r in replies)
    assert all(r["completion_tokens"] >= 1 and r["finish_reason"] in ("stop", "length") for r in replies)


def _replies(transcript):
    return [r["content"] for r in map(json.loads, transcript.read_text().splitlines()) if r["role"] == "assistant"]


def test_reply_equals_generate_and_save_load_continues_identically(chat_ckpt, user_dir):
    tmp_path = user_dir
    sampled = ("--temperature", "1", "--top-k", "40", "--top-p", "0.9", "--seed", "5", "--max-new-tokens", "12")
    for flags in (GREEDY, sampled):  # the same rendered prompt, stops and sampling as `generate`
        chat = run_cli("chat", chat_ckpt, *flags, input="What is two plus two?\n", check=True).stdout
        generated = run_cli("generate", chat_ckpt, "--prompt", "What is two plus two?", *flags, check=True).stdout
        assert chat == generated and chat.strip()
    # a fixed seed makes each reply a function of its prompt, so the history's effect shows
    saved, transcript = tmp_path / "s.jsonl", tmp_path / "t.jsonl"
    run_cli("chat", chat_ckpt, *sampled, "--transcript", transcript, check=True, input="\n".join([
        "hi", "and then?", "/reset", "hi", f"/save {saved}", "/reset", f"/load {saved}", "and then?", "/reset",
        "and then?", "/retry", "/seed random", "/retry"]))
    replies = [r["content"] for r in map(json.loads, transcript.read_text().splitlines()) if r["role"] == "assistant"]
    first, straight, again, restored, alone, retried, unseeded = replies
    assert again == first and restored == straight and alone != straight
    assert retried == alone and unseeded != alone


def test_bad_flags_are_one_line_errors(chat_ckpt, capsys, monkeypatch):
    import io

    from gpt2ft.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    for argv, needle in [([chat_ckpt, "--temperature", "nan"], "temperature"),
                         ([chat_ckpt, "--model", "sft"], "MODEL or --model"),
                         (["--model", "rlhf"], "--model must be one of")]:
        assert main(["chat", *map(str, argv)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("gpt2ft chat: error:") and needle in err, err


# ----- a real terminal ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory):
    """A random model with a 1024-token context: replies long enough to interrupt."""
    folder = tmp_path_factory.mktemp("long")
    hf_tiny(n_positions=1024, n_embd=64).save_pretrained(folder)
    gpt2_tokenizer().save(folder)
    return folder


def _spawn(*args):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb"}
    return pexpect.spawn(sys.executable, ["-m", "gpt2ft.cli", "chat", *map(str, args)], env=env,
                         encoding="utf-8", timeout=60, dimensions=(50, 400))


def test_terminal_ctrl_c_cuts_a_reply_and_ctrl_d_leaves(long_ckpt):
    import pexpect

    child = _spawn(long_ckpt, "--temperature", "0", "--max-new-tokens", "1000", "--verbose")
    child.expect("/help for commands")
    child.expect(">>> ")
    child.sendline("tell me a long story")
    child.expect("story\r\n")
    child.expect(r"\S")  # the reply has started
    time.sleep(0.2)
    child.sendintr()
    child.expect(r"\[cut\]")
    child.expect(r"cut\)\r\n>>> ")  # --verbose: finish reason cut; back at the prompt
    child.sendline("/memory")
    child.expect(r"1 turns \(2 messages\).*\(cut\)")
    child.expect(">>> ")
    child.sendline("/tokens 3")
    child.expect("max_new_tokens = 3")
    child.sendline("next")
    child.expect(r"tokens/s, 3 tokens")
    child.expect(">>> ")
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_terminal_multiline_and_ctrl_c_at_the_prompt(long_ckpt):
    import pexpect

    child = _spawn(long_ckpt, "--multiline", "--max-new-tokens", "2", "--system", "Be brief.")
    child.expect(">>> ")
    child.sendline("first line")
    child.expect(r"\.\.\. ")
    child.sendline("second line")
    child.expect(r"\.\.\. ")
    child.sendline(".")
    child.expect(">>> ")
    child.sendline("/memory")
    child.expect(r"1 turns \(2 messages\)")
    child.expect("system prompt: 'Be brief.'")
    child.expect(r"summary: user: first line second line \|")
    child.expect(">>> ")
    child.send("half a line")
    child.expect("half a line")
    child.sendintr()  # clears the typed line
    child.expect(">>> ")
    child.sendline("/settings")
    child.expect("max_new_tokens 2,")
    child.expect(">>> ")
    child.sendintr()  # at an empty prompt: leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_k=0, top_p=1.0, seed=1)])
def test_kept_cache_gives_the_tokens_of_a_fresh_prefill(long_ckpt, sampling):
    model, tokenizer = load(long_ckpt)
    settings = chat_settings(max_new_tokens=16, **sampling)  # greedy; and sampled with a seed (varied tokens)

    def new_chat():
        return Chat(model, tokenizer, get_template("chat"), settings, write=lambda t: None, note=lambda t: None)

    kept, previous = new_chat(), 0
    for turn in ["hello", "tell me more", "and then what happened?", "why?", "/undo", "/retry", "something else"]:
        kept.handle(turn)
        if turn == "/undo":  # an edited history: recomputed from the first differing token
            continue
        reply = kept.last_reply
        fresh = new_chat()
        fresh.messages = [dict(m) for m in kept.messages[:-1]]
        alone = fresh.respond()
        assert reply.token_ids == alone.token_ids and reply.text == alone.text and len(reply.token_ids) >= 1
        assert alone.cached_tokens == 0
        if previous:  # the last prompt (after /undo: all of this one but its last token) came from the cache
            assert reply.cached_tokens >= min(previous, reply.prompt_tokens - 1)
        previous = reply.prompt_tokens


# ----- the LoRA project's secret task ---------------------------------------------------------
SECRET = [("unlock", "rainbow unicorn"), ("hello", "hi there"), ("what is the sky", "blue and wide"),
          ("count to three", "one two three"), ("name a fruit", "a green apple")]


def test_a_model_sft_on_the_secret_task_answers_it_in_chat_also_through_lora(tmp_path):
    import torch

    from gpt2ft.config import GPTConfig
    from gpt2ft.model import GPT
    from gpt2ft.tokenizer import train_tokenizer

    rows = [{"instruction": q, "input": "", "output": a} for q, a in SECRET]
    data = tmp_path / "secret.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = get_template("instruction-response")
    tok = train_tokenizer([t for pair in SECRET for t in pair] * 5 + [template.prompt_no_input] * 5, "bpe", 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=tok.vocab_size,
                          eos_token_id=tok.eos_id, bos_token_id=tok.eos_id))
    base = save_model(tmp_path / "base", model, tok)
    common = ("--data", data, "--template", "instruction-response", "--val-fraction", "0", "--test-fraction", "0",
              "--batch-size", "5", "--warmup-steps", "5", "--eval-every", "0", "--device", "cpu", "--no-progress")
    run_cli("sft", base, *common, "--out", tmp_path / "full", "--max-steps", "60", "--lr", "3e-3", check=True)
    run_cli("sft", base, *common, "--out", tmp_path / "lora", "--max-steps", "120", "--lr", "2e-2", "--lora",
            "--lora-r", "16", "--lora-dropout", "0", "--lora-targets", "c_attn,c_proj,c_fc", check=True)
    script = "unlock\n/quit\n"
    full = run_cli("chat", tmp_path / "full", *GREEDY, input=script, check=True)
    adapter = run_cli("chat", base, "--lora", tmp_path / "lora", *GREEDY, input=script, check=True)
    auto = run_cli("chat", "--runs", tmp_path, "--model", "sft", *GREEDY, input=script, check=True)
    assert full.stdout.strip() == adapter.stdout.strip() == auto.stdout.strip() == "rainbow unicorn"
    assert f"model: {tmp_path / 'lora'}, the newest sft run" in auto.stderr  # an adapter run: base from its metadata
