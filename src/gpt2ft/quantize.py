"""Int8 weight-only quantization at load time: every linear layer's weight becomes int8 with one scale
per output channel (symmetric, absmax / 127). On a CPU, decoding's few rows are multiplied by gpt2ft's C
kernel (native/int8_linear.c: float32 products of the activations with the int8 weights, bound by reading
them: about twice bf16's speed at one row), or where it cannot be built by torch's
(`aten._weight_int8pack_mm`, activations rounded to bf16); a prompt's many rows, and other devices, by
the float kernels on weights dequantized on the fly.
The token embedding and the tied lm_head share one int8 matrix, so the weights take half the memory of
bf16. Nothing else in gpt2ft knows: a quantized model is a GPT whose modules were swapped (as in gpt-fast).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import OptionError, UserError
from .model import GPT
from .native import int8_linear


METHODS = ("int8",)
# Rows up to which a CPU multiplies by the int8 weights themselves: decode steps and speculative verifies,
# where reading the weights is the cost (a row gets the same result in any such batch). More rows (a
# prompt's prefill) are bound by the multiplications: a dequantized copy and the float kernels are 3x faster.
KERNEL_ROWS = 64


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

    def _float32(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The scales and bias in float32 for the C kernel, converted once (and again if they are replaced)."""
        key = (self.scale.data_ptr(), self.scale.dtype, None if self.bias is None else self.bias.data_ptr())
        if getattr(self, "_f32", (None,))[0] != key:
            self._f32 = (key, self.scale.float().contiguous(),
                         None if self.bias is None else self.bias.detach().float().contiguous())
        return self._f32[1:]

    @property
    def weight(self) -> torch.Tensor:
        """The scales: what code that asks a layer for its device and compute dtype reads."""
        return self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        few = x2.device.type == "cpu" and len(x2) <= KERNEL_ROWS
        if few and (kernel := int8_linear()) is not None:
            rows = x2.float().contiguous()
            if torch.compiler.is_compiling():  # the same kernel, as an op the compiled graph calls
                bias = None if self.bias is None else self.bias.float()
                y = torch.ops.gpt2ft.int8_linear(rows, self.weight_int8, self.scale.float(), bias)
            else:
                y = kernel(rows, self.weight_int8, *self._float32())
            return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        if few:  # torch's kernel is vectorised for bf16 rows (float32 ones run ~10x slower)
            rows = x2.to(torch.bfloat16) if x2.dtype == torch.float32 else x2
            y = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.weight_int8,
                                                   self.scale.to(rows.dtype)).to(x.dtype)
        else:  # a prompt's many rows (bound by the multiplications), other devices: dequantized on the fly
            y = F.linear(x2, self.weight_int8.to(x.dtype) * self.scale.to(x.dtype)[:, None])
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)


@torch.library.custom_op("gpt2ft::int8_linear", mutates_args=())
def _int8_linear_op(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The C kernel as an op torch.compile keeps whole, so that a compiled step multiplies as eager does."""
    return int8_linear()(x, q, scale, bias)


@_int8_linear_op.register_fake
def _(x, q, scale, bias):
    return x.new_empty(x.shape[0], q.shape[0])


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
