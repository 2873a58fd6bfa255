import pytest
import torch

from gpt2ft.errors import UserError
from gpt2ft.generation import (SamplingConfig, TextDecoder, apply_repetition_penalty, complete_batch, generate,
                               predict_next_token, sample_next, stream, top_k_filter, top_p_filter)
from gpt2ft.tokenizer import gpt2_tokenizer

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _ours(model, prompt_ids, n, compile=False, **sampling):
    """Token ids generated for each prompt, through the engine (batched, KV cache)."""
    cfg = SamplingConfig(max_new_tokens=n, **{**GREEDY, **sampling})
    return [c.token_ids for c in complete_batch(model, gpt2_tokenizer(), prompt_ids, cfg, compile=compile)]


@torch.no_grad()
def _without_cache(model, prompt, n):
    """The oracle: greedy decoding that reruns the whole sequence for every token."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_equals_transformers_generate_and_no_cache(hf_model, tiny_model):
    model, _ = tiny_model
    prompt = [[464, 3290, 318, 257, 922, 1110]]
    hf = hf_model.generate(torch.tensor(prompt), do_sample=False, max_new_tokens=20, min_new_tokens=20,
                           pad_token_id=50256)[0, 6:].tolist()
    assert _ours(model, prompt, 20)[0] == hf
    assert _without_cache(model, prompt[0], 20) == hf


def test_empty_prompt_generates_unconditionally_like_transformers(hf_model, tiny_model):
    """An empty prompt starts from <|endoftext|>, as transformers' generate() does without input ids."""
    model, tok = tiny_model
    hf = hf_model.generate(do_sample=False, max_new_tokens=12, min_new_tokens=12, bos_token_id=50256,
                           pad_token_id=50256)[0, 1:].tolist()
    assert _ours(model, [[]], 12)[0] == hf
    c = complete_batch(model, tok, [""], SamplingConfig(max_new_tokens=12, **GREEDY))[0]
    assert c.token_ids == hf and c.text == tok.decode(hf)


def test_static_cache_path_equals_dynamic(tiny_model, monkeypatch):
    model, _ = tiny_model
    prompts = [[1, 2, 3, 4, 5], [9, 8]]
    expected = [_without_cache(model, p, 12) for p in prompts]
    assert _ours(model, prompts, 12) == expected
    import gpt2ft.generation as g
    monkeypatch.setattr(g, "compiled_decode", lambda device: g._decode_static)  # the compiled step, run eagerly
    assert _ours(model, prompts, 12, compile=True) == expected
    tok = gpt2_tokenizer()  # every entry point takes compile=, as Engine does
    texts = [tok.decode(e) for e in expected]
    assert g.generate(model, tok, prompts, compile=True, max_new_tokens=12, **GREEDY) == texts
    assert "".join(g.stream(model, tok, prompts[0], compile=True, max_new_tokens=12, **GREEDY)) == texts[0]


