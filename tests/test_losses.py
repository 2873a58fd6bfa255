import math

import torch
import torch.nn.functional as F

from gpt2ft.losses import linear_cross_entropy_sum, masked_lm_loss_sum


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
