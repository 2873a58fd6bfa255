"""The exported HF folder is complete: the real context as model_max_length, a Jinja chat_template that
makes transformers' apply_chat_template give exactly our tokens, eos/pad ids, a model card."""
from __future__ import annotations

import json

import pytest

from gpt2ft.templates import TEMPLATES

CONVERSATIONS = [
    [{"role": "system", "content": "You answer in one line."}, {"role": "user", "content": "Who wrote Hamlet?"},
     {"role": "assistant", "content": "Shakespeare did."}, {"role": "user", "content": "And Macbeth, when?"}],
    [{"role": "user", "content": "Name a comedy."}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello, friend."}, {"role": "user", "content": "What is Puck?"},
     {"role": "assistant", "content": "A sprite."}, {"role": "user", "content": "Thanks"}],
]


@pytest.mark.parametrize("name", ["chat", "alpaca", "plain"])
def test_exported_folder_renders_our_tokens_and_knows_its_context(tiny_model, tmp_path, name):
    from transformers import AutoTokenizer

    from conftest import run_cli
    from gpt2ft.checkpoint import save_model
    from gpt2ft.data.sft import prompt_ids

    model, tok = tiny_model
    template = TEMPLATES[name]
    ckpt = save_model(tmp_path / "ckpt", model, tok, {"objective": "sft", "template": template.to_dict()})
    run_cli("export", ckpt, "--out", tmp_path / "hf", check=True)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.model_max_length == model.config.block_size == 64
    for conversation in CONVERSATIONS:
        if template.kind == "instruction":
            conversation = [m for m in conversation if m["role"] != "system"] or conversation
        ours = prompt_ids(conversation, template, tok)
        theirs = hf_tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert theirs == ours, (hf_tok.decode(theirs), tok.decode(ours))
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == generation["pad_token_id"] == tok.eos_id
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "apply_chat_template" in card and "context 64" in card and f"`{name}`" in card
    # gpt2ft loading the export again keeps the template it was tuned with (chat, serve, eval, sft, dpo pick it)
    from gpt2ft.checkpoint import load

    assert load(tmp_path / "hf").template == template
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    del config["gpt2ft_template"]  # a folder that only has the Jinja: one of our built-in templates' is known
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(config))
    assert load(tmp_path / "hf").template == template