def test_compiled_step_compiles_once_for_every_cache_length_and_row_and_equals_eager(tiny_model, monkeypatch):
    """--compile's step traced by dynamo with its "eager" backend (the graphs inductor compiles; inductor
    itself in test_compiled_greedy_is_eager_greedy_in_bf16_at_gpt2_width): one graph for the whole step, no
    graph break; once rows join and leave and the cache grows, a new engine with other prompts and lengths
    compiles nothing again; every greedy token equals eager decoding."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import gpt2ft.generation as g

    model, tok = tiny_model
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setitem(g._COMPILED, "cpu", torch.compile(g._decode_static, backend="eager"))
    monkeypatch.setattr(g, "_WARM", set())
    short, long = (SamplingConfig(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in (6, 30))
    prompts = ["Hello", "The king", "x y z"]
    reports = []
    batch = g.Engine(model, tok, max_batch=2, compile=True, log=reports.append)
    rows = [batch.add(tok.encode(p), short) for p in prompts]  # the third joins when a slot frees
    for _ in range(3):
        batch.step()
    grown = batch.add(tok.encode("Once upon a time"), long)  # joins late; the cache grows for it
    while batch.has_work:
        batch.step()
    again = complete_batch(model, tok, prompts, short, batch_size=2, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs <= 3  # a graph per row count (1 or more) and cache length (the first, then any)
    assert not counters["graph_break"]  # the whole step one graph (one CUDA graph on a GPU)
    for row, p, other in zip(rows, prompts, again):
        assert row.token_ids == other.token_ids == complete_batch(model, tok, [p], short)[0].token_ids
    assert grown.token_ids == complete_batch(model, tok, [grown.prompt_ids], long)[0].token_ids
    later = complete_batch(model, tok, ["Another prompt, longer than the others were", "b"], long, batch_size=2,
                           compile=True)
    assert counters["stats"]["unique_graphs"] == graphs
    assert [c.token_ids for c in later] == [c.token_ids for c in complete_batch(model, tok, [c.prompt_ids for c in later], long)]
    assert batch.compile_seconds is not None and sum("compiled the decode step" in r for r in reports) == 1


def test_compiled_greedy_is_eager_greedy_in_bf16_at_gpt2_width(monkeypatch):
    """Inductor's real C++ step against eager in bf16, where rounding differs with every fused op, matmul
    row count and key count: at GPT-2's width (two blocks), alone and in a batch whose rows join and
    leave, greedy tokens are eager's; a seeded sampled row gives its tokens alone."""
    import torch._dynamo

    import gpt2ft.generation as g
    from gpt2ft.model import GPT, GPTConfig

    torch._dynamo.reset()
    monkeypatch.setattr(g, "_COMPILED", {})
    monkeypatch.setattr(g, "_WARM", set())
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=12, n_embd=768, block_size=128)).to(torch.bfloat16).eval()
    tok = gpt2_tokenizer()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 50257, (n,), generator=gen).tolist() for n in (7, 19, 3, 30, 12)]
    cfg = SamplingConfig(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    for batch_size in (1, 3):
        compiled = complete_batch(model, tok, prompts, cfg, batch_size=batch_size, compile=True)
        eager = complete_batch(model, tok, prompts, cfg, batch_size=batch_size)
        assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]
    seeded = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=3, ignore_eos=True)
    alone = complete_batch(model, tok, prompts[:1], seeded)[0].token_ids
    assert complete_batch(model, tok, prompts[:3], seeded, batch_size=3, compile=True)[0].token_ids == alone


def test_compile_says_once_when_a_lone_row_decodes_eagerly(tiny_model, monkeypatch):
    """--compile with one row on a CPU (generate, chat) runs eager's exact step: the engine says so once,
    never silently, and compiles nothing; with two rows it compiles and says nothing of the kind."""
    import torch._dynamo

    import gpt2ft.generation as g

    model, tok = tiny_model
    torch._dynamo.reset()
    monkeypatch.setitem(g._COMPILED, "cpu", torch.compile(g._decode_static, backend="eager"))
    monkeypatch.setattr(g, "_WARM", set())
    cfg = SamplingConfig(max_new_tokens=5, **GREEDY)
    said = []
    engine = g.Engine(model, tok, max_batch=1, compile=True, log=said.append)
    for prompt in ("Hello", "Once"):
        engine.add(tok.encode(prompt), cfg)
        while engine.has_work:
            engine.step()
    assert len(said) == 1 and "changes nothing for one row (generate, chat)" in said[0] and engine.compile_seconds is None
    said.clear()
    pair = g.Engine(model, tok, max_batch=2, compile=True, log=said.append)
    rows = [pair.add(tok.encode(p), SamplingConfig(max_new_tokens=n, **GREEDY)) for p, n in (("Hi", 5), ("Yo", 5))]
    pair.step()
    assert pair.compile_seconds is not None and not any("eager" in line for line in said)
    while pair.has_work:
        pair.step()
    assert all(len(r.token_ids) == 5 for r in rows)


