"""What a training verb does when --epochs, --lr, --warmup-steps or --eval-every is left unset: values
derived from the number of training examples and the model, so that a few dozen examples get enough
optimizer steps to learn from and GPT-2 and the quickstart's 4-layer model each get a learning rate that
suits them. One table (DEFAULTS, per verb) is the declaration: the verbs' --help, the values a run
uses and the lines it prints at the start all come from it. Torch-free: --help is built from it."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .config import TrainConfig

WIDTH, QUICKSTART = 768, 256  # GPT-2 small's width and the quickstart model's, where each verb's rate is stated
WARMUP_FRACTION = 0.05  # of the run's optimizer steps
EVALUATIONS = 10  # per run, when --eval-every is unset (at most MAX_EVAL_EVERY steps apart)
MAX_EVAL_EVERY = 500


@dataclass(frozen=True)
class VerbDefaults:
    """One verb's defaults. Learning rate: the peak rate for all weights that trained GPT-2 small (768
    wide) well and the one that trained the quickstart's model (256 wide) well, interpolated log-linearly
    in the model's width through those two points (smaller models take larger rates), times `lora_factor`
    when only LoRA adapters train (a rank-8 update moves far less per step), at most `max_lr`. Length:
    enough passes over the data to see `examples` training examples, between `min_epochs` and
    `max_epochs`."""
    lr: float  # at width 768
    lr_quickstart: float  # at width 256
    examples: int
    min_epochs: float
    max_epochs: float
    why: str  # why this length, for --help
    lora_factor: float | None = 10.0  # None: the verb trains no LoRA adapter
    max_lr: float = 3e-3


DEFAULTS = {
    "pretrain": VerbDefaults(6e-4, 2e-3, 0, 1.0, 1.0, "one pass over the data; GPT-2 small and GPT-3 small "
                                                     "pretrained at 6e-4, the quickstart at 2e-3", None),
    "finetune": VerbDefaults(5e-5, 3e-4, 2000, 1.0, 10.0, "a small text is seen often enough to take on its style"),
    "sft": VerbDefaults(1e-4, 1e-3, 4000, 3.0, 50.0, "a few dozen records need many passes to learn the answer "
                                                    "format and where an answer ends"),
    "dpo": VerbDefaults(2e-5, 1e-4, 750, 1.0, 10.0, "preference tuning moves fast: trained longer, or at a higher "
                                                   "rate (3e-4 on the quickstart's model), it unlearns the "
                                                   "chosen answers too"),
}
AUTO = ("epochs", "lr", "warmup_steps", "eval_every")  # the TrainConfig fields whose None means "derive it"


def defaults_for(verb: str) -> VerbDefaults:
    return DEFAULTS.get(verb, DEFAULTS["finetune"])  # a Python-API objective of its own: fine-tuning's


def _width_lr(d: VerbDefaults, width: int) -> float:
    exponent = math.log(d.lr_quickstart / d.lr) / math.log(WIDTH / QUICKSTART)
    return d.lr * (WIDTH / width) ** exponent


def _factor(d: VerbDefaults, lora: bool) -> float:
    return d.lora_factor if lora and d.lora_factor else 1.0


def auto_lr(verb: str, width: int, lora: bool) -> float:
    d = defaults_for(verb)
    return min(_width_lr(d, width) * _factor(d, lora), d.max_lr)


def auto_epochs(verb: str, n_train: int) -> float:
    d = defaults_for(verb)
    wanted = d.examples / max(n_train, 1)
    return round(min(max(wanted, d.min_epochs), d.max_epochs), 1)


def total_steps(cfg: TrainConfig, n_train: int, world: int = 1) -> int:
    """Optimizer steps of the run: --max-steps, else --epochs passes of the global batch."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_train / (cfg.batch_size * cfg.grad_accum * world)))


