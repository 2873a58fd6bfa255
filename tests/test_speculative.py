"""Speculative decoding: greedy output is token for token the target's alone (model and prompt-lookup
drafts); sampled output keeps the target's distribution (Leviathan et al. 2023's rule)."""
from __future__ import annotations


import pytest
import torch

from gpt2ft.config import GPTConfig
from gpt2ft.errors import UserError
from gpt2ft.generation import complete_batch
from gpt2ft.model import GPT
from gpt2ft.sampling import SamplingConfig
from gpt2ft.speculative import speculative_complete
from gpt2ft.tokenizer import WordTokenizer


@pytest.mark.parametrize("draft_kind", ["same", "other", "ngram"])
def test_greedy_equals_the_target_alone(tiny_model, draft_kind):
    model, tok = tiny_model
    torch.manual_seed(1)
    other = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)).eval()
    draft = {"same": model, "other": other, "ngram": "ngram"}[draft_kind]
    prompt = tok.encode("to be or not to be, that is the question: to be or not to be")
    cfg = SamplingConfig(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    alone = complete_batch(model, tok, [prompt], cfg)[0]
    spec, stats = speculative_complete(model, tok, prompt, cfg, draft)
    assert spec.token_ids == alone.token_ids and spec.text == alone.text
    if draft_kind == "same":  # a perfect draft: every drafted token accepted, far fewer target forwards
        assert stats.acceptance == 1.0 and stats.target_forwards < 24 / 2


def _bf16_gpt2_width() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=12, n_embd=768, block_size=128)).to(torch.bfloat16).eval()


@torch.inference_mode()
def test_verifying_several_tokens_in_one_forward_gives_the_logits_of_one_token_a_step_in_bf16():
    """The verify forward's logits at each drafted token are bitwise those the target computes decoding one
    token a step (in bf16, SDPA over a longer masked key range rounds otherwise)."""
    model = _bf16_gpt2_width()
    gen = torch.Generator().manual_seed(2)
    rows, p, k = 4, 40, 8
    prompt, new = torch.randint(0, 50257, (rows, p), generator=gen), torch.randint(0, 50257, (rows, k), generator=gen)
    logits = []
    for together in (False, True):
        cache = model.new_cache(rows, 64)
        model(prompt, input_pos=torch.arange(p).expand(rows, -1), kv_caches=cache)
        if together:
            logits.append(model(new, input_pos=torch.arange(p, p + k).expand(rows, -1), kv_caches=cache,
                                rows_apart=True))
        else:
            logits.append(torch.stack([model(new[:, j:j + 1], input_pos=torch.full((rows, 1), p + j), kv_caches=cache,
                                             logits_at="last", rows_apart=True) for j in range(k)], dim=1))
    assert torch.equal(*logits)


@pytest.mark.parametrize("one_row_as_several", [True, False])
def test_greedy_with_a_draft_is_the_target_alone_in_bf16_at_gpt2_width(monkeypatch, one_row_as_several):
    """bf16 at GPT-2's width, drafts accepted and rejected: token for token what the target gives alone,
    whether this CPU's one-row matmul rounds as several do or not (then every step multiplies two rows)."""
    import gpt2ft.generation as g
    from gpt2ft.tokenizer import gpt2_tokenizer

    import gpt2ft.speculative as sp

    monkeypatch.setattr(g, "one_row_rounds_as_several", lambda model: one_row_as_several)
    apart = []  # each verify forward's choice: a lone row must attend token by token (what the logits test checks)
    monkeypatch.setattr(sp, "_apart", lambda live: apart.append(g._apart(live)) or apart[-1])
    model, tok = _bf16_gpt2_width(), gpt2_tokenizer()
    torch.manual_seed(1)
    draft = GPT(GPTConfig(n_layer=1, n_head=4, n_embd=128, block_size=128)).to(torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(3)
    cfg = SamplingConfig(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    for _ in range(3):
        prompt = torch.randint(0, 50257, (7,), generator=gen).tolist() * 3  # repeats: lookup drafts
        alone = complete_batch(model, tok, [prompt], cfg)[0].token_ids
        for d in ("ngram", draft):
            spec, stats = speculative_complete(model, tok, prompt, cfg, d)
            assert spec.token_ids == alone
            assert stats.proposed > 0
    assert apart and all(apart)


def test_sampling_keeps_the_target_distribution():
    """Two sampled tokens from a 12-word model: the empirical distribution of (t1, t2) over many seeded
    runs is the target's exact one, computed by enumeration, within sampling noise."""
    words = ["<|endoftext|>", "<UNK>"] + [f"w{i}" for i in range(10)]
    tok = WordTokenizer(words)
    torch.manual_seed(0)
    target = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=16, vocab_size=12)).eval()
    draft = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=16, vocab_size=12)).eval()
    with torch.no_grad():
        for m in (target, draft):
            m.lm_head.weight.mul_(40)  # peaked, different distributions: many rejections
    prompt = [2, 3]
    with torch.no_grad():
        p1 = target(torch.tensor([prompt]))[0, -1].softmax(-1)
        exact = {}
        for a in range(12):
            p2 = target(torch.tensor([prompt + [a]]))[0, -1].softmax(-1)
            for b in range(12):
                exact[(a, b)] = float(p1[a] * p2[b])
    n = 1500
    counts = dict.fromkeys(exact, 0)
    for seed in range(n):
        cfg = SamplingConfig(max_new_tokens=2, temperature=1.0, seed=seed, ignore_eos=True)
        c, _ = speculative_complete(target, tok, prompt, cfg, draft, k=2)
        counts[tuple(c.token_ids)] += 1
    tv = 0.5 * sum(abs(counts[x] / n - exact[x]) for x in exact)
    assert tv < 0.06, tv


