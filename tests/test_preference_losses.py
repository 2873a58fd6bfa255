"""Per-sequence log-probs and preference losses against independent oracles: HF transformers' GPT-2,
autograd of the full logits, TRL's CPO/ORPO loss functions, and hand-computed values."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from gpt2ft.losses import (linear_cross_entropy_per_sequence, preference_loss, sequence_logps)


def test_per_sequence_cross_entropy_values_and_gradients_match_full_logits():
    torch.manual_seed(0)
    h = torch.randn(23, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (23,))
    seg = torch.tensor([0] * 5 + [1] * 9 + [2] * 2 + [4] * 7)  # sequence 3 has no position; chunks straddle them
    upstream = torch.tensor([0.5, -2.0, 1.5, 3.0, 0.25])
    ours = linear_cross_entropy_per_sequence(h, w, t, seg, 5, chunk_size=4)
    ours.backward(upstream)
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    rows = F.cross_entropy(h @ w.t(), t, reduction="none")
    ref = torch.zeros(5).index_add(0, seg, rows)
    ref.backward(upstream)
    assert ours.shape == (5,) and ours[3] == 0
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-6)
    assert torch.allclose(gh, h.grad, atol=1e-5) and torch.allclose(gw, w.grad, atol=1e-5)


def test_per_sequence_frozen_weight_gets_no_gradient_and_hidden_gradient_is_exact():
    torch.manual_seed(1)
    h = torch.randn(11, 8, requires_grad=True)
    w = torch.randn(30, 8)  # frozen, as under LoRA
    t = torch.randint(0, 30, (11,))
    seg = torch.tensor([0] * 6 + [1] * 5)
    linear_cross_entropy_per_sequence(h, w, t, seg, 2, chunk_size=3).backward(torch.tensor([1.0, -3.0]))
    ref_h = h.detach().clone().requires_grad_()
    rows = F.cross_entropy(ref_h @ w.t(), t, reduction="none")
    (rows[:6].sum() - 3 * rows[6:].sum()).backward()
    assert w.grad is None and torch.allclose(h.grad, ref_h.grad, atol=1e-5)


def _pair_batch():
    """Two prompts with different-length responses, right-padded; labels -100 on prompt and padding."""
    torch.manual_seed(2)
    seqs = [(torch.randint(0, 50257, (5,)), torch.randint(0, 50257, (4,))),
            (torch.randint(0, 50257, (3,)), torch.randint(0, 50257, (7,))),
            (torch.randint(0, 50257, (5,)), torch.randint(0, 50257, (1,)))]
    T = max(len(p) + len(r) for p, r in seqs) - 1
    input_ids = torch.zeros(len(seqs), T, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100)
    for i, (p, r) in enumerate(seqs):
        full = torch.cat([p, r])
        input_ids[i, :len(full) - 1] = full[:-1]
        labels[i, len(p) - 1:len(full) - 1] = r
    return input_ids, labels, [len(r) for _, r in seqs]


def test_sequence_logps_match_hf_gpt2(tiny_model, hf_model):
    model, _ = tiny_model
    input_ids, labels, lengths = _pair_batch()
    with torch.no_grad():
        ours, n = sequence_logps(model, {"input_ids": input_ids, "labels": labels})
        logp = torch.log_softmax(hf_model(input_ids).logits.float(), -1)  # right padding: causal mask suffices
    mask = labels != -100
    ref = (logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask).sum(-1)
    assert n.tolist() == lengths
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-5)


def test_sequence_logps_gradient_matches_autograd_through_the_model(hf_dir):
    from gpt2ft.checkpoint import load

    model, _ = load(hf_dir, device="cpu", dtype="float32")  # a private copy: we take gradients
    input_ids, labels, _ = _pair_batch()
    upstream = torch.tensor([1.0, -0.5, 2.0])
    logps, _ = sequence_logps(model, {"input_ids": input_ids, "labels": labels})
    (logps * upstream).sum().backward()
    ours = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    mask = labels != -100
    logp = torch.log_softmax(model(input_ids).float(), -1)
    ref = (logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask).sum(-1)
    (ref * upstream).sum().backward()
    assert torch.allclose(logps.detach(), ref.detach(), atol=1e-4)
    for k, p in model.named_parameters():
        assert torch.allclose(ours[k], p.grad, atol=1e-5, rtol=1e-4), k


# ----- losses -------------------------------------------------------------------------------------
def _logps():
    torch.manual_seed(3)
    c, r = -torch.rand(6) * 30 - 1, -torch.rand(6) * 30 - 1
    rc, rr = c + torch.randn(6) * 2, r + torch.randn(6) * 2
    lc, lr = torch.randint(1, 20, (6,)), torch.randint(1, 20, (6,))
    return c, r, rc, rr, lc, lr


def _trl_cpo(loss_type, beta, label_smoothing=0.0, gamma=0.5):
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    fake = SimpleNamespace(alpha=0.0, beta=beta, label_smoothing=label_smoothing, simpo_gamma=gamma,
                           loss_type=loss_type, accelerator=SimpleNamespace(device="cpu"))
    return lambda chosen, rejected: cpo.CPOTrainer.cpo_loss(fake, chosen, rejected)


@pytest.mark.parametrize("kind,ls", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0)])
def test_dpo_family_matches_trl_on_log_ratios(kind, ls):
    # TRL's CPO loss is the DPO formula with the reference dropped: fed log-ratios, it is DPO's (cDPO's) loss.
    c, r, rc, rr, lc, lr = _logps()
    ours = preference_loss(kind, c, r, lc, lr, rc, rr, beta=0.3, label_smoothing=ls)
    trl_loss, _, _ = _trl_cpo(kind, 0.3, ls)(c - rc, r - rr)
    assert torch.allclose(ours["loss"], trl_loss, atol=1e-6)
    assert torch.allclose(ours["chosen_reward"], 0.3 * (c - rc)) and torch.allclose(ours["rejected_reward"], 0.3 * (r - rr))


def test_ipo_matches_trl_on_per_token_log_ratios():
    c, r, rc, rr, lc, lr = _logps()
    ours = preference_loss("ipo", c, r, lc, lr, rc, rr, beta=0.5)
    trl_loss, _, _ = _trl_cpo("ipo", 0.5)((c - rc) / lc, (r - rr) / lr)
    assert torch.allclose(ours["loss"], trl_loss, atol=1e-5)


def test_simpo_matches_trl_cpo_simpo():
    c, r, _, _, lc, lr = _logps()
    ours = preference_loss("simpo", c, r, lc, lr, beta=2.0, gamma=1.2)
    trl_loss, trl_c, trl_r = _trl_cpo("simpo", 2.0, 0.0, 1.2)(c / lc, r / lr)  # TRL averages per token for SimPO
    assert torch.allclose(ours["loss"], trl_loss, atol=1e-6)
    assert torch.allclose(ours["chosen_reward"], trl_c) and torch.allclose(ours["rejected_reward"], trl_r)


def test_orpo_matches_trl_odds_ratio_plus_nll():
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    c, r, _, _, lc, lr = _logps()
    fake = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    ratio_term, trl_c, trl_r, _, _ = orpo.ORPOTrainer.odds_ratio_loss(fake, c / lc, r / lr)
    ours = preference_loss("orpo", c, r, lc, lr, lam=0.25)
    assert torch.allclose(ours["loss"], -c / lc - ratio_term, atol=1e-5)  # TRL: loss = nll - beta * logsigmoid
    assert torch.allclose(ours["chosen_reward"], trl_c) and torch.allclose(ours["rejected_reward"], trl_r)


def test_losses_by_hand():
    one = torch.ones(1)
    # sigmoid: delta = (-1 - -2) - (-3 - -2) = 2; beta 0.5 -> -log sigmoid(1)
    args = (torch.tensor([-1.0]), torch.tensor([-3.0]), one, one, torch.tensor([-2.0]), torch.tensor([-2.0]))
    assert preference_loss("sigmoid", *args, beta=0.5)["loss"].item() == pytest.approx(math.log(1 + math.exp(-1)))
    # robust, eps 0.25: (0.75 * log(1+e^-1) - 0.25 * log(1+e^1)) / 0.5
    robust = (0.75 * math.log(1 + math.exp(-1)) - 0.25 * math.log(1 + math.e)) / 0.5
    assert preference_loss("robust", *args, beta=0.5, label_smoothing=0.25)["loss"].item() == pytest.approx(robust)
    # hinge: relu(1 - 0.5 * 2) = 0; ipo (lengths 1): (2 - 1/(2*0.5))^2 = 1
    assert preference_loss("hinge", *args, beta=0.5)["loss"].item() == 0.0
    assert preference_loss("ipo", *args, beta=0.5)["loss"].item() == pytest.approx(1.0)
    # RPO: + sft_weight * chosen NLL per token; chosen -6 over 3 tokens -> + 0.5 * 2
    rpo = preference_loss("sigmoid", torch.tensor([-6.0]), torch.tensor([-8.0]), torch.tensor([3]), one,
                          torch.tensor([-7.0]), torch.tensor([-7.0]), beta=0.5, sft_weight=0.5)
    assert rpo["loss"].item() == pytest.approx(math.log(1 + math.exp(-1)) + 1.0)
    # orpo: p_c = e^-1, p_r = e^-2; log odds = -1 - log(1-e^-1) - (-2 - log(1-e^-2))
    lo = -1 - math.log(1 - math.exp(-1)) + 2 + math.log(1 - math.exp(-2))
    orpo = preference_loss("orpo", torch.tensor([-2.0]), torch.tensor([-2.0]), torch.tensor([2]), one, lam=0.1)
    assert orpo["loss"].item() == pytest.approx(1.0 + 0.1 * math.log(1 + math.exp(-lo)), rel=1e-6)


def test_reference_losses_need_reference():
    with pytest.raises(ValueError, match="reference"):
        preference_loss("sigmoid", torch.zeros(1), torch.zeros(1), torch.ones(1), torch.ones(1))


def test_per_sequence_path_takes_bfloat16_hidden_states():
    torch.manual_seed(4)
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    t, seg = torch.randint(0, 20, (10,)), torch.tensor([0] * 4 + [1] * 6)
    low = linear_cross_entropy_per_sequence(h.to(torch.bfloat16), w, t, seg, 2, chunk_size=3)
    low.sum().backward()
    g_low = w.grad.clone()
    w.grad = None
    high = linear_cross_entropy_per_sequence(h, w, t, seg, 2, chunk_size=3)
    high.sum().backward()
    assert low.dtype == torch.float32 and torch.allclose(low, high, rtol=2e-2)
    assert torch.allclose(g_low, w.grad, rtol=5e-2, atol=5e-2)
