"""The completion engine: per-row cache positions, stops across token boundaries, finish_reason and
usage per row, rows joining and leaving a running batch, seeds, cancel, penalties, logprobs, and
the chat Session's kept cache."""
import pytest
import torch

from gpt2ft.errors import UserError
from gpt2ft.generation import (Completion, Engine, SamplingConfig, Session, apply_presence_frequency_penalty,
                               complete_batch, stream)
from gpt2ft.tokenizer import Tokenizer

GREEDY = dict(temperature=0.0, ignore_eos=True)


@torch.no_grad()
def _reference(model, prompt, n, penalty=None):
    """Greedy decoding that reruns the whole sequence per token; returns (tokens, raw logits per step).
    penalty(logits, generated) may change the logits before the argmax."""
    ids, logits_seen = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1]
        logits_seen.append(logits)
        chosen = penalty(logits, ids[len(prompt):]) if penalty else logits
        ids.append(int(chosen.argmax()))
    return ids[len(prompt):], logits_seen


def _drain(engine):
    while engine.has_work:
        engine.step()


# ----- the model's per-row cache positions --------------------------------------------------------
def _decode_two_rows(model):
    """Prefill two rows into their own cache rows, decode both together at different positions: the step's
    logits and, for each row, the logits of the same tokens without a cache."""
    a, b = [5, 6, 7, 8, 9, 10, 11], [20, 21, 22]
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        for row, ids in enumerate((a, b)):
            model(torch.tensor([ids]), input_pos=torch.arange(len(ids))[None], kv_caches=cache,
                  cache_rows=slice(row, row + 1))
        step = model(torch.tensor([[12], [23]]), input_pos=torch.tensor([[len(a)], [len(b)]]), kv_caches=cache,
                     logits_at="last")
        return cache, step, [model(torch.tensor([ids]))[0, -1] for ids in (a + [12], b + [23])]


def test_per_row_cache_positions_equal_no_cache(tiny_model):
    model = tiny_model.model
    cache, step, full = _decode_two_rows(model)
    for row in range(2):
        assert (step[row] - full[row]).abs().max() < 1e-5
    with torch.no_grad():  # the compiled step's static-shape path writes the same cache slots
        static = model(torch.tensor([[12], [23]]), input_pos=torch.tensor([[7], [3]]), kv_caches=cache,
                       static_cache=True, logits_at="last")
    assert (static - step).abs().max() < 1e-5


@pytest.mark.parametrize("kernel", [True, False])
def test_bf16_model_with_its_cache_on_cpu_follows_no_cache(tiny_model, monkeypatch, kernel):
    """A bf16 model decodes on a CPU with a bf16 cache read by gpt2ft's attention kernel, or where that kernel
    is missing with a float32 cache and torch's (per-row slots written by index_put): the same next-token
    logits as the bf16 model without a cache, up to bf16 rounding."""
    import copy

    import gpt2ft.model as m

    if kernel and m.decode_attention() is None:
        pytest.skip("no C compiler here")
    if not kernel:
        monkeypatch.setattr(m, "decode_attention", lambda: None)
    cache, step, full = _decode_two_rows(copy.deepcopy(tiny_model.model).bfloat16())
    assert cache[0].k.dtype == (torch.bfloat16 if kernel else torch.float32) and step.dtype == torch.bfloat16
    for row in range(2):
        assert (step[row].float() - full[row].float()).abs().max() < 0.05 * full[row].float().abs().max()


def test_rows_prefilled_together_into_scattered_cache_rows(tiny_model):
    model, _ = tiny_model
    a, b = [5, 6, 7, 8, 9, 10, 11], [20, 21, 22]
    cache = model.new_cache(3, 16)
    pad = [0] * (len(a) - len(b))
    positions = torch.tensor([list(range(len(a))), list(range(len(a)))])  # b's padding writes past its prompt
    last = torch.zeros(2, len(a), dtype=torch.bool)
    last[0, -1], last[1, len(b) - 1] = True, True
    with torch.no_grad():
        logits = model(torch.tensor([a, b + pad]), input_pos=positions, kv_caches=cache,
                       cache_rows=torch.tensor([2, 0]), logits_at=last)
        step = model(torch.tensor([[23], [0], [12]]), input_pos=torch.tensor([[len(b)], [0], [len(a)]]),
                     kv_caches=cache, logits_at="last")  # rows 0..2 of the cache; row 1 is empty
        for got, ids in ((logits[0], a), (logits[1], b), (step[2], a + [12]), (step[0], b + [23])):
            assert (got - model(torch.tensor([ids]))[0, -1]).abs().max() < 1e-5


