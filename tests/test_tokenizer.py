import json

from hypothesis import given, settings, strategies as st

from gpt2ft.tokenizer import BPETokenizer, WordTokenizer, gpt2_tokenizer, load_tokenizer, train_tokenizer


def test_gpt2_ids():
    tok = gpt2_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eos_id == 50256 and tok.vocab_size == 50257


def test_matches_transformers_gpt2_tokenizer(tmp_path):
    from transformers import GPT2TokenizerFast

    tok = gpt2_tokenizer()
    tok.save(tmp_path)
    hf = GPT2TokenizerFast.from_pretrained(tmp_path)
    for text in ["It's 3.14 o'clock—don't   panic!\n\n", "  leading spaces", "日本語 and émojis 🙂", "a\tb\r\nc"]:
        assert tok.encode(text) == hf(text)["input_ids"], text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_roundtrip_arbitrary_unicode(s):
    tok = gpt2_tokenizer()
    assert tok.decode(tok.encode(s)) == s


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=60))
def test_roundtrip_trained_bpe_with_non_identity_ids(s):
    tok = _trained_bpe()
    assert tok.decode(tok.encode(s)) == s


_cache = {}


def _trained_bpe():
    if "bpe" not in _cache:
        _cache["bpe"] = train_tokenizer(["the cat sat on the mat. " * 50, "to be or not to be " * 50], "bpe", 300)
    return _cache["bpe"]


def test_trained_bpe_saves_and_reloads(tmp_path):
    tok = _trained_bpe()
    assert 257 < tok.vocab_size <= 300  # a tiny corpus runs out of merges before 300
    assert tok.eos_id == 0  # tokenizers puts the special token first: ranks are remapped to ids
    assert len(tok.encode("the cat sat on the mat.")) < len("the cat sat on the mat.")
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode("to be or not") == tok.encode("to be or not")


def test_word_tokenizer_unk_and_eot(tmp_path):
    tok = WordTokenizer.train(["To be, or not to be: that is the question.", "To sleep\u2014perchance to dream"], 100)
    ids = tok.encode("To be, or not to wander.")
    assert tok.decode(ids) == "To be, or not to <UNK>."
    assert tok.encode("<|endoftext|>") == [tok.eos_id]
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).encode("that is the question") == tok.encode("that is the question")


def test_tokenizer_json_is_read(tmp_path):
    tok = _trained_bpe()
    merges = [f"{a} {b}" for a, b in tok.merges]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": tok.vocab, "merges": merges}}))
    assert isinstance(load_tokenizer(tmp_path), BPETokenizer)
    assert load_tokenizer(tmp_path).encode("the mat") == tok.encode("the mat")
