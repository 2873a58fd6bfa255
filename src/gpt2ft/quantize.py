"""Int8 weight-only quantization at load time: every linear layer's weight becomes int8 with one scale
per output channel (symmetric, absmax / 127), multiplied by the CPU's int8 weight kernel
(`aten._weight_int8pack_mm`) with activations in the model's dtype (float32 ones rounded to bf16 for the
kernel, which is vectorised for bf16 only). The token embedding and the
tied lm_head share one int8 matrix, so the weights take half the memory of bf16. Nothing else in
gpt2ft knows: a quantized model is a GPT whose modules were swapped (as in gpt-fast).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import OptionError, UserError
from .model import GPT

METHODS = ("int8",)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (N, K) int8 and (N,) float scales, weight ~= q * scale[:, None]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + bias, with q int8 (out, in)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale.to(dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.in_features, self.out_features = q.shape[1], q.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The scales: what code that asks a layer for its device and compute dtype reads."""
        return self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.device.type == "cpu":  # the kernel is vectorised for bf16 rows (float32 ones run ~10x slower)
            rows = x2.to(torch.bfloat16) if x2.dtype == torch.float32 else x2
            y = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.weight_int8,
                                                   self.scale.to(rows.dtype)).to(x.dtype)
        else:  # other devices: dequantize on the fly
            y = F.linear(x2, self.weight_int8.to(x.dtype) * self.scale.to(x.dtype)[:, None])
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)


class Int8Embedding(nn.Module):
    """Rows of the int8 matrix the tied lm_head multiplies by, dequantized as they are looked up."""

    def __init__(self, head: Int8Linear):
        super().__init__()
        self.head = [head]  # a list: not a submodule, so its buffers are not registered twice

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        return head.weight_int8[idx].to(head.scale.dtype) * head.scale[idx].unsqueeze(-1)



def quantize_model(model: GPT, method: str = "int8") -> GPT:
    """Swap every nn.Linear (the tied lm_head and token embedding included) for its int8 version, in
    place; activations stay in the model's dtype. LoRA adapters must be merged first."""
    if method not in METHODS:
        raise OptionError("quantize", lambda n: f"{n('quantize')} must be one of {', '.join(METHODS)}, not {method!r}")
    if model.lora_config is not None:
        raise UserError("--quantize needs plain weights: merge the LoRA adapter first (gpt2ft export --merge-lora)")
    dtype = model.lm_head.weight.dtype
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child is not model.lm_head:
                setattr(module, name, Int8Linear(*quantize_rows(child.weight), child.bias, dtype))
    head = Int8Linear(*quantize_rows(model.lm_head.weight), None, dtype)
    model.lm_head = head
    model.transformer.wte = Int8Embedding(head)
    model.quantized = method
    return model.eval().requires_grad_(False)


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (each tensor once), KV caches excluded."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen or t.dim() == 4:  # (B, nh, T, hs) caches are not weights
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