# ----- Completion: text, stops, hold-back ------------------------------------------------------------
class Pieces(Tokenizer):
    """A hand-made tokenizer: token i is pieces[i] (bytes); the last id is EOS."""

    kind = "pieces"

    def __init__(self, pieces):
        self.pieces = [p.encode() if isinstance(p, str) else p for p in pieces] + [b""]
        self.eos_id = self.vocab_size = len(self.pieces) - 1

    def decode_bytes(self, ids):
        return b"".join(self.pieces[i] for i in ids)


def _push_all(tok, ids, **sampling):
    c = Completion([0], SamplingConfig(**{"max_new_tokens": 50, **sampling}), tok)
    pieces = []
    for i in ids:
        pieces.append(c.push(i))
        if c.finished:
            break
    return c, pieces


def test_stop_string_split_across_tokens_is_never_streamed():
    tok = Pieces(["Hello", " #", "#", "#E", "N", "D!", " more"])
    c, pieces = _push_all(tok, [0, 1, 2, 3, 4, 5, 6], stop=["###END"])
    assert c.text == "".join(pieces) == "Hello "
    assert not any("#" in p for p in pieces)  # nothing of the stop string was ever released
    assert (c.finish_reason, c.stop_reason, c.completion_tokens) == ("stop", "###END", 6)
    assert c.token_ids == [0, 1, 2, 3, 4, 5]


def test_held_back_text_is_released_once_it_cannot_be_a_stop():
    tok = Pieces(["a#", "#", "b", "é"[:1], "x"])
    c, pieces = _push_all(tok, [0, 1, 2], stop=["##x"], max_new_tokens=3)
    assert pieces == ["a", "", "##b"]  # "#" then "##" held: each could begin "##x"
    assert (c.text, c.finish_reason, c.stop_reason) == ("a##b", "length", None)


def test_multibyte_character_split_across_tokens_and_eos():
    e_acute = "é".encode()
    tok = Pieces(["caf", e_acute[:1], e_acute[1:], "!"])
    c, pieces = _push_all(tok, [0, 1, 2, 3, tok.eos_id, 0])
    assert pieces == ["caf", "", "é", "!", ""]
    assert (c.text, c.finish_reason, c.stop_reason, c.completion_tokens) == ("café!", "stop", tok.eos_id, 5)


def test_word_level_tokenizer_keeps_its_spaces():
    from gpt2ft.tokenizer import WordTokenizer

    tok = WordTokenizer(["<|endoftext|>", WordTokenizer.UNK, "to", "be", ",", "or", "not"])
    ids = tok.encode("to be, or not to be")
    c, pieces = _push_all(tok, ids, ignore_eos=True, max_new_tokens=len(ids))
    assert c.text == tok.decode(ids) == "to be, or not to be"


# ----- the engine: batched finish reasons, usage, late joins, seeds, cancel -----------------------------
class EosAt:
    """A tokenizer wrapper whose EOS is a chosen token (so a tiny random model can end at EOS)."""

    def __init__(self, tok, eos_id):
        self.tok, self.eos_id = tok, eos_id

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_finish_reason_and_usage_per_row_in_a_batch(tiny_model):
    model, tok = tiny_model
    prompts = [tok.encode("The king"), tok.encode("Once upon a time"), tok.encode("Hello")]
    refs = [_reference(model, p, 12)[0] for p in prompts]
    eos = refs[0][4]  # row 0 ends at EOS: its 5th token, whatever it is, is made the EOS
    stop_text = tok.decode(refs[1])
    stop = stop_text[len(tok.decode(refs[1][:3])):][:3]  # row 1 ends at a stop string within its 4th+ tokens
    engine = Engine(model, EosAt(tok, eos), max_batch=3)
    rows = [engine.add(prompts[0], SamplingConfig(max_new_tokens=12, temperature=0.0)),
            engine.add(prompts[1], SamplingConfig(max_new_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop])),
            engine.add(prompts[2], SamplingConfig(max_new_tokens=7, **GREEDY))]
    _drain(engine)
    first_eos = refs[0].index(eos)
    assert (rows[0].finish_reason, rows[0].stop_reason) == ("stop", eos)
    assert rows[0].token_ids == refs[0][:first_eos + 1] and rows[0].text == tok.decode(refs[0][:first_eos])
    assert (rows[1].finish_reason, rows[1].stop_reason) == ("stop", stop)
    assert rows[1].text == stop_text[:stop_text.find(stop)]
    assert (rows[2].finish_reason, rows[2].stop_reason, rows[2].token_ids) == ("length", None, refs[2][:7])
    for c, p in zip(rows, prompts):
        assert c.usage == {"prompt_tokens": len(p), "completion_tokens": len(c.token_ids),
                           "total_tokens": len(p) + len(c.token_ids)}
    assert rows[2].completion_tokens == 7


