"""Structured output on every surface: greedy decoding under a JSON schema gives the same tokens from
`gpt2ft generate --json-schema`, the chat REPL (`/json FILE` and `gpt2ft chat --json-schema`) and the
Python API, for the same prompt tokens."""
import json
import re

import pytest

from conftest import run_cli
from gpt2ft.chat import Chat, chat_settings, render
from gpt2ft.checkpoint import load, save_model
from gpt2ft.generation import complete_batch, generate
from gpt2ft.sampling import GrammarSpec, SamplingConfig
from gpt2ft.templates import get_template

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
MESSAGE = "Describe a person."
N = 24  # tokens: the budget-aware closing ends the object within it
GREEDY = ("--temperature", "0", "--max-new-tokens", str(N), "--device", "cpu")


@pytest.fixture(scope="module")
def ckpt(tiny_model, tmp_path_factory):
    model, tokenizer = tiny_model
    return save_model(tmp_path_factory.mktemp("structured") / "ckpt", model, tokenizer,
                      {"objective": "sft", "template": get_template("chat").to_dict()})


def test_generate_chat_and_the_api_agree_token_for_token_under_a_schema(ckpt, tmp_path):
    schema_file = tmp_path / "person.json"
    schema_file.write_text(json.dumps(SCHEMA, indent=1))  # the file's own text and key order on every surface
    model, tok = load(ckpt, device="cpu", dtype="float32")
    template, messages = get_template("chat"), [{"role": "user", "content": MESSAGE}]
    ids, stops = render(template, messages, tok)  # the chat's prompt tokens ...
    assert tok.encode(template.prompt(messages)) == ids  # ... are those of generate's templated prompt
    spec = GrammarSpec("json_schema", schema_file.read_text())
    cfg = SamplingConfig(max_new_tokens=N, temperature=0.0, template_stop=stops, grammar=spec)
    engine_row = complete_batch(model, tok, [ids], cfg)[0]
    text = engine_row.text
    jsonschema.validate(json.loads(text), SCHEMA)
    assert engine_row.finish_reason == "stop" and len(engine_row.token_ids) > 5

    assert generate(model, tok, template.prompt(messages), temperature=0.0, max_new_tokens=N, template_stop=stops,
                    grammar=spec) == text
    notes = []
    chat = Chat(model, tok, template, chat_settings(temperature=0, max_new_tokens=N), write=lambda _: None,
                note=notes.append)
    chat.handle(f"/json {schema_file}")
    chat.handle(MESSAGE)
    assert chat.last_reply.token_ids == engine_row.token_ids and chat.last_reply.text == text, notes

    cli_generate = run_cli("generate", ckpt, "--prompt", MESSAGE, "--json-schema", schema_file, *GREEDY, check=True)
    cli_chat = run_cli("chat", ckpt, *GREEDY, input=f"/json {schema_file}\n{MESSAGE}\n", check=True)
    cli_session = run_cli("chat", ckpt, *GREEDY, "--json-schema", schema_file, input=f"{MESSAGE}\n", check=True)
    assert cli_generate.stdout == cli_chat.stdout == cli_session.stdout == text + "\n"
    assert "every reply is JSON schema" in cli_chat.stderr


def test_a_batch_of_masks_computed_ahead_and_the_numpy_unpacking_match_the_direct_ones(tiny_model):
    """RowMasks (one executor call for every constrained row, ahead in a thread or on demand) gives each
    slot exactly the mask its own matcher computes alone; one apply_bitmask over the batch equals each
    row's mask unpacked by hand."""
    import torch

    from gpt2ft.grammar import GrammarState, RowMasks, apply_bitmask, new_bitmask

    model, tok = tiny_model
    vocab = model.config.vocab_size
    specs = [GrammarSpec.json_schema(SCHEMA), GrammarSpec("regex", "[a-z]+( [a-z]+)*"), GrammarSpec("json")]
    batch = [GrammarState(spec, tok, vocab) for spec in specs]
    direct = [GrammarState(spec, tok, vocab) for spec in specs]
    slots = [3, 0, 1]
    masks = RowMasks(4, vocab)
    rows = list(zip(slots, batch))
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        if step % 2:
            masks.start(rows)  # ahead, as the engine does while the forward runs; else on demand
        assert masks.fill(rows) == {}
        logits = torch.randn(len(rows), vocab, generator=gen)
        masked = apply_bitmask(logits, masks.bitmask[slots])
        for i, (slot, b, d) in enumerate(zip(slots, batch, direct)):
            want = new_bitmask(1, vocab)
            d.fill_mask(want, 0)
            assert torch.equal(masks.bitmask[slot], want[0])
            if i == 0:  # the unpacking, bit by bit
                allowed = torch.tensor([bool(int(want[0, t // 32]) >> (t % 32) & 1) for t in range(vocab)])
                assert torch.equal(masked[i], logits[i].masked_fill(~allowed, float("-inf")))
            token = int(masked[i].argmax())
            b.accept(token), d.accept(token)


def test_an_output_cut_before_it_matches_is_an_error_not_a_quiet_success(ckpt):
    """A budget too small for the constraint: generate prints what it has, names the flag that would fix it
    and exits non-zero; chat says so beside the reply."""
    choice = "the quick brown fox jumps over the lazy dog"
    cut = run_cli("generate", ckpt, "--prompt", MESSAGE, "--choice", choice, "--temperature", "0",
                  "--max-new-tokens", "2")
    assert cut.returncode == 2 and choice.startswith(cut.stdout.strip()) and cut.stdout.strip() != choice
    assert "--max-new-tokens 2 before it matched --choice" in cut.stderr and "Traceback" not in cut.stderr
    whole = run_cli("generate", ckpt, "--prompt", MESSAGE, "--choice", choice, "--temperature", "0",
                    "--max-new-tokens", "40", check=True)
    assert whole.stdout == choice + "\n"
    chat = run_cli("chat", ckpt, "--choice", choice, "--temperature", "0", "--max-new-tokens", "2",
                   input=f"{MESSAGE}\n", check=True)
    assert "reached its 2 tokens before its structured output was complete" in chat.stderr
    # an output that is already whole when the budget ends (a number could take more digits) is no error
    number = run_cli("generate", ckpt, "--prompt", MESSAGE, "--regex", "[0-9]+", "--temperature", "0",
                     "--max-new-tokens", "3", check=True)
    assert re.fullmatch(r"[0-9]+\n", number.stdout) and "before it matched" not in number.stderr
