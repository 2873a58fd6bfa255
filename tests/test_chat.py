"""`gpt2ft chat`: model auto-selection, every command, history dropping, save/load, Ctrl-C, pipes and a pty."""
import json
import os
import sys
import time

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


def in_process(tiny_model, template="chat", **kw):
    model, tokenizer = tiny_model
    out, notes = [], []
    chat = Chat(model, tokenizer, template and get_template(template), chat_settings(temperature=0, max_new_tokens=12),
                write=out.append, note=notes.append, **kw)
    return chat, out, notes


@pytest.fixture
def user_dir(tmp_path):
    """A folder of the user's (pytest's basetemp holds a `.lock`: it must not pass for a run folder's)."""
    return tmp_path


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


def test_history_overflow_drops_the_oldest_turns_and_says_so_once(tiny_model, tmp_path):
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
    chat.messages[-1]["cut"] = True  # as a Ctrl-C leaves the last reply
    chat.handle(f"/save {tmp_path / 'all.json'}")  # every turn, the dropped ones too; the cut reply is not trained
    saved = json.loads((tmp_path / "all.json").read_text())[0]["messages"]
    assert [m["content"] for m in saved[1::2]] == [f"message number {i}" for i in range(5)]
    assert saved[0]["role"] == "system" and saved[-1]["role"] == "assistant" and "weight" not in saved[-1]
    chat.say("one more")
    chat.messages[-3]["cut"] = True  # a cut reply inside the conversation stays as context, weight 0
    chat.handle(f"/save {tmp_path / 'all.json'}")
    saved = json.loads((tmp_path / "all.json").read_text())[0]["messages"]
    assert saved[-3] == {"role": "assistant", "content": chat.messages[-3]["content"], "weight": 0}
    from gpt2ft.data.instructions import load_records

    records, _ = load_records(tmp_path / "all.json")  # sft reads it: the weight-0 reply is context only
    assert len(records) == 1
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
                   "template   chat", "/save needs a file name", f"saved 9 messages to {saved}", "(conversation cleared",
                   "0 turns", "missing.json: cannot read conversation (No such file or directory); nothing changed", "loaded 9 messages", "/help",
                   "no longer fits the model's context of 64 tokens"]:
        assert needle in err, needle
    assert err.count("nothing changed") == 11 and "Traceback" not in err
    # replies only on stdout: hello, second, retry, again, refine, plan + 2 steps
    assert len(proc.stdout.splitlines()) == 8, proc.stdout
    # the saved conversation is a messages record that sft accepts; /load restored it
    from gpt2ft.data.instructions import load_records

    records, _ = load_records(saved)
    roles = [m["role"] for m in records[0].messages]  # every turn since "again", those dropped from the context too
    assert roles == ["system"] + ["user", "assistant"] * 4 and records[0].messages[0]["content"] == "Answer briefly."
    assert records[0].messages[1]["content"] == "again"
    assert records[0].messages[-2]["content"] == "Do step 2 of the plan: step 2 of the task"
    assert "summary: user: again" in err.split("loaded 9 messages")[1]
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
                         (["--model", "rlhf"], "--model must be one of"),
                         ([chat_ckpt, "--json-schema", chat_ckpt / "none.json"], "cannot read JSON schema"),
                         ([chat_ckpt, "--json", "--regex", "a+"], "not allowed with argument")]:
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


@pytest.mark.parametrize("draft", ["ngram", "itself"])
def test_chat_with_a_draft_replies_as_without_it(long_ckpt, draft):
    """chat --draft: the same greedy replies turn after turn (the kept cache included); --verbose says how
    many drafted tokens the model accepted (all of them when the model drafts for itself)."""
    model, tokenizer = load(long_ckpt)
    settings = chat_settings(max_new_tokens=16, temperature=0)
    notes = []
    options = {"draft": "ngram" if draft == "ngram" else model, "draft_k": 3}
    spec = Chat(model, tokenizer, get_template("chat"), settings, write=lambda t: None, note=notes.append,
                verbose=True, engine_options=options)
    plain = Chat(model, tokenizer, get_template("chat"), settings, write=lambda t: None, note=lambda t: None)
    for turn in ["hello", "tell me more", "/retry", "and then what happened?"]:
        spec.handle(turn), plain.handle(turn)
        assert spec.last_reply.token_ids == plain.last_reply.token_ids
    import re

    stats = [m.groups() for n in notes if (m := re.search(r"(\d+) of (\d+) drafted tokens accepted", n))]
    assert stats and (draft == "ngram" or all(accepted == drafted for accepted, drafted in stats))


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