def test_complete_batch_refills_slots_and_matches_alone(tiny_model):
    model, tok = tiny_model
    prompts = ["a", "The quick brown fox", "b c", "Hello world", "x"]
    cfg = SamplingConfig(max_new_tokens=6, **GREEDY)
    batched = complete_batch(model, tok, prompts, cfg, batch_size=2)
    for c, p in zip(batched, prompts):
        assert c.token_ids == _reference(model, tok.encode(p), 6)[0]
        assert c.finish_reason == "length" and c.text == tok.decode(c.token_ids)


def test_rows_joining_a_running_batch_late_equal_running_alone(tiny_model):
    model, tok = tiny_model
    a, b, c = tok.encode("The king"), tok.encode("Once upon a time there"), tok.encode("Hi")
    engine = Engine(model, tok, max_batch=2)
    row_a = engine.add(a, SamplingConfig(max_new_tokens=4, **GREEDY))
    row_b = engine.add(b, SamplingConfig(max_new_tokens=14, **GREEDY))
    for _ in range(6):  # a ends after 4 steps; its slot (0) then gets dummy writes while b runs on
        engine.step()
    later = engine.add(a + row_a.token_ids[:3] + c, SamplingConfig(max_new_tokens=5, **GREEDY))
    _drain(engine)
    assert row_a.token_ids == _reference(model, a, 4)[0]
    assert row_b.token_ids == _reference(model, b, 14)[0]
    assert later.token_ids == _reference(model, later.prompt_ids, 5)[0]
    assert later.cached_tokens == len(a) + 3  # slot 0 kept row a's prompt and fed tokens


def test_rows_left_in_high_slots_decode_alone_and_as_alone(tiny_model, monkeypatch):
    """Once the rows below have finished, the rows left in high slots are fed by themselves (their cache
    rows gathered), not with every slot below them, and still decode as alone; rows then join again."""
    import gpt2ft.generation as g

    model, tok = tiny_model
    fed = []
    decode = g._decode
    monkeypatch.setattr(g, "_decode", lambda m, x, *a, **k: fed.append(len(x)) or decode(m, x, *a, **k))
    engine = Engine(model, tok, max_batch=8)
    prompts = [tok.encode(f"row {i} says") for i in range(8)]
    rows = [engine.add(p, SamplingConfig(max_new_tokens=3 if i < 6 else 16, **GREEDY)) for i, p in enumerate(prompts)]
    for _ in range(6):
        engine.step()
    assert fed[-1] == 2  # slots 6 and 7 alone, not rows [0, 8)
    late = engine.add(tok.encode("and then"), SamplingConfig(max_new_tokens=6, **GREEDY))
    _drain(engine)
    for i, row in enumerate(rows):
        assert row.token_ids == _reference(model, prompts[i], len(row.token_ids))[0]
    assert late.token_ids == _reference(model, late.prompt_ids, 6)[0]


def test_same_seed_same_text_whatever_the_batch(tiny_model):
    model, tok = tiny_model
    prompt = tok.encode("The meaning of life")
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=100, top_p=0.95, seed=7, ignore_eos=True)
    alone = complete_batch(model, tok, [prompt], cfg)[0].token_ids
    engine = Engine(model, tok, max_batch=3)
    engine.add(tok.encode("Other text here"), SamplingConfig(max_new_tokens=20, temperature=1.0, seed=1))
    engine.step()
    engine.step()
    with_others = engine.add(prompt, cfg)
    engine.add(tok.encode("x"), SamplingConfig(max_new_tokens=3, **GREEDY))
    _drain(engine)
    assert with_others.token_ids == alone
    other_seed = complete_batch(model, tok, [prompt], SamplingConfig(**{**cfg.__dict__, "seed": 8}))[0]
    assert other_seed.token_ids != alone