def test_compile_without_a_cpp_compiler_is_one_clear_error(tiny_model, monkeypatch):
    import torch._inductor.cpp_builder as builder

    from gpt2ft.generation import Engine

    def missing():
        raise RuntimeError("No working C++ compiler found in\ntorch._inductor.config.cpp.cxx: (None, 'g++')")

    monkeypatch.setattr(builder, "get_cpp_compiler", missing)
    with pytest.raises(UserError, match="^compile needs a C\\+\\+ compiler on this CPU .*install g\\+\\+ or drop compile"):
        Engine(tiny_model.model, tiny_model.tokenizer, compile=True)


def test_batched_prompts_of_different_lengths_equal_one_by_one(tiny_model):
    model, _ = tiny_model
    prompts = [[464, 3290, 318], [40, 1842, 257, 922, 1110, 284, 11], [101]]
    batched = _ours(model, prompts, 15)
    for row, p in zip(batched, prompts):
        assert row == _ours(model, [p], 15)[0]


def test_batched_sampling_with_repetition_penalty_matches_one_by_one(tiny_model):
    model, _ = tiny_model
    prompts = [[464, 3290, 318], [40, 1842, 257, 922, 1110]]
    batched = _ours(model, prompts, 10, repetition_penalty=1.5)
    assert batched[1] == _ours(model, [prompts[1]], 10, repetition_penalty=1.5)[0]


def test_repetition_penalty_matches_transformers(hf_model, tiny_model):
    model, _ = tiny_model
    prompt = [[464, 3290, 318, 257, 922, 1110]]
    hf = hf_model.generate(torch.tensor(prompt), do_sample=False, max_new_tokens=12, min_new_tokens=12,
                           repetition_penalty=1.3, pad_token_id=50256)[0, 6:].tolist()
    assert _ours(model, prompt, 12, repetition_penalty=1.3)[0] == hf


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = top_k_filter(logits, 2)
    assert torch.isfinite(out).tolist() == [[False, True, False, True, False]]
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()
    assert kept(0.5) == [True, False, False, False, False]  # 0.5 alone reaches 0.5
    assert kept(0.51) == [True, True, False, False, False]
    assert kept(0.85) == [True, True, True, False, False]  # 0.5 + 0.2 + 0.15 = 0.85
    assert kept(0.86) == [True, True, True, True, False]
    assert kept(0.01) == [True, False, False, False, False]  # never empty


def test_temperature_scales_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    cfg = SamplingConfig(temperature=0.5)
    draws = torch.stack([sample_next(logits, cfg, gen) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=3).float() / 4000
    expected = (logits / 0.5).softmax(-1)[0]
    assert (freq - expected).abs().max() < 0.03
    assert sample_next(logits, SamplingConfig(temperature=0)).item() == 0


def test_draw_is_the_inverse_cdf_by_hand():
    from gpt2ft.completion import draw

    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3]] * 6)  # cdf 0.2, 0.2, 0.7, 1.0
    uniforms = torch.tensor([0.0, 0.1, 0.2, 0.69, 0.7, 0.999])
    assert draw(probs, uniforms).tolist() == [0, 0, 2, 2, 3, 3]  # the zero-probability token never
    assert draw(probs[:1] * 4, torch.tensor([0.5])).tolist() == [2]  # unnormalised: u times the total


def test_repetition_penalty_on_hand_made_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]


def test_sampling_is_seeded(tiny_model):
    model, tok = tiny_model
    a = generate(model, tok, "Hello", max_new_tokens=8, temperature=1.0, top_k=50, seed=3, ignore_eos=True)
    b = generate(model, tok, "Hello", max_new_tokens=8, temperature=1.0, top_k=50, seed=3, ignore_eos=True)
    c = generate(model, tok, "Hello", max_new_tokens=8, temperature=1.0, top_k=50, seed=4, ignore_eos=True)
    assert a == b and a != c