# ----- one schema; no command error ends the chat; files a user owns ----------------------------
def test_sampling_commands_help_and_settings_are_derived_from_the_schema(tiny_model, monkeypatch):
    import dataclasses

    from gpt2ft import sampling
    from gpt2ft.argtypes import Range

    # a new option in the schema appears in the REPL with its range and help, with no REPL change
    min_p = sampling.Option("min_p", 0.0, Range(float, 0, 1), "drop tokens below min_p times the top one", None,
                            "minp", None, None, False)
    monkeypatch.setitem(sampling.OPTIONS, "min_p", min_p)
    # and an option's command and range, changed there, change here
    monkeypatch.setitem(sampling.OPTIONS, "temperature",
                        dataclasses.replace(sampling.OPTIONS["temperature"], command="heat", range=Range(float, 0, 5)))
    chat, out, notes = in_process(tiny_model)
    chat.handle("/help")
    assert "/minp X" in notes[-1] and "min_p: a number in [0, 1]; drop tokens below" in notes[-1]
    assert "/heat X" in notes[-1] and "a number in [0, 5]" in notes[-1] and "/temp " not in notes[-1]
    chat.handle("/minp 0.25")
    chat.handle("/heat 4")
    assert notes[-2:] == ["min_p = 0.25", "temperature = 4.0"] and chat.settings.min_p == 0.25
    chat.handle("/minp 2")
    assert notes[-1] == "/minp: min_p must be a number in [0, 1], not '2'; nothing changed"
    chat.handle("/temp 1")
    assert notes[-1].startswith("unknown command /temp") and "/heat" in notes[-1] and "/minp" in notes[-1]
    chat.handle("/settings")
    assert "temperature 4.0" in notes[-1] and notes[-1].endswith("min_p 0.25, output free text")
    for command in ("/memory bogus", "/undo 2", "/info x"):
        chat.handle(command)
        name, arg = command.split()
        assert notes[-1] == f"{name} takes no argument, not {arg!r} (nothing changed): type {name} alone"
    assert chat.settings.temperature == 4.0 and chat.settings.top_k == 40  # chat's defaults


def test_every_bad_value_file_or_message_is_one_line_and_the_chat_goes_on(chat_ckpt, user_dir):
    d = user_dir
    (d / "binary.json").write_bytes(b"\x00\x01\x02{}" * 10)
    (d / "latin1.json").write_bytes('{"messages": [{"role": "user", "content": "caf\xe9"}]}'.encode("latin-1"))
    (d / "notes.txt").write_text("my notes\n")
    (d / "big.json").write_text(json.dumps({"messages": [{"role": "user", "content": "x" * 2**20}]}))
    (d / "a-file").write_text("a file\n")
    model_file = chat_ckpt / "model.safetensors"
    kept = {p: p.read_bytes() for p in (model_file, d / "notes.txt", d / "a-file", d / "big.json")}
    bad = ["/penalty 1000", "/temp 5", "/topk 1.5", "/topp 0", "/tokens 1000000", "/seed x", "/presence 3",
           "/frequency nan", f"/load {d / 'binary.json'}", f"/load {d / 'latin1.json'}", f"/load {d / 'notes.txt'}",
           f"/load {d / 'big.json'}", f"/load {d}", f"/save {model_file}", f"/save {d / 'notes.txt'}",
           f"/save {d / 'a-file' / 'x.json'}", f"/save {d}"]
    proc = chat_cli(chat_ckpt, "hello", *bad, "word " * 100, "/memory", "second message", check=True)
    err = proc.stderr
    assert "Traceback" not in err and len(proc.stdout.splitlines()) == 2  # both messages got a reply
    assert err.count("; nothing changed\n") == len(bad)
    for needle in ["repetition_penalty must be a number in [0.01, 100], not '1000'", "temperature must be a number in "
                   "[0, 2], not '5'", "top_k must be an integer >= -1, or off, not '1.5'", "presence_penalty must be a "
                   "number in [-2, 2]", "binary.json: not a conversation (binary data)",
                   "latin1.json: malformed conversation (not UTF-8 text)", "notes.txt: not a JSON conversation",
                   "big.json: 1.0 MB is over the limit of 1 MB for a conversation", "is a folder, not a conversation",
                   f"/save: cannot write conversation {model_file}: {chat_ckpt} is a model or run folder",
                   "notes.txt already exists and gpt2ft did not write it: choose another name",
                   "a-file is a file, not a folder", "it is a folder; name a file",
                   "that message needs", "send a shorter one", "1 turns (2 messages)"]:
        assert needle in err, needle
    assert all(p.read_bytes() == b for p, b in kept.items()) and sorted(q.name for q in d.iterdir()) == \
        ["a-file", "big.json", "binary.json", "latin1.json", "notes.txt"]