def test_rows_sharing_settings_are_drawn_together_as_alone(tiny_model):
    """Rows with the same temperature, top-k and top-p are filtered and drawn in one op (sample_rows), each
    with its own generator: every seeded row gives the tokens it gives alone, greedy rows beside them too."""
    model, tok = tiny_model
    prompts = [tok.encode(t) for t in ("The king", "Once upon a time", "Hello", "A")]
    settings = [SamplingConfig(max_new_tokens=10, temperature=0.9, top_k=200, top_p=0.9, seed=s, ignore_eos=True)
                for s in (1, 2, 3)] + [SamplingConfig(max_new_tokens=10, **GREEDY)]
    engine = Engine(model, tok, max_batch=4)
    rows = [engine.add(p, cfg) for p, cfg in zip(prompts, settings)]
    _drain(engine)
    for row, p, cfg in zip(rows, prompts, settings):
        assert row.token_ids == complete_batch(model, tok, [p], cfg)[0].token_ids
    assert rows[3].token_ids == _reference(model, prompts[3], 10)[0]
    assert len({tuple(r.token_ids) for r in rows[:3]}) == 3


def test_cancel_frees_the_slot(tiny_model):
    model, tok = tiny_model
    engine = Engine(model, tok, max_batch=1)
    first = engine.add(tok.encode("one"), SamplingConfig(max_new_tokens=30, **GREEDY))
    queued = engine.add(tok.encode("two"), SamplingConfig(max_new_tokens=3, **GREEDY))
    never = engine.add(tok.encode("three"), SamplingConfig(max_new_tokens=3, **GREEDY))
    engine.step()
    engine.step()
    assert engine.active == 1 and not queued.token_ids
    engine.cancel(first)
    engine.cancel(never)  # cancelled while waiting: never runs
    out = engine.step()
    assert [c for c, _ in out] == [queued]
    assert first.finish_reason == "cancelled" and first.completion_tokens == 2
    _drain(engine)
    assert queued.finish_reason == "length" and never.finish_reason == "cancelled" and not never.token_ids
    assert not engine.has_work


# ----- penalties and logprobs --------------------------------------------------------------------------
def test_presence_and_frequency_penalty_hand_computed():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    counts = torch.tensor([[0, 1, 3, 0]])
    out = apply_presence_frequency_penalty(logits, counts, presence=0.5, frequency=0.25)
    assert out.tolist() == [[1.0, 2.0 - 0.5 - 0.25, 3.0 - 0.5 - 0.75, 0.5]]


def test_penalties_in_the_engine_equal_a_hand_applied_reference(tiny_model):
    model, tok = tiny_model
    prompt = tok.encode("The the the the")

    def openai_penalty(logits, generated):
        logits = logits.clone()
        for t in set(generated):
            logits[t] -= 0.8 + 0.3 * generated.count(t)
        return logits

    expected = _reference(model, prompt, 15, openai_penalty)[0]
    got = complete_batch(model, tok, [prompt], SamplingConfig(max_new_tokens=15, presence_penalty=0.8,
                                                              frequency_penalty=0.3, **GREEDY))[0].token_ids
    assert got == expected
    assert got != _reference(model, prompt, 15)[0]  # the penalty changed something


def test_logprobs_equal_log_softmax_of_the_model_logits(tiny_model):
    model, tok = tiny_model
    prompt = tok.encode("Hello there")
    tokens, logits = _reference(model, prompt, 6)
    c = complete_batch(model, tok, [prompt], SamplingConfig(max_new_tokens=6, logprobs=3, **GREEDY))[0]
    assert [lp.token_id for lp in c.logprobs] == c.token_ids == tokens
    for lp, raw in zip(c.logprobs, logits):
        expected = raw.log_softmax(-1)
        top = expected.topk(3)
        assert lp.logprob == pytest.approx(float(expected[lp.token_id]), abs=1e-5)
        assert [i for i, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-5)
    # sampled at a temperature, the log-probs are still those of the raw logits; 0 means chosen only
    sampled = complete_batch(model, tok, [prompt], SamplingConfig(max_new_tokens=1, temperature=0.5, seed=0,
                                                                  logprobs=0, ignore_eos=True))[0]
    (lp,) = sampled.logprobs
    assert lp.top == [] and lp.logprob == pytest.approx(float(logits[0].log_softmax(-1)[lp.token_id]), abs=1e-5)


