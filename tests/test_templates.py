"""Typed templates: single-turn rendering as written out by hand, multi-turn segments (trained = exactly
the assistant turns), storage round trip and old checkpoints' dicts, custom files, and the SFT tokens."""
import json

import pytest

from gpt2ft.data.instructions import load_records, read_rows
from gpt2ft.data.sft import prompt_ids, tokenize_messages
from gpt2ft.errors import UserError
from gpt2ft.templates import Segment, Template, get_template, prompt_for_generation
from gpt2ft.tokenizer import gpt2_tokenizer

INTRO = "Below is an instruction that describes a task"
USER = {"role": "user", "content": "Name a colour."}
USER_INPUT = {"role": "user", "content": "Translate", "input": "bonjour"}
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."}]


def test_builtin_templates_render_one_turn_exactly():
    alpaca, ir, chat = (get_template(n) for n in ("alpaca", "instruction-response", "chat"))
    assert alpaca.prompt([USER]) == (f"{INTRO}. Write a response that appropriately completes the request.\n\n"
                                     "### Instruction:\nName a colour.\n\n### Response:\n")
    assert alpaca.prompt([USER_INPUT]) == (
        f"{INTRO}, paired with an input that provides further context. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nTranslate\n\n### Input:\nbonjour\n\n### Response:\n")
    assert ir.prompt([USER]) == "### Instruction:\nName a colour.\n\n### Response:\n"
    assert ir.prompt([USER_INPUT]) == "### Instruction:\nTranslate\n\n### Input:\nbonjour\n\n### Response:\n"
    assert chat.prompt([USER]) == "### User:\nName a colour.\n\n### Assistant:\n"
    assert chat.prompt([USER_INPUT]) == "### User:\nTranslate\n\nbonjour\n\n### Assistant:\n"
    assert ir.prompt([{"role": "system", "content": "Be kind."}, USER]) == \
        "Be kind.\n\n### Instruction:\nName a colour.\n\n### Response:\n"
    assert alpaca.stop == ("\n### Instruction:", "\n### Input:") and chat.stop == ("\n### User:", "\n### System:")
    # placeholders inside the user's text are left alone
    tricky = {"role": "user", "content": "say {input}", "input": "{instruction}"}
    assert ir.prompt([tricky]) == "### Instruction:\nsay {input}\n\n### Input:\n{instruction}\n\n### Response:\n"


def test_multi_turn_chat_trains_exactly_the_assistant_turns():
    chat = get_template("chat")
    assert chat.render(CONVERSATION) == [
        Segment("### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\n", False), Segment("Hello!", True),
        Segment("### User:\nBye\n\n### Assistant:\n", False), Segment("Goodbye.", True)]
    assert chat.render(CONVERSATION[:-1], add_generation_prompt=True)[-1] == \
        Segment("### User:\nBye\n\n### Assistant:\n", False)
    assert chat.prompt(CONVERSATION[:-1]) == ("### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\nHello!"
                                              "### User:\nBye\n\n### Assistant:\n")


def test_multi_turn_instruction_template_repeats_its_format_per_turn():
    ir = get_template("instruction-response")
    segments = ir.render(CONVERSATION)
    assert segments == [Segment("Be brief.\n\n### Instruction:\nHi\n\n### Response:\n", False),
                        Segment("Hello!", True), Segment("### Instruction:\nBye\n\n### Response:\n", False),
                        Segment("Goodbye.", True)]
    alpaca = get_template("alpaca").render(CONVERSATION)
    assert [s.text for s in alpaca if s.trained] == ["Hello!", "Goodbye."]
    assert [s.text.count(INTRO) for s in alpaca if not s.trained] == [1, 1]
    assert alpaca[0].text.startswith("Be brief.\n\n" + INTRO)


@pytest.mark.parametrize("name", ["alpaca", "chat"])
def test_sft_tokens_supervise_exactly_the_replies_and_match_generation_prompts(name):
    tok = gpt2_tokenizer()
    template = get_template(name)
    ex = tokenize_messages(CONVERSATION, template, tok)
    targets = [t for t, s in zip(ex.ids, ex.supervised) if s]
    assert tok.decode(targets) == "Hello!<|endoftext|>Goodbye.<|endoftext|>"
    assert targets == tok.encode("Hello!") + [tok.eos_id] + tok.encode("Goodbye.") + [tok.eos_id]
    # the tokens generation continues from are exactly the training tokens before the last reply
    prefix = prompt_ids(CONVERSATION[:-1], template, tok)
    assert ex.ids[:len(prefix)] == prefix and ex.ids[len(prefix):] == tok.encode("Goodbye.") + [tok.eos_id]
    assert prefix.count(tok.eos_id) == 1  # after the first reply
    assert tok.decode(prefix).replace("<|endoftext|>", "") == template.prompt(CONVERSATION[:-1])
    everything = tokenize_messages(CONVERSATION, template, tok, train_on_prompt=True)
    assert everything.ids == ex.ids and all(everything.supervised)


