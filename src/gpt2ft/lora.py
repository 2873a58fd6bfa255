"""LoRA: a drop-in nn.Linear that keeps the base keys (weight, bias) and adds lora_A / lora_B.

Adapters are saved in PEFT's format (adapter_config.json + adapter_model.safetensors), so
peft.PeftModel.from_pretrained(GPT2LMHeadModel, folder) loads them. disable_adapters() gives DPO its
reference model without a second copy of the weights.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
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
        if self.alpha <= 0:
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


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """Adapter tensors under PEFT's names (base_model.model.<module>.lora_A.weight)."""
    return {PEFT_PREFIX + k: v for k, v in model.state_dict().items() if "lora_" in k}


def write_adapter_files(folder: Path, model, tokenizer, meta: dict) -> None:
    """adapter_config.json + adapter_model.safetensors (PEFT), tokenizer, and gpt2ft.json naming the base."""
    from .checkpoint import META_FILE, atomic_save_safetensors, atomic_write_text

    cfg: LoRAConfig = model.lora_config
    base = meta.get("base_model")
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": list(cfg.targets),
        "fan_in_fan_out": True,  # GPT-2's HF layers are Conv1D
        "bias": "none", "modules_to_save": None, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False,
    }
    atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(peft_config, indent=2))
    atomic_save_safetensors(adapter_state_dict(model), folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    tokenizer.save(folder)
    atomic_write_text(folder / META_FILE, json.dumps({"format": 1, **meta, "lora": asdict(cfg)}, indent=2))


def read_adapter_config(folder: Path) -> LoRAConfig:
    path = folder / ADAPTER_CONFIG
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read adapter config ({e})") from None
    if data.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{path}: only LoRA adapters are supported, not {data.get('peft_type')}")
    targets = data.get("target_modules") or ["c_attn", "c_proj"]
    if isinstance(targets, str):
        raise UserError(f"{path}: regex target_modules are not supported; list the module names")
    return LoRAConfig(r=int(data["r"]), alpha=float(data.get("lora_alpha", data["r"])),
                      dropout=float(data.get("lora_dropout", 0.0)), targets=tuple(targets))


def load_adapter_weights(model, folder: Path) -> None:
    from .checkpoint import load_safetensors

    state = load_safetensors(folder / ADAPTER_WEIGHTS)
    own = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    # PEFT may name tensors with or without the adapter name ("lora_A.default.weight").
    named = {k.removeprefix(PEFT_PREFIX).replace(".default.", "."): v for k, v in state.items()}
    missing, unexpected = sorted(set(own) - set(named)), sorted(set(named) - set(own))
    if missing or unexpected:
        raise UserError(f"{folder / ADAPTER_WEIGHTS}: adapter does not fit the model (missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]})")
    with torch.no_grad():
        for key, target in own.items():
            if named[key].shape != target.shape:
                raise UserError(f"{folder / ADAPTER_WEIGHTS}: {key} has shape {tuple(named[key].shape)}, "
                                f"the model expects {tuple(target.shape)}")
            target.copy_(named[key])


def attach_adapter(model, folder: Path) -> None:
    """Apply the adapter saved in `folder` on top of `model`."""
    if not (folder / ADAPTER_CONFIG).exists():
        raise UserError(f"{folder}: no {ADAPTER_CONFIG}; not a LoRA adapter folder")
    apply_lora(model, read_adapter_config(folder))
    load_adapter_weights(model, folder)


def load_adapter_model(folder: Path, meta: dict):
    """(model, tokenizer) for an adapter-only folder: its base model (from metadata) plus the adapter."""
    from .checkpoint import load
    from .tokenizer import load_tokenizer

    base = meta.get("base_model") or json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{folder}: adapter folder does not name its base model; pass the base as MODEL "
                        f"and --lora {folder}")
    model, tokenizer = load(base, device="cpu", dtype="float32")
    attach_adapter(model, folder)
    has_tokenizer = any((folder / f).exists() for f in ("vocab.json", "tokenizer.json", "word_vocab.json"))
    return model, (load_tokenizer(folder) if has_tokenizer else tokenizer)