def test_a_failing_turn_keeps_the_conversation(tiny_model):
    chat, out, notes = in_process(tiny_model)
    chat.handle("hello")
    before = [dict(m) for m in chat.messages]

    def broken(*args, **kw):
        raise UserError("the engine refused")

    chat.engine.complete = broken
    for line in ("again", "/retry", "/refine", "/multi 2 go"):
        chat.handle(line)
        assert notes[-1] == "the engine refused; nothing changed" and chat.messages == before, line
    del chat.engine.complete
    assert chat.say("and now?") is not None and len(chat.messages) == 4


def test_save_replaces_only_a_file_this_chat_saved(tiny_model, user_dir):
    path = user_dir / "c.json"
    chat, _, notes = in_process(tiny_model)
    chat.handle("hi")
    chat.handle(f"/save {path}")
    chat.handle("more")
    chat.handle(f"/save {path}")  # the same chat again: replaced
    assert notes[-1].startswith(f"(saved {len(chat.messages)} messages to {path}")
    assert read_conversation(path) == chat.conversation()
    saved = path.read_bytes()
    other, _, other_notes = in_process(tiny_model)  # a later chat: never replaces it
    other.handle("hey")
    other.handle(f"/save {path}")
    assert other_notes[-1] == (f"/save: conversation {path} already exists (written by gpt2ft earlier): choose another name, or "
                               "remove it first (only a file this chat saved is replaced); nothing changed")
    assert path.read_bytes() == saved
    other.handle(f"/load {path}")
    assert other.messages == chat.messages
    path.write_text(path.read_text().replace("hi", "hello"))  # edited by the user: no longer gpt2ft's
    chat.handle(f"/save {path}")
    assert "gpt2ft did not write it" in notes[-1] and "hello" in path.read_text()


def test_transcript_appends_only_to_its_own_file(tiny_model, chat_ckpt, user_dir):
    from gpt2ft.chat import Transcript

    log = user_dir / "t.jsonl"
    for _ in range(2):  # a new file, then the same transcript in a later chat: appended
        chat, _, _ = in_process(tiny_model, transcript=Transcript(log))
        chat.handle("hi")
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["role"] for r in rows] == ["user", "assistant"] * 2
    (user_dir / "notes.jsonl").write_text('{"role": "user", "time": 1}\n')
    chat.handle(f"/save {user_dir / 'c.jsonl'}")  # written by gpt2ft, but not a transcript
    for target, needle in [(user_dir / "notes.jsonl", "gpt2ft did not write it"), (user_dir / "c.jsonl", "not a chat "
                           "transcript"), (chat_ckpt / "t.jsonl", "model or run folder"), (user_dir, "is a folder"),
                           (user_dir / "notes.jsonl" / "t.jsonl", "is a file, not a folder")]:
        with pytest.raises(UserError, match=needle):
            Transcript(target)
    with open(log, "a") as f:  # appended to by someone else: not gpt2ft's any more
        f.write('{"role": "user", "time": 2, "content": "mine"}\n')
    with pytest.raises(UserError, match="gpt2ft did not write it"):
        Transcript(log)
    proc = chat_cli(chat_ckpt, "hi", args=("--transcript", user_dir / "notes.jsonl"))
    assert_clean_error(proc, "--transcript", "notes.jsonl")


