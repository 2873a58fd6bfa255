"""LoRA: a drop-in nn.Linear that keeps the base keys (weight, bias) and adds lora_A / lora_B.

Pure nn: no file I/O (checkpoint.py writes and reads adapters in PEFT's format, which
peft.PeftModel.from_pretrained(GPT2LMHeadModel, folder) loads). disable_adapters() gives DPO its
reference model without a second copy of the weights.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError

PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("c_attn", "c_proj")

    def __post_init__(self):
        if self.r < 1:
            raise UserError(f"--lora-r must be >= 1, not {self.r}")
        if not self.alpha > 0:  # NaN too
            raise UserError(f"--lora-alpha must be > 0, not {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--lora-dropout must be in [0, 1), not {self.dropout}")
        self.targets = tuple(self.targets)


class LoRALinear(nn.Linear):
    """y = x W^T + b + (alpha / r) * B(A(dropout(x))); W and b are the frozen base parameters."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # same Parameters, same state-dict keys
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=base.weight.device)
        self.lora_dropout = nn.Dropout(dropout)
        self.scaling = alpha / r
        self.disabled = False
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT: B = 0 makes it a no-op
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return out
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling


def _matches(name: str, targets) -> bool:
    """PEFT's rule: the module name equals a target or ends with '.' + target."""
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model, config: LoRAConfig) -> list[str]:
    """Wrap the targeted linear layers; freeze everything but the adapters. Returns the wrapped names."""
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) and name != "lm_head" \
                and _matches(name, config.targets):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child,
                    LoRALinear(module, config.r, config.alpha, config.dropout))
            wrapped.append(name)
    if not wrapped:
        raise UserError(f"--lora-targets {','.join(config.targets)} matched no linear layer "
                        "(try c_attn, c_proj, mlp.c_fc, mlp.c_proj)")
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    model.lora_config = config
    return wrapped


def trainable_summary(model) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"


@contextlib.contextmanager
def disable_adapters(model):
    """Run the base model: inside this block every LoRA layer adds nothing."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, state in zip(layers, before):
            m.disabled = state


@torch.no_grad()
def merge_lora(model) -> None:
    """Fold every adapter into its base weight and put plain nn.Linear layers back."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              device=module.weight.device, dtype=module.weight.dtype)
            plain.weight.copy_(module.weight + module.delta_weight().to(module.weight.dtype))
            if module.bias is not None:
                plain.bias.copy_(module.bias)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, plain)
    model.lora_config = None
    for p in model.parameters():
        p.requires_grad = True


def adapter_state_dict(model, state: dict | None = None) -> dict[str, torch.Tensor]:
    """Adapter tensors under PEFT's names (base_model.model.<module>.lora_A.weight), of the model's own state
    dict or of `state` (the same model's, gathered from shards)."""
    return {PEFT_PREFIX + k: v for k, v in (model.state_dict() if state is None else state).items() if "lora_" in k}


def load_adapter_state(model, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy adapter tensors (PEFT names, with or without the adapter name) into the model's LoRA layers."""
    own = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    # PEFT may name tensors with or without the adapter name ("lora_A.default.weight").
    named = {k.removeprefix(PEFT_PREFIX).replace(".default.", "."): v for k, v in state.items()}
    missing, unexpected = sorted(set(own) - set(named)), sorted(set(named) - set(own))
    if missing or unexpected:
        raise UserError(f"{source}: adapter does not fit the model (missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]})")
    with torch.no_grad():
        for key, target in own.items():
            if named[key].shape != target.shape:
                raise UserError(f"{source}: {key} has shape {tuple(named[key].shape)}, "
                                f"the model expects {tuple(target.shape)}")
            target.copy_(named[key])


def peft_config(config: LoRAConfig, base_model: str | None) -> dict:
    """adapter_config.json as PEFT writes it for GPT-2 (whose HF layers are Conv1D: fan_in_fan_out)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": list(config.targets), "fan_in_fan_out": True, "bias": "none",
        "modules_to_save": None, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False,
    }


def config_from_peft(data: dict, source: str) -> LoRAConfig:
    if data.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{source}: only LoRA adapters are supported, not {data.get('peft_type')}")
    targets = data.get("target_modules") or ["c_attn", "c_proj"]
    if isinstance(targets, str):
        raise UserError(f"{source}: regex target_modules are not supported; list the module names")
    try:
        return LoRAConfig(r=int(data["r"]), alpha=float(data.get("lora_alpha", data["r"])),
                          dropout=float(data.get("lora_dropout", 0.0)), targets=tuple(targets))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{source}: malformed adapter config ({type(e).__name__}: {e})") from None
