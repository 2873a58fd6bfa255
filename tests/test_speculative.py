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