def test_a_model_without_a_template_gets_the_plain_one_as_in_the_server(tiny_model):
    from gpt2ft.templates import pick_template

    chat, out, notes = in_process(tiny_model, template=None, system="Be brief.")
    assert chat.template is pick_template(None, None) is TEMPLATES["plain"] and chat.untuned
    chat.handle("hi")
    ids, stops = chat.render(chat.conversation() + [{"role": "user", "content": "and?"}])
    assert tiny_model.tokenizer.decode(ids) == f"Be brief.\n\nUser: hi\nAssistant:{chat.messages[-1]['content']}" \
                                              "<|endoftext|>User: and?\nAssistant:"
    assert stops == ["\nUser:", "\nAssistant:"]
    chat.handle("/info")
    assert "template   plain (the model has no saved template)" in notes[-1]


def test_a_long_loaded_conversation_costs_a_few_renders(tiny_model, user_dir, monkeypatch):
    import gpt2ft.chat as chat_module

    turns = [{"role": r, "content": f"turn {i} " + "word " * 20} for i in range(3000) for r in ("user", "assistant")]
    path = user_dir / "long.json"
    path.write_text(json.dumps({"messages": turns}))
    assert path.stat().st_size < 2**20
    chat, _, notes = in_process(tiny_model)
    chat.handle(f"/load {path}")
    chat.handle("/memory")  # loaded, not yet fitted: it says what the next message will drop
    assert "more than the context holds: the oldest turns are dropped at the next message" in notes[-1]
    calls = []
    render = chat_module.render
    monkeypatch.setattr(chat_module, "render", lambda *a: calls.append(len(a[1])) or render(*a))
    reply = chat.say("hello")
    assert reply is not None and len(calls) <= 30 and sum(calls) < 6000 * 2  # not one render per dropped turn
    assert len(chat.dropped) + len(chat.messages) == 6002 and chat.messages[-2]["content"] == "hello"
    # the fewest turns were dropped: one more exchange would not leave room for the reply
    room = lambda messages: chat.context - len(render(chat.template, messages, chat.tokenizer)[0])  # noqa: E731
    assert room(chat.messages[:-1]) >= 12 > room(chat.dropped[-2:] + chat.messages[:-1])


