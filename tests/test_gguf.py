"""GGUF export: the file loads in transformers (gguf_file=) with our logits, its chat template renders
our tokens, and a word-level tokenizer is refused."""
from __future__ import annotations

import pytest
import torch

from gpt2ft.errors import UserError
from gpt2ft.templates import TEMPLATES

pytest.importorskip("gguf")

TOL = {"f32": 1e-4, "f16": 5e-2, "bf16": 2e-1, "q8_0": 2e-1}


@pytest.fixture(scope="module")
def ids():
    return torch.tensor([[464, 3290, 318, 257, 922, 1110, 11, 290, 340]])


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_loads_in_transformers_with_our_logits(tiny_model, tmp_path, ids, outtype):
    from transformers import AutoModelForCausalLM

    from gpt2ft.gguf_file import write_gguf

    model, tok = tiny_model
    write_gguf(tmp_path / "m.gguf", model, tok, TEMPLATES["chat"], outtype=outtype)
    # transformers reads gpt2.context_length into n_ctx, not n_positions: a context other than 1024 is named
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", n_positions=model.config.block_size).eval()
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert theirs.shape == ours.shape
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOL[outtype], diff
    if outtype == "f32":  # the same greedy continuation
        assert ours[0].argmax(-1).tolist() == theirs[0].argmax(-1).tolist()


def test_gguf_tokenizer_and_chat_template_match_ours(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from gpt2ft.data.sft import prompt_ids
    from gpt2ft.gguf_file import write_gguf

    model, tok = tiny_model
    template = TEMPLATES["chat"]
    write_gguf(tmp_path / "m.gguf", model, tok, template)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "Hello world, what's the plot of Macbeth? Ünïcödé 🎭"
    assert hf_tok.encode(text) == tok.encode(text)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who is Lear?"},
                {"role": "assistant", "content": "A king."}, {"role": "user", "content": "And Hamlet?"}]
    hf_ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert hf_ids == prompt_ids(messages, template, tok)


def test_word_level_tokenizer_is_refused(tiny_model, tmp_path):
    from gpt2ft.gguf_file import write_gguf
    from gpt2ft.tokenizer import WordTokenizer

    model, _ = tiny_model
    words = WordTokenizer.train(["to be or not to be"], vocab_size=20)
    with pytest.raises(UserError, match="byte-level BPE"):
        write_gguf(tmp_path / "m.gguf", model, words)
    assert not (tmp_path / "m.gguf").exists()
