"""Int8 weight-only quantization: logits close to bf16, the same greedy text, half the memory."""
from __future__ import annotations

import copy

import pytest
import torch

from gpt2ft.errors import UserError
from gpt2ft.generation import generate
from gpt2ft.quantize import quantize_model, quantize_rows, weight_bytes


def test_quantize_rows_is_per_channel_absmax():
    w = torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.0, -0.5]])
    q, scale = quantize_rows(w)
    assert torch.allclose(scale, torch.tensor([1 / 127, 2 / 127]))
    assert q.dtype == torch.int8 and q[0].tolist() == [64, -127, 32] and q[1].tolist() == [127, 0, -32]
    assert (q.float() * scale[:, None] - w).abs().max() <= scale.max() / 2 + 1e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_logits_follow_the_unquantized_model(tiny_model, dtype):
    model, tok = tiny_model
    base = copy.deepcopy(model).to(dtype).eval()
    quant = quantize_model(copy.deepcopy(base))
    ids = torch.tensor([tok.encode("The king of Scotland is a tragic figure, and his wife is worse.")])
    with torch.no_grad():
        ref, got = base(ids).float(), quant(ids).float()
    rel = (got - ref).norm() / ref.norm()
    assert rel < 0.05, rel
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree >= 0.9, agree
    scales = sum(m.scale.numel() * m.scale.element_size() for m in quant.modules() if hasattr(m, "weight_int8"))
    assert weight_bytes(quant) - scales <= 0.51 * weight_bytes(copy.deepcopy(base).to(torch.bfloat16))
    text = generate(quant, tok, "Hello", max_new_tokens=8, temperature=0.0)
    assert isinstance(text, str)


def test_quantize_refuses_unknown_methods_and_unmerged_lora(tiny_model):
    from gpt2ft.lora import LoRAConfig, apply_lora

    model, _ = tiny_model
    with pytest.raises(UserError, match="int8"):
        quantize_model(copy.deepcopy(model), "int4")
    lora = copy.deepcopy(model)
    apply_lora(lora, LoRAConfig(4, 8, 0.0, ("c_attn",)))
    with pytest.raises(UserError, match="merge"):
        quantize_model(lora)
