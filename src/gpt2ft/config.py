"""Model configuration: the GPTConfig dataclass, named presets, and Hugging Face config.json I/O."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from .errors import UserError


@dataclass
class GPTConfig:
    """Shape and regularisation of a GPT-2 model (field names follow nanoGPT; HF names in to_hf)."""

    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block."""
    n_embd: int = 768
    """Width of the residual stream."""
    block_size: int = 1024
    """Context length (HF: n_positions)."""
    vocab_size: int = 50257
    """Number of token ids (GPT-2 BPE: 50257)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches (HF: *_pdrop)."""
    layer_norm_epsilon: float = 1e-5
    """LayerNorm epsilon."""
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"model config {name}={getattr(self, name)} must be positive")

    def to_hf(self) -> dict:
        """The config.json that transformers' GPT2LMHeadModel reads."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": "gelu_new",
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_embd": self.n_embd,
            "n_positions": self.block_size,
            "n_ctx": self.block_size,
            "n_inner": None,
            "vocab_size": self.vocab_size,
            "resid_pdrop": self.dropout,
            "embd_pdrop": self.dropout,
            "attn_pdrop": self.dropout,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "use_cache": True,
        }

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "GPTConfig":
        """Read an HF GPT-2 config.json; refuse the variants this model does not implement."""
        model_type = hf.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise UserError(f"{source}: model_type is {model_type!r}; gpt2ft only loads GPT-2 models")
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"{source}: activation_function {act!r} is not supported (GPT-2 uses gelu_new)")
        n_embd = hf.get("n_embd", 768)
        if hf.get("n_inner") not in (None, 4 * n_embd):
            raise UserError(f"{source}: n_inner={hf['n_inner']} is not supported (only 4*n_embd)")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise UserError(f"{source}: scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn are not supported")
        if hf.get("scale_attn_weights", True) is not True:  # attention scaled by 1/sqrt(head size), as GPT-2's
            raise UserError(f"{source}: scale_attn_weights={hf['scale_attn_weights']!r} is not supported (GPT-2 "
                            "scales attention by 1/sqrt(head size))")
        if hf.get("tie_word_embeddings", True) is False:
            raise UserError(f"{source}: untied lm_head is not supported (GPT-2 ties it to wte)")
        eos = hf.get("eos_token_id", 50256)
        return cls(
            n_layer=hf.get("n_layer", 12),
            n_head=hf.get("n_head", 12),
            n_embd=n_embd,
            block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
            vocab_size=hf.get("vocab_size", 50257),
            dropout=float(hf.get("resid_pdrop", 0.1)),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            bos_token_id=hf.get("bos_token_id", eos),
            eos_token_id=eos,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def num_params(self) -> int:
        """Parameter count with the tied lm_head counted once."""
        d, L = self.n_embd, self.n_layer
        per_block = 12 * d * d + 13 * d  # attn 4d^2+4d, mlp 8d^2+5d, two LayerNorms 4d
        return self.vocab_size * d + self.block_size * d + L * per_block + 2 * d


# GPT-2 sizes as OpenAI released them; dropout 0.1 as in their config.json.
PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(12, 12, 768, dropout=0.1),
    "gpt2-medium": GPTConfig(24, 16, 1024, dropout=0.1),
    "gpt2-large": GPTConfig(36, 20, 1280, dropout=0.1),
    "gpt2-xl": GPTConfig(48, 25, 1600, dropout=0.1),
    # Small presets for from-scratch pretraining on a CPU.
    "micro": GPTConfig(n_layer=2, n_head=2, n_embd=128, block_size=256, dropout=0.0),
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=512, dropout=0.0),
    "small": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=512, dropout=0.1),
}
# The GPT-3 paper's sizes (Brown et al. 2020, Table 2.1), context 2048, here with dense attention
# throughout (the paper alternates dense and locally banded sparse layers). GPT-3 XL's table row says
# 24 heads of 128 dimensions for a width of 2048, which does not divide: 16 heads of 128 are used.
GPT3_PRESETS = {
    "gpt3-small": GPTConfig(12, 12, 768, block_size=2048),  # 125M
    "gpt3-medium": GPTConfig(24, 16, 1024, block_size=2048),  # 350M
    "gpt3-large": GPTConfig(24, 16, 1536, block_size=2048),  # 760M
    "gpt3-xl": GPTConfig(24, 16, 2048, block_size=2048),  # 1.3B
    "gpt3-2.7b": GPTConfig(32, 32, 2560, block_size=2048),  # 2.7B
}
PRESETS.update(GPT3_PRESETS)
for _name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
    PRESETS[f"openai-community/{_name}"] = PRESETS[_name]


def preset_help() -> str:
    """The presets with their parameter counts, for --model-config's help."""
    return ", ".join(f"{n} ({c.num_params() / 1e6:,.0f}M)" if c.num_params() < 1e9 else
                     f"{n} ({c.num_params() / 1e9:.1f}B)" for n, c in PRESETS.items() if "/" not in n)


def preset(name: str, **overrides) -> GPTConfig:
    """A named preset, optionally with fields overridden (layers, heads, width, context, vocabulary)."""
    if name not in PRESETS:
        raise UserError(f"unknown model config {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    valid = {f.name for f in fields(GPTConfig)}
    unknown = set(overrides) - valid
    if unknown:
        raise UserError(f"unknown model config field(s) {sorted(unknown)}; valid: {sorted(valid)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
