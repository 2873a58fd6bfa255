"""Training options (flags and YAML keys of the same names), each checked for type and range where it
is parsed, and the state that exact resume restores besides weights and optimizer."""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields

from ..errors import UserError

STRATEGIES = ("auto", "single", "ddp", "fsdp")  # how processes share the model (train/strategy.py)
RUN_CONTROL = ("resume", "force_resume", "overwrite")  # what a command does to its run folder, not its recipe


def _f(default, help: str, check=None, **kw):
    """A field with its --help text; `check(value) -> bool` is its accepted range (shown in --help)."""
    return field(default=default, metadata={"help": help, "check": check, **kw})


def _at_least(n):
    return lambda v: v >= n


def _finite_at_least(n):
    return lambda v: math.isfinite(v) and v >= n


@dataclass
class TrainConfig:
    """Options shared by every training verb (flags and YAML keys of the same names)."""

    out: str | None = _f(None, "run folder: checkpoints, metrics.jsonl, config.yaml, loss.png", required=True, path=True)
    max_steps: int = _f(-1, "optimizer steps, >= 1 (-1: derive from --epochs)", lambda v: v == -1 or v >= 1)
    epochs: float | None = _f(None, "passes over the training data when --max-steps is -1 (> 0; unset: from the "
                                    "data size, train.defaults)", lambda v: math.isfinite(v) and v > 0)
    batch_size: int = _f(8, "micro-batch size, >= 1 (sequences per forward pass, per process)", _at_least(1))
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step (>= 1)", _at_least(1))
    max_length: int | None = _f(None, "sequence length in tokens, 2 .. the model's context (default: the context)",
                                _at_least(2))
    lr: float | None = _f(None, "peak learning rate (> 0; unset: from the model's width, train.defaults)",
                          lambda v: math.isfinite(v) and v > 0)
    min_lr: float | None = _f(None, "final learning rate of the cosine schedule, 0 .. lr (default: lr/10)",
                              _finite_at_least(0))
    warmup_steps: int | None = _f(None, "linear warmup steps, >= 0 (capped at a tenth of the run; unset: 0.05 x its steps)",
                                  _at_least(0))
    weight_decay: float = _f(0.1, "AdamW weight decay, >= 0 (not on biases, norms and embeddings)",
                             _finite_at_least(0))
    beta1: float = _f(0.9, "AdamW beta1, in [0, 1)", lambda v: 0 <= v < 1)
    beta2: float = _f(0.95, "AdamW beta2, in [0, 1)", lambda v: 0 <= v < 1)
    grad_clip: float = _f(1.0, "clip the global gradient norm to this, >= 0 (0: off)", _finite_at_least(0))
    dropout: float | None = _f(None, "override the model's dropout, in [0, 1) (unset: the model's own)", lambda v: 0 <= v < 1)
    eval_every: int | None = _f(None, "evaluate every N steps, >= 0 (0: only at the end; unset: about 10 per run)",
                                _at_least(0))
    eval_batches: int = _f(20, "validation micro-batches per evaluation (>= 1)", _at_least(1))
    save_every: int = _f(500, "save a checkpoint every N steps, >= 0 (0: only best and the end)", _at_least(0))
    keep_last: int = _f(2, "checkpoints to keep besides best/ (>= 1)", _at_least(1))
    patience: int = _f(0, "stop after N evaluations without a better best metric, >= 0 (0: never)", _at_least(0))
    log_every: int = _f(10, "write metrics every N steps (>= 1)", _at_least(1))
    seed: int = _f(1337, "seed for initialisation, data order and dropout (>= 0)", _at_least(0))
    resume: str | None = _f(None, "'auto' (newest good checkpoint in --out) or a checkpoint folder")
    force_resume: bool = _f(False, "resume even if batch size, data or tokenizer changed")
    overwrite: bool = _f(False, "start over in an --out that holds a run (its checkpoints and logs are deleted), "
                                "or write into a non-empty folder gpt2ft did not make")
    device: str = _f("auto", "auto|cpu|cuda|mps")
    dtype: str = _f("auto", "auto (bf16 autocast on GPUs and bf16-capable CPUs, else fp32)|float32|bfloat16|float16")
    compile: bool = _f(False, "torch.compile the model")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory (per block)")
    strategy: str = _f("auto", "|".join(STRATEGIES) + ": how processes under torchrun share the model: ddp "
                       "(a whole copy each), fsdp (weights, gradients and optimizer state sharded); auto: ddp "
                       "with several processes, else single", lambda v: v in STRATEGIES)
    fsdp_offload: bool = _f(False, "with --strategy fsdp: keep the sharded weights, gradients and optimizer "
                                   "state in CPU memory (the optimizer steps on the CPU)")
    max_bad_steps: int = _f(5, "stop after this many non-finite steps in a row (>= 1)", _at_least(1))
    sample_tokens: int = _f(40, "tokens per sample generation at each evaluation (>= 1)", _at_least(1))
    progress: bool = _f(True, "show a progress bar")

    def __post_init__(self):
        check_fields(self)
        if self.min_lr is not None and self.lr is not None and self.min_lr > self.lr:
            raise UserError(f"--min-lr {self.min_lr} must not exceed --lr {self.lr}")
        if self.resume is not None and self.overwrite:
            raise UserError("--resume continues a run and --overwrite starts it over: pass one of them")
        if self.epochs is not None and self.max_steps != -1:
            raise UserError(f"--epochs {self.epochs:g} takes effect only with --max-steps -1 (the default), not "
                            f"{self.max_steps}: pass one of them")
        if self.force_resume and self.resume is None:
            raise UserError("--force-resume takes effect only with --resume: add --resume auto or drop it")
        if self.patience and self.eval_every == 0:
            raise UserError(f"--patience {self.patience} counts evaluations, and --eval-every 0 turns them off: "
                            "set --eval-every or drop --patience")
        if self.fsdp_offload and self.strategy != "fsdp":
            raise UserError(f"--fsdp-offload needs --strategy fsdp (not {self.strategy})")


def check_fields(obj) -> None:
    """Type and range of every field of a config dataclass (values may come from YAML untyped)."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        flag = "--" + f.name.replace("_", "-")
        kinds = [t for t in typing.get_args(hints[f.name]) or (hints[f.name],)]
        if value is None and type(None) in kinds:
            continue
        if not _is_instance(value, kinds):
            wanted = " or ".join(t.__name__ for t in kinds if t is not type(None))
            raise UserError(f"{flag} must be {wanted}, not {value!r}")
        check = f.metadata.get("check")
        if check is not None and not check(value):
            raise UserError(f"{flag} {value!r} is out of range: {f.metadata['help']}")


def _is_instance(value, kinds) -> bool:
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int):
        return int in kinds or float in kinds
    if isinstance(value, float):
        return float in kinds
    return any(isinstance(value, t) for t in kinds if isinstance(t, type))


def sequence_length(cfg: TrainConfig, context: int) -> int:
    """--max-length (checked against the model's context), or the context."""
    if cfg.max_length is not None and cfg.max_length > context:
        raise UserError(f"--max-length {cfg.max_length} exceeds the model's context of {context} tokens; "
                        f"use at most {context}")
    return cfg.max_length or context


@dataclass
class TrainState:
    """Everything besides weights and optimizer that exact resume needs."""

    step: int = 0
    epoch: int = 0
    offset: int = 0
    tokens_seen: int = 0
    best_val: float = math.inf  # best value of the objective's best_metric (kept as "lower is better")
    evals_since_best: int = 0
    skipped_steps: int = 0
