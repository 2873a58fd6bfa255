import math

import torch
import torch.nn.functional as F

import pytest

import gpt2ft.losses as losses
from gpt2ft.losses import linear_cross_entropy_per_sequence, linear_cross_entropy_sum, masked_lm_loss_sum


def test_cross_entropy_by_hand():
    # logits [0, ln 3] -> p(target=1) = 3/4; two rows give 2 * -ln(3/4)
    hidden = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    weight = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    loss = linear_cross_entropy_sum(hidden, weight, torch.tensor([1, 1]))
    assert abs(loss.item() - 2 * math.log(4 / 3)) < 1e-6


def test_chunked_linear_cross_entropy_matches_autograd_of_full_logits():
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    ours = linear_cross_entropy_sum(h, w, t, chunk_size=8)
    ours.backward(torch.tensor(0.25))
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.t(), t, reduction="sum")
    ref.backward(torch.tensor(0.25))
    assert torch.allclose(ours, ref, rtol=1e-6)
    assert torch.allclose(gh, h.grad, atol=1e-6) and torch.allclose(gw, w.grad, atol=1e-6)


def test_frozen_weight_gets_no_gradient():
    h = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(7, 4)  # frozen, as under LoRA
    linear_cross_entropy_sum(h, w, torch.randint(0, 7, (5,))).backward()
    assert h.grad is not None and w.grad is None


def test_masked_loss_counts_only_supervised_tokens(tiny_model):
    model, _ = tiny_model
    x = torch.randint(0, 50257, (2, 9))
    labels = x[:, 1:].clone()
    labels[0, :5] = -100
    with torch.no_grad():
        loss, n = masked_lm_loss_sum(model, {"input_ids": x[:, :-1], "labels": labels})
        logits = model(x[:, :-1])
    assert n == 11
    assert torch.allclose(loss, F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum",
                                                ignore_index=-100), rtol=1e-5)


def _exact_bf16_problem(n=40, vocab=300, dim=64, seed=0):
    """Hidden states and weights whose logits are exact in bfloat16 (multiples of 1/4 below 64), so a
    float64 oracle sees the very logits the bf16 kernel does. Each vocabulary row has 4 entries of +-1/2;
    row i of the hidden states is (i % 21) times its target's row (plus noise when that is < 3): from
    flat rows to confident ones (p(target) > 0.9999)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(vocab, dim).scatter_(1, torch.stack([torch.randperm(dim, generator=g)[:4] for _ in range(vocab)]), 0.5)
    w = w * torch.where(torch.rand(vocab, dim, generator=g) < 0.5, -1.0, 1.0)
    t = torch.randint(0, vocab, (n,), generator=g)
    a = torch.arange(n) % 21
    h = a[:, None] * w[t] + torch.randint(-1, 2, (n, dim), generator=g) / 2.0 * (a[:, None] < 3)
    z = h @ w.t()
    assert z.abs().max() < 64 and torch.equal(z * 4, (z * 4).round())
    return h, w, t


@pytest.mark.parametrize("slices", [None, (8, 64)])
def test_bf16_cross_entropy_against_a_float64_oracle_on_the_same_logits(monkeypatch, slices):
    """Under bf16 autocast the (n, V) softmax and gradient run in bf16. Stated tolerance against float64 on
    the same logits: flat rows within 0.004 nats; rows with p(target) >= 1/2 within 2% of their (small) loss,
    and every row's hidden-state gradient within 3% of its norm -- which a plain bf16 `softmax - 1` at a
    confident target (error 2^-9 against a gradient of 1e-3) would miss by far. With `slices`, the CPU's
    products run in slices of 8 rows and 64 vocabulary entries (GPT-2's are 256 and 8192), uneven ones too."""
    if slices:
        monkeypatch.setattr(losses, "ROWS_PER_SLICE", slices[0])
        monkeypatch.setattr(losses, "VOCAB_PER_SLICE", slices[1])
    h, w, t = _exact_bf16_problem()
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref = F.cross_entropy(h64 @ w64.t(), t, reduction="none")
    ref.sum().backward()
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows = linear_cross_entropy_per_sequence(hh, ww, t, torch.arange(len(t)), len(t), chunk_size=16)
        total = linear_cross_entropy_sum(hh, ww, t, chunk_size=16)
    rows.sum().backward()
    assert rows.dtype == total.dtype == torch.float32
    confident = ref < math.log(2)
    assert confident.sum() >= 10 and (ref[confident] < 1e-2).sum() >= 5 and (~confident).sum() >= 10
    err = (rows.double() - ref.detach()).abs()
    assert err[~confident].max() < 0.004
    assert (err[confident] / ref.detach()[confident]).max() < 0.02
    assert abs(total.item() - ref.sum().item()) < 0.004 * len(t)
    dh_err = (hh.grad.double() - h64.grad).norm(dim=1) / h64.grad.norm(dim=1)
    assert dh_err.max() < 0.03
    assert (ww.grad.double() - w64.grad).abs().max() < 0.01 * w64.grad.abs().max()


@pytest.mark.parametrize("slices", [None, (4, 64)])
def test_weight_gradient_sums_over_chunks_in_float32(monkeypatch, slices):
    """The weight's gradient of a multi-chunk bf16 call: each chunk's bf16 product summed in float32 (also
    when each chunk runs in row and vocabulary slices)."""
    if slices:
        monkeypatch.setattr(losses, "ROWS_PER_SLICE", slices[0])
        monkeypatch.setattr(losses, "VOCAB_PER_SLICE", slices[1])
    h, w, t = _exact_bf16_problem(n=96, seed=1)
    w64 = w.double().requires_grad_()
    F.cross_entropy(h.double() @ w64.t(), t, reduction="sum").backward()
    ww = w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear_cross_entropy_sum(h, ww, t, chunk_size=10).backward()
    assert ww.grad.dtype == torch.float32
    assert (ww.grad.double() - w64.grad).abs().max() < 0.01 * w64.grad.abs().max()