def settle(cfg: TrainConfig, verb: str, n_train: int, width: int, lora: bool,
           world: int = 1) -> tuple[TrainConfig, list[str]]:
    """`cfg` with every unset AUTO field derived, and one line per derived value saying where it came from."""
    values, lines = {}, []
    if cfg.epochs is None and cfg.max_steps <= 0:  # with --max-steps, the run's length is that
        values["epochs"] = auto_epochs(verb, n_train)
        d = defaults_for(verb)
        lines.append(f"--epochs {values['epochs']:g}: {n_train} training examples, passes to see about "
                     f"{d.examples} (within {d.min_epochs:g}..{d.max_epochs:g})" if d.examples else
                     f"--epochs {values['epochs']:g}: {d.why}")
    if cfg.lr is None:
        values["lr"] = auto_lr(verb, width, lora)
        lines.append(f"--lr {values['lr']:.3g}: {_lr_reason(verb, width, lora)}")
    cfg = replace(cfg, **values)
    total = total_steps(cfg, n_train, world)
    later = {}
    if cfg.warmup_steps is None:
        later["warmup_steps"] = round(WARMUP_FRACTION * total)
        lines.append(f"--warmup-steps {later['warmup_steps']}: {WARMUP_FRACTION:.0%} of the run's {total} steps")
    if cfg.eval_every is None:
        later["eval_every"] = min(max(1, math.ceil(total / EVALUATIONS)), MAX_EVAL_EVERY)
        lines.append(f"--eval-every {later['eval_every']}: about {EVALUATIONS} evaluations in {total} steps")
    return replace(cfg, **later), lines


def _lr_reason(verb: str, width: int, lora: bool) -> str:
    d = defaults_for(verb)
    if width == WIDTH:
        text = f"{verb}'s rate for GPT-2's width {WIDTH}"
    elif width == QUICKSTART:
        text = f"{verb}'s rate for the quickstart model's width {QUICKSTART}"
    else:
        text = (f"{verb}'s rate at width {width}, between {d.lr:g} at {WIDTH} and {d.lr_quickstart:g} at "
                f"{QUICKSTART} (log-linear in width)")
    if _factor(d, lora) != 1.0:
        text += f", x {d.lora_factor:g} for LoRA"
    return text + (f", capped at {d.max_lr:g}" if _width_lr(d, width) * _factor(d, lora) > d.max_lr else "")


def help_texts(verb: str) -> dict[str, str]:
    """--help of the AUTO flags for `verb`, from the table."""
    d = defaults_for(verb)
    epochs = (f"unset: enough passes to see about {d.examples} training examples, {d.min_epochs:g} to "
              f"{d.max_epochs:g} of them; {d.why}" if d.examples else f"unset: {d.min_epochs:g}; {d.why}")
    return {
        "epochs": f"passes over the training data when --max-steps is -1, > 0 ({epochs})",
        "lr": (f"peak learning rate, > 0 (unset: {d.lr:g} for GPT-2's width {WIDTH}, {d.lr_quickstart:g} for the "
               f"quickstart model's {QUICKSTART}, log-linear in width between and beyond, "
               + (f"x {d.lora_factor:g} with --lora, " if d.lora_factor else "") + f"at most {d.max_lr:g})"),
        "warmup_steps": (f"linear warmup steps, >= 0 (unset: {WARMUP_FRACTION:g} x the run's steps; at most a "
                         "tenth of them)"),
        "eval_every": (f"evaluate every N steps, >= 0 (0: only at the end; unset: about {EVALUATIONS} "
                       f"evaluations per run, at most {MAX_EVAL_EVERY} steps apart)"),
    }


def describe(verb: str, n_train: int, lines: list[str]) -> str:
    """The block a run prints at its start (empty when every value was given)."""
    if not lines:
        return ""
    where = f"; gpt2ft {verb} --help explains" if verb in DEFAULTS else ""
    return (f"derived for these {n_train} training examples (pass a flag to choose yourself{where}):\n"
            + "\n".join("  " + line for line in lines))


def settle_run(cfg: TrainConfig, objective, model, world: int) -> tuple[TrainConfig, list[str]]:
    """settle() for the loop: the verb is the objective's name, the width and LoRA the model's."""
    return settle(cfg, objective.name, len(objective.train), model.config.n_embd,
                  getattr(model, "lora_config", None) is not None, world)