def test_stop_strings_cut_output_and_stream_equals_whole(tiny_model):
    model, tok = tiny_model
    cfg = SamplingConfig(max_new_tokens=30, temperature=0.0, ignore_eos=True)
    full = stream(model, tok, "The", cfg)
    list(full)
    stop = full.text[5:8]
    assert len(stop) == 3
    cut = stream(model, tok, "The", max_new_tokens=30, temperature=0.0, stop=[stop])
    pieces = list(cut)
    assert "".join(pieces) == cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert generate(model, tok, "The", max_new_tokens=30, temperature=0.0, stop=[stop]) == cut.text


def test_text_decoder_never_splits_utf8():
    tok = gpt2_tokenizer()
    text = "naïve café 日本語 🙂🙃 done"
    dec = TextDecoder(tok)
    pieces = [dec.push(i) for i in tok.encode(text)] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert any(p == "" for p in pieces)  # some tokens held half a character


def test_context_overflow_is_a_clear_error(tiny_model):
    model, tok = tiny_model
    with pytest.raises(UserError, match="exceed the model's context of 64; lower max_new_tokens to 54"):
        generate(model, tok, [list(range(10))], max_new_tokens=60)
    with pytest.raises(UserError, match="shorten the prompt"):
        generate(model, tok, [list(range(64))], max_new_tokens=1)


def test_bad_sampling_values_are_rejected():
    for bad in (dict(temperature=float("nan")), dict(top_p=0.0), dict(top_k=-2), dict(max_new_tokens=0),
                dict(repetition_penalty=0), dict(presence_penalty=2.5), dict(frequency_penalty=float("nan")),
                dict(logprobs=-1), dict(logprobs=1.5)):
        with pytest.raises(UserError):
            SamplingConfig(**bad)


def test_predict_next_token(tiny_model, hf_model):
    model, tok = tiny_model
    top = predict_next_token(model, tok, "Hello world", k=3)
    probs = hf_model(torch.tensor([[15496, 995]])).logits[0, -1].softmax(-1)
    best = torch.topk(probs, 3)
    assert [p for _, p in top] == pytest.approx(best.values.tolist(), abs=1e-5)
    assert [t for t, _ in top] == [tok.decode([i]) for i in best.indices.tolist()]


def test_extreme_sampling_values_stay_finite():
    """Found by fuzzing the server: a denormal temperature or top_p must not turn logits into NaN."""
    logits = torch.tensor([[3.0, 1.0, -2.0, 0.5]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, SamplingConfig(temperature=1e-30), g).tolist() == [0]
    assert sample_next(logits, SamplingConfig(temperature=1.0, top_p=1e-45), g).tolist() == [0]
    with pytest.raises(UserError, match="repetition_penalty"):
        SamplingConfig(repetition_penalty=5e-324)


def test_generate_takes_one_prompt_as_token_ids(tiny_model):
    """A flat list of ints is one prompt of token ids (as the docstring says), not a list of prompts."""
    from gpt2ft.generation import generate

    model, tok = tiny_model
    ids = tok.encode("Hello world")
    assert generate(model, tok, ids, max_new_tokens=4, temperature=0) == \
        generate(model, tok, "Hello world", max_new_tokens=4, temperature=0)
    assert generate(model, tok, [ids, "Hello world"], max_new_tokens=4, temperature=0)[0] == \
        generate(model, tok, "Hello world", max_new_tokens=4, temperature=0)



def test_sampling_options_may_come_as_a_dict(tiny_model):
    from gpt2ft.generation import generate

    model, tok = tiny_model
    assert generate(model, tok, "Hi", {"max_new_tokens": 3, "temperature": 0}) == \
        generate(model, tok, "Hi", max_new_tokens=3, temperature=0)