# ----- streams and the chat session ----------------------------------------------------------------------
def test_stream_iterated_twice_replays_without_generating(tiny_model):
    model, tok = tiny_model
    s = stream(model, tok, "The", max_new_tokens=10, **GREEDY)
    first = list(s)
    tokens = list(s.completion.token_ids)
    assert list(s) == first and "".join(first) == s.text
    assert s.completion.token_ids == tokens and s.completion_tokens == 10 and s.finish_reason == "length"
    assert s.prompt_tokens == len(tok.encode("The"))


def test_leaving_a_stream_early_cancels_it(tiny_model):
    model, tok = tiny_model
    s = stream(model, tok, "The", max_new_tokens=20, **GREEDY)
    shown = []
    for piece in s:
        shown.append(piece)
        if len(shown) == 3:
            break
    assert s.finish_reason == "cancelled" and s.text == "".join(shown) and list(s) == shown


def test_session_kept_cache_equals_fresh_prefill_over_three_turns(tiny_model):
    model, tok = tiny_model
    session = Session(model, tok)
    history = tok.encode("A chat.\nUser: hello\nBot:")
    cfg = SamplingConfig(max_new_tokens=6, **GREEDY)
    for turn, user in enumerate(["\nUser: how are you\nBot:", "\nUser: bye\nBot:", None]):
        reply = session.complete(history, cfg)
        text = "".join(reply)
        fresh = stream(model, tok, history, cfg)
        assert "".join(fresh) == text and reply.completion.token_ids == fresh.completion.token_ids
        assert reply.completion.token_ids == _reference(model, history, 6)[0]
        if turn:
            assert reply.completion.cached_tokens == previous  # only the new tokens were prefilled
        if user is None:
            break
        previous = len(history) + len(reply.completion.token_ids) - 1  # the last token was never fed
        history = history + reply.completion.token_ids + tok.encode(user)
    # an edited history reuses only the part before the edit
    edited = history[:3] + tok.encode(" changed") + history[3:]
    reply = session.complete(edited, cfg)
    list(reply)
    assert reply.completion.cached_tokens == 3
    assert reply.completion.token_ids == _reference(model, edited, 6)[0]


def test_a_turn_interrupted_mid_reply_leaves_the_session_usable(tiny_model):
    model, tok = tiny_model
    session = Session(model, tok)
    prompt = tok.encode("Once upon a time")
    cfg = SamplingConfig(max_new_tokens=10, **GREEDY)
    reply = session.complete(prompt, cfg)
    with pytest.raises(KeyboardInterrupt):
        for i, _ in enumerate(reply):
            if i == 2:
                raise KeyboardInterrupt  # Ctrl-C while the reply is printed
    assert reply.finish_reason == "cancelled"
    cut = reply.completion.token_ids
    follow_up = prompt + cut + tok.encode(" then")
    again = session.complete(follow_up, cfg)
    list(again)
    assert again.completion.cached_tokens == len(prompt) + len(cut)  # the step had fed its last token
    assert again.completion.token_ids == _reference(model, follow_up, 10)[0]


def test_bad_prompt_token_ids_are_a_clear_error(tiny_model):
    model, tok = tiny_model
    with pytest.raises(UserError, match="prompt token 50257 is not a token id of this model"):
        Engine(model, tok).add([1, 50257], SamplingConfig(max_new_tokens=5))


def test_seeded_rows_in_bf16_give_their_tokens_alone_in_any_batch():
    """In bfloat16 a CPU matmul of one row takes another kernel than of several, and SDPA sums in another
    order as the key count changes; both round differently, and a seeded row sampled other tokens alone
    than among rows of other lengths. GPT-2's widths (768, MLP 3072), random weights, two layers."""
    from gpt2ft.config import GPTConfig
    from gpt2ft.model import GPT
    from gpt2ft.tokenizer import gpt2_tokenizer

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=12, n_embd=768, vocab_size=50257, block_size=128)).to(torch.bfloat16).eval()
    tok = gpt2_tokenizer()
    prompts = [tok.encode(f"Prompt number {i}: the quick brown fox " + "jumps " * i) for i in range(6)]
    cfg = SamplingConfig(max_new_tokens=24, temperature=1.0, top_k=50, seed=7, ignore_eos=True)
    together = [c.token_ids for c in complete_batch(model, tok, prompts, cfg)]
    assert together == [complete_batch(model, tok, [p], cfg)[0].token_ids for p in prompts]