def test_speculative_refuses_what_it_cannot_keep_exact(tiny_model):
    model, tok = tiny_model
    with pytest.raises(UserError, match="repetition_penalty"):
        speculative_complete(model, tok, [1, 2], SamplingConfig(repetition_penalty=1.3), "ngram")
    with pytest.raises(UserError, match="'ngram'"):
        speculative_complete(model, tok, [1, 2], SamplingConfig(max_new_tokens=10), "bigram")


def test_rows_left_in_high_slots_verify_by_themselves_and_as_alone(tiny_model, monkeypatch):
    """Once the rows below have finished, the verify forward feeds the rows left in high slots alone (their
    cache rows gathered), not every slot below them; their greedy tokens are still the target's alone."""
    from gpt2ft.speculative import SpeculativeEngine

    model, tok = tiny_model
    fed = []
    rows_fed = SpeculativeEngine._rows_fed
    monkeypatch.setattr(SpeculativeEngine, "_rows_fed", lambda self, live, *a: fed.append(rows_fed(self, live, *a))
                        or fed[-1])
    engine = SpeculativeEngine(model, tok, 6, "ngram")
    prompts = [tok.encode(f"to be or not to be {i}") for i in range(6)]
    cfgs = [SamplingConfig(max_new_tokens=2 if i < 5 else 20, temperature=0.0, ignore_eos=True) for i in range(6)]
    rows = [engine.add(p, cfg) for p, cfg in zip(prompts, cfgs)]
    while engine.has_work:
        engine.step()
    assert len(fed[-1][0]) <= 2 and isinstance(fed[-1][1], torch.Tensor) and 5 in fed[-1][0]
    for row, p, cfg in zip(rows, prompts, cfgs):
        assert row.token_ids == complete_batch(model, tok, [p], cfg)[0].token_ids


@pytest.mark.parametrize("draft_kind", ["other", "same", "ngram"])
def test_a_batch_with_drafts_gives_each_row_what_it_gives_alone(tiny_model, draft_kind):
    """Rows joining and leaving a speculative batch, rows that cannot speculate (logprobs) beside them: every
    greedy row equals the target alone; a seeded sampled row equals itself decoded alone with the draft (its
    generator draws only its own drafts, however many the other rows draft: with the target as its own
    draft the greedy rows' k grows past the sampled row's)."""
    from gpt2ft.speculative import SpeculativeEngine

    model, tok = tiny_model
    torch.manual_seed(1)
    draft = {"other": GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)).eval(), "same": model,
             "ngram": "ngram"}[draft_kind]
    greedy = SamplingConfig(max_new_tokens=14, temperature=0.0, ignore_eos=True)
    sampled = SamplingConfig(max_new_tokens=10, temperature=0.8, top_k=100, seed=3, ignore_eos=True)
    scored = SamplingConfig(max_new_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2)
    prompts = [tok.encode(t) for t in ("to be or not to be, to be or not", "The king", "Hello there", "a b a b a")]
    engine = SpeculativeEngine(model, tok, max_batch=3, draft=draft, draft_k=3)
    first, third = engine.add(prompts[0], greedy), engine.add(prompts[2], scored)
    engine.step()
    rows = [first, engine.add(prompts[1], sampled), third]  # joins rows whose k has grown past its own
    for _ in range(3):
        engine.step()
    rows.append(engine.add(prompts[3], greedy))  # waits for a free slot, then joins
    while engine.has_work:
        engine.step()
    for row, p, cfg in zip(rows, prompts, (greedy, None, scored, greedy)):
        if cfg is not None:
            assert row.token_ids == complete_batch(model, tok, [p], cfg)[0].token_ids
    assert rows[1].token_ids == speculative_complete(model, tok, prompts[1], sampled, draft, k=3)[0].token_ids
    assert rows[2].drafted == 0 and len(rows[2].logprobs) == 8  # logprobs: decoded without drafts
    assert sum(r.drafted for r in rows) > 0 and engine.target_forwards < sum(r.completion_tokens for r in rows)