def test_terminal_bad_commands_keep_the_conversation(long_ckpt, user_dir):
    import pexpect

    (user_dir / "bin.json").write_bytes(b"\x00" * 100)
    child = _spawn(long_ckpt, "--temperature", "0", "--max-new-tokens", "3")
    child.expect(">>> ")
    child.sendline("hello")
    child.expect(">>> ")
    for line, needle in [("/penalty 1000", r"not '1000'; nothing changed"), ("/tokens 5000", "at most 1023 here"),
                         (f"/load {user_dir / 'bin.json'}", r"binary data\); nothing changed"),
                         (f"/save {user_dir / 'bin.json' / 'x.json'}", "is a file, not a folder"),
                         (f"/save {long_ckpt / 'config.json'}", "model or run folder"), ("/seed -1", "or random")]:
        child.sendline(line)
        child.expect(needle)
        child.expect(">>> ")
    child.sendline("again")
    child.expect(">>> ")
    child.sendline("/memory")
    child.expect(r"2 turns \(4 messages\)")
    child.expect(">>> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and (user_dir / "bin.json").read_bytes() == b"\x00" * 100


def test_json_command_constrains_every_reply_until_off_and_bad_files_change_nothing(tiny_model, user_dir,
                                                                                     monkeypatch):
    import gpt2ft.chat_commands as chat_commands
    from gpt2ft.sampling import GrammarSpec

    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    d = user_dir
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    (d / "schema.json").write_text(json.dumps(schema))
    (d / "broken.json").write_text('{"type": ')
    (d / "list.json").write_text("[1, 2]")
    (d / "unknown.json").write_text('{"type": "frobnicate"}')
    (d / "binary.json").write_bytes(b"\x00{}")
    (d / "big.json").write_text(json.dumps({**schema, "description": "x" * 300}))
    monkeypatch.setattr(chat_commands, "MAX_SCHEMA_BYTES", 256)
    chat, out, notes = in_process(tiny_model)
    chat.handle("/help")
    assert "/json [FILE|off]" in notes[-1]
    chat.handle("/json")
    assert chat.settings.grammar == GrammarSpec("json")
    chat.handle("hi")
    assert isinstance(json.loads(chat.last_reply.text), dict) and chat.last_reply.finish_reason == "stop"
    chat.handle(f"/json {d / 'schema.json'}")
    chat.handle("and now?")
    jsonschema.validate(json.loads(chat.last_reply.text), schema)
    chat.handle("/settings")
    assert notes[-1].endswith('output JSON schema {"type": "object", "properties": {"answer": {"type": "int...')
    before = chat.settings.grammar
    for name, needle in [("broken.json", "broken.json:1: malformed JSON schema (Expecting value)"),
                         ("list.json", "a JSON schema is an object such as"),
                         ("unknown.json", "unknown.json: malformed JSON schema:"),
                         ("binary.json", "not a JSON schema (binary data)"),
                         ("big.json", "over the limit of 256 bytes for a JSON schema"), ("missing.json", "cannot read"),
                         ("", "is a folder, not a JSON schema")]:
        n = len(notes)
        assert chat.handle(f"/json {d / name}") and len(notes) == n + 1
        assert notes[-1].startswith("/json: ") and needle in notes[-1] and notes[-1].endswith("; nothing changed")
        assert "\n" not in notes[-1] and chat.settings.grammar == before, notes[-1]
    chat.handle("/json off")
    assert chat.settings.grammar is None
    chat.handle("/settings")
    assert notes[-1].endswith("output free text")
    chat.handle("hi")
    assert not chat.last_reply.text.startswith("{")


def test_an_empty_reply_is_marked_not_a_blank_line(tiny_model):
    """A model that ends its reply at once (here: end of text forced by a logit bias) is said to, in the
    reply's place; the conversation keeps the empty reply as it was."""
    from gpt2ft.chat import EMPTY_MARK

    model, tokenizer = tiny_model
    chat, out, notes = in_process(tiny_model)
    chat.settings.logit_bias = {tokenizer.eos_id: 100.0}
    reply = chat.say("hello")
    assert reply.text == "" and "".join(out) == EMPTY_MARK + "\n"
    assert chat.messages[-1] == {"role": "assistant", "content": ""}
    chat.settings.logit_bias = {}
    out.clear()
    assert chat.say("and now?").text.strip() and EMPTY_MARK not in "".join(out)


def test_save_leaves_out_a_last_reply_that_says_nothing(tiny_model, user_dir):
    """A blank last reply (a model that answered with newlines) is not saved: sft refuses such a record."""
    chat, _, notes = in_process(tiny_model)
    chat.messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                     {"role": "user", "content": "And?"}, {"role": "assistant", "content": "\n\n\n"}]
    chat.handle(f"/save {user_dir / 'c.jsonl'}")
    saved = json.loads((user_dir / "c.jsonl").read_text())["messages"]
    assert [m["content"] for m in saved] == ["Hi", "Hello"], notes
    from gpt2ft.data.instructions import load_records

    records, _ = load_records(user_dir / "c.jsonl")  # what sft reads
    assert records[0].response == "Hello"
    chat.messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]
    chat.handle(f"/save {user_dir / 'd.jsonl'}")
    assert not (user_dir / "d.jsonl").exists() and "no reply with text" in notes[-1]