def test_template_dicts_round_trip_and_old_checkpoint_dicts_load():
    for name in ("alpaca", "instruction-response", "chat"):
        t = get_template(name)
        assert Template.from_dict(json.loads(json.dumps(t.to_dict()))) == t
        assert t.to_dict()["kind"] == ("chat" if name == "chat" else "instruction")
    # as written into gpt2ft.json before templates had a kind
    old_chat = {"name": "chat", "system": "### System:\n{content}\n\n", "user": "### User:\n{content}\n\n",
                "assistant": "### Assistant:\n", "stop": ["\n### User:", "\n### System:"]}
    old_custom = {"prompt": "Q: {instruction}\nA:", "stop": ["\nQ:"], "prompt_no_input": "Q: {instruction}\nA:",
                  "name": "tpl"}
    assert Template.from_dict(old_chat) == get_template("chat")
    custom = Template.from_dict(old_custom)
    assert custom.kind == "instruction" and custom.prompt([USER]) == "Q: Name a colour.\nA:"
    assert prompt_for_generation({"template": old_custom}, "Hi") == ("Q: Hi\nA:", ["\nQ:"])
    assert prompt_for_generation({"template": old_chat}, "Hi", raw=True) == ("Hi", [])
    assert prompt_for_generation({}, "Hi") == ("Hi", [])
    with pytest.raises(UserError, match="kind must be one of"):
        Template.from_dict({**old_chat, "kind": "dialogue"})


def test_custom_template_files(tmp_path):
    chat = tmp_path / "turns.yaml"
    chat.write_text('kind: chat\nsystem: "<s>{content}</s>\\n"\nuser: "Q: {content}\\n"\nassistant: "A: "\n'
                    'stop: ["\\nQ:"]\n')
    t = get_template(str(chat))
    assert t.name == "turns" and t.kind == "chat" and t.stop == ("\nQ:",)
    assert t.render(CONVERSATION) == [Segment("<s>Be brief.</s>\nQ: Hi\nA: ", False), Segment("Hello!", True),
                                      Segment("Q: Bye\nA: ", False), Segment("Goodbye.", True)]
    slot = tmp_path / "slot.json"  # only a prompt with an input slot: unused slots are emptied
    slot.write_text(json.dumps({"name": "slot", "prompt": "Q: {instruction}\nC: {input}\nA:"}))
    t = get_template(str(slot))
    assert t.prompt([USER]) == "Q: Name a colour.\nC: \nA:" and t.prompt([USER_INPUT]) == "Q: Translate\nC: bonjour\nA:"
    plain = tmp_path / "plain.json"  # no input slot: the input follows the instruction
    plain.write_text(json.dumps({"prompt": "Q: {instruction}\nA:"}))
    assert get_template(str(plain)).prompt([USER_INPUT]) == "Q: Translate\n\nbonjour\nA:"
    for text, why in [('kind: chat\nuser: "no slot"\n', "'user' string containing {content}"),
                      ('prompt: "Q: {instruction}"\nstop: "\\nQ:"\n', "list of strings"),
                      ("- a list\n", "mapping")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(UserError, match=why) as e:
            get_template(str(bad))
        assert str(e.value).startswith(f"{bad}: ")
    with pytest.raises(UserError, match="not one of alpaca"):
        get_template(str(tmp_path / "missing.json"))


def test_unknown_roles_are_refused():
    with pytest.raises(UserError, match=r"messages\[1\] needs a role"):
        get_template("chat").prompt([USER, {"role": "wizard", "content": "x"}])


def test_rows_name_their_lines_csv_header_is_line_1(tmp_path):
    csv_file = tmp_path / "d.csv"
    csv_file.write_text('instruction,input,output\nTranslate,bonjour,hello\n"two\nlines",,ok\n')
    assert [w for w, _ in read_rows(csv_file)] == [f"{csv_file}:2", f"{csv_file}:3"]
    records, _ = load_records(csv_file)
    assert records[0].messages[0] == USER_INPUT | {"content": "Translate"}
    assert "input" not in records[1].messages[0]  # empty input: no input key
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"a": 1}\n\nnot json\n')
    rows = list(read_rows(jl))
    assert rows[0] == (f"{jl}:1", {"a": 1}) and rows[1][0] == f"{jl}:3" and isinstance(rows[1][1], UserError)


def test_a_template_file_with_a_byte_order_mark_reads_as_without(tmp_path):
    text = 'prompt: "Q: {instruction}\\nA:"\nstop: ["Q:"]\n'
    (tmp_path / "plain.yaml").write_text(text, encoding="utf-8")
    (tmp_path / "bom.yaml").write_text(text, encoding="utf-8-sig")
    plain, bom = get_template(str(tmp_path / "plain.yaml")), get_template(str(tmp_path / "bom.yaml"))
    assert bom.prompt([{"role": "user", "content": "x"}]) == plain.prompt([{"role": "user", "content": "x"}]) == "Q: x\nA:"