def test_the_server_with_a_draft_answers_as_without_and_reports_acceptance(tiny_model):
    """serve --draft: the same greedy replies; usage counts the accepted and rejected drafted tokens as
    OpenAI's completion_tokens_details; a JSON-schema request (no drafts) is served beside them."""
    import json

    from fastapi.testclient import TestClient

    from gpt2ft.serve import ServeConfig, create_app, served_model
    from gpt2ft.speculative import make_engine

    model, tok = tiny_model
    config = ServeConfig(max_tokens=32)
    app = create_app([served_model("tiny", model, tok)], config,
                     lambda s: make_engine(s.model, s.tokenizer, config.max_batch, draft="ngram"))
    prompt = "one two three one two three one two"
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 20,
                                                 "temperature": 0, "n": 2, "ignore_eos": True}).json()
        j = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 20, "temperature": 0,
                                                 "guided_json": {"type": "object"}}).json()
    alone = complete_batch(model, tok, [prompt], SamplingConfig(max_new_tokens=20, temperature=0.0, ignore_eos=True))
    assert [c["text"] for c in r["choices"]] == [alone[0].text] * 2
    details = r["usage"]["completion_tokens_details"]
    assert details["accepted_prediction_tokens"] > 0 and details["rejected_prediction_tokens"] >= 0
    assert isinstance(json.loads(j["choices"][0]["text"]), dict) and "completion_tokens_details" not in j["usage"]


def test_prompt_lookup_proposes_what_followed_and_runs_on_into_a_loop():
    from gpt2ft.speculative import NgramDraft

    d = NgramDraft()
    assert d.propose([1, 2, 3, 4, 9, 1, 2], 3) == [3, 4, 9]  # what followed the latest "1 2"
    assert d.propose([7, 1, 2, 3, 1, 2], 5) == [3, 1, 2, 3, 1]  # period 3: k tokens, not 1
    assert d.propose([5, 5, 5, 5], 6) == [5] * 6
    assert d.propose([1, 2, 3], 3) == []


def test_a_model_draft_proposes_its_own_greedy_continuation_and_a_perfect_one_is_always_taken(tiny_model):
    """Every proposal of a model draft is that model's greedy continuation of the row's text alone (same
    positions, its cache rolled back after rejections); a draft equal to the target in a batch of rows has
    every drafted token accepted."""
    from gpt2ft.speculative import SpeculativeEngine

    model, tok = tiny_model
    torch.manual_seed(2)
    other = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)).eval()
    cfg = SamplingConfig(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = [tok.encode(t) for t in ("to be or not to be", "The king said", "a b a b a")]
    for draft in (other, model):
        engine = SpeculativeEngine(model, tok, max_batch=3, draft=draft, draft_k=3)
        seen, propose = [], engine.drafter.propose
        engine.drafter.propose = lambda rows: seen.append(({r[0]: list(r[1]) for r in rows}, out := propose(rows))) or out
        rows = [engine.add(p, cfg) for p in prompts]
        while engine.has_work:
            engine.step()
        for contexts, out in seen:
            for slot, (tokens, _) in out.items():
                own = complete_batch(draft, tok, [contexts[slot]], SamplingConfig(max_new_tokens=len(tokens), temperature=0.0,
                                                                       ignore_eos=True))[0]
                assert tokens == own.token_ids
        drafted = sum(r.drafted for r in rows)
        assert drafted > 0 and (draft is other or sum(r.accepted_drafts for r in rows) == drafted)
        assert all(r.token_ids == complete_batch(model, tok, [p], cfg)[0].token_ids for r, p in zip(rows, prompts))


def test_a_draft_that_is_always_rejected_stops_drafting_but_for_probes(tiny_model):
    """k falls by one per wholly rejected draft down to 0; then the row drafts one token every PROBE_EVERY
    steps: a useless draft costs a few draft forwards, not one each step."""
    from gpt2ft.speculative import PROBE_EVERY

    model, tok = tiny_model
    useless = GPT(model.config).eval()
    with torch.no_grad():
        useless.load_state_dict(model.state_dict())
        useless.transformer.ln_f.weight.neg_()  # about the target's logits negated: its picks are rejected
    cfg = SamplingConfig(max_new_tokens=48, temperature=0.0, ignore_eos=True)
    c, stats = speculative_complete(model, tok, tok.encode("to be or not to be"), cfg, useless, k=4)
    assert stats.accepted == 0 and c.token_ids == complete_batch(model, tok, [c.prompt_ids], cfg)[0].token_ids
    assert 4 + 3 + 2 + 1 <= stats.proposed <= 4 + 3 + 2 + 1 + 48 // PROBE_EVERY + 1


def test_draft_with_structured_output_names_the_kind_given_not_a_field():
    """--draft beside --regex (or any constraint): the refusal says structured output and which kind, since one
    field stands behind --json-schema, --json, --regex, --choice and --grammar; other blockers name their flag."""
    from gpt2ft.errors import OptionError
    from gpt2ft.sampling import GrammarSpec
    from gpt2ft.speculative import check_speculative

    with pytest.raises(OptionError) as e:
        check_speculative(SamplingConfig(grammar=GrammarSpec("regex", "[0-9]+")))
    said = e.value.say(lambda name: "--" + name.replace("_", "-"))
    assert said == "--draft does not combine with structured output (a regular expression here): drop one of them"
    with pytest.raises(OptionError) as e:
        check_speculative(SamplingConfig(repetition_penalty=1.2))
    assert "--repetition-penalty" in e.value.say(lambda name: "--" + name.replace("_", "-"))
    check_speculative(SamplingConfig())  # nothing in the way
