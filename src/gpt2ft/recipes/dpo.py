"""Preference optimisation: a registered loss (preference_losses.PREFERENCE_LOSSES) over its layout's examples,
against the reference it needs (objectives_pref's Reference types), in the template the run records."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..objectives_pref import (LAYOUTS, AdaptersOff, FrozenCopy, NoReference, OtherModel, Precomputed,
                               PreferenceConfig, PreferenceOptimization, Reference)
from ..templates import pick_template
from ..train import TrainConfig, sequence_length
from ..train.run_folder import open_run
from .common import (Plan, Start, begin, check_start, data_resume_keys, load_for_training, main_first, recipe,
                     save_rejected_and_splits, say_template, user_prompts)

REFERENCE_CACHE = Path("reference_logps") / "logps.pt"  # in the run folder


@dataclass
class DPOConfig:
    """gpt2ft dpo: preference data -> the chosen loss against its reference. A reference flag given to a
    reference-free loss is refused."""

    train: TrainConfig
    start: Start
    data: str  # preference data file or hf:DATASET_ID
    preference: PreferenceConfig
    split: str = "train"
    columns: dict[str, str] = field(default_factory=dict)
    template: str | None = None  # name or file (default: templates.pick_template's choice)
    on_invalid: str = "error"
    reference: str | None = None  # copy | adapters-off | MODEL (default: copy; adapters-off with LoRA)
    precompute_reference: bool = False
    val_fraction: float = 0.10
    test_fraction: float = 0.05
    eval_samples: int = 3
    sample_prompt: list[str] | None = None  # user messages answered at each evaluation (through the template)

    def __post_init__(self):
        loss = self.preference.loss
        for given, flag in ((self.reference is not None, f"--reference {self.reference}"),
                            (self.precompute_reference, "--precompute-reference")):
            if given and self.preference.reference_free:
                raise UserError(f"{flag} does not apply to --loss {loss}: it is reference-free (no reference "
                                "model is used); drop it")


def _copy(cfg: DPOConfig, loaded) -> Reference:  # precomputing runs before any step: the policy itself is the copy
    return FrozenCopy(loaded.model, loaded.ref, shared=cfg.precompute_reference)


def _adapters_off(cfg: DPOConfig, loaded) -> Reference:
    if loaded.model.lora_config is None:
        raise UserError("--reference adapters-off needs --lora (there are no adapters to switch off)")
    return AdaptersOff(loaded.base_ref)


def _other_model(cfg: DPOConfig, loaded) -> Reference:
    from ..checkpoint import load

    other = load(cfg.reference, device="cpu", dtype="float32", verify=cfg.start.verify)
    if other.tokenizer.fingerprint() != loaded.tokenizer.fingerprint():
        raise UserError(f"--reference {cfg.reference}: its tokenizer differs from MODEL's; log-probs would not "
                        "compare")
    return OtherModel(other.model, other.base_ref)  # a local one as the checkpoint it loaded (the resume key)


REFERENCE_KINDS = {"copy": _copy, "adapters-off": _adapters_off}  # any other --reference is a MODEL


def build_reference(cfg: DPOConfig, loaded) -> Reference:
    """The reference the loss needs: --reference (default copy, or adapters-off when the model has
    adapters), Precomputed when --precompute-reference; NoReference for reference-free losses."""
    if cfg.preference.reference_free:
        return NoReference()
    kind = cfg.reference or ("adapters-off" if loaded.model.lora_config is not None else "copy")
    reference = REFERENCE_KINDS.get(kind, _other_model)(cfg, loaded)
    return Precomputed(reference) if cfg.precompute_reference else reference


@recipe
def dpo(cfg: DPOConfig) -> Plan:
    from ..runtime import seed_everything

    reference_model = None if cfg.reference in REFERENCE_KINDS else cfg.reference
    strategy = begin(cfg.train, {**cfg.start.inputs(), "the --data it trains from": cfg.data,
                                      "the --reference model": reference_model})
    layout = LAYOUTS[cfg.preference.definition.layout]
    # Validate all data (and a named template) before the run folder is claimed and the (slow) model loads.
    examples, rejected = layout.read(cfg.data, cfg.split, cfg.columns, cfg.on_invalid)
    if cfg.template:
        pick_template(cfg.template)
    check_start(cfg.start)
    run = open_run(cfg.train.out, "dpo", cfg.train.resume, cfg.train.overwrite)
    train_examples, val_examples, _ = save_rejected_and_splits(run, examples, rejected, layout.left_out(rejected),
                                                               cfg.val_fraction, cfg.test_fraction, cfg.train.seed)
    seed_everything(cfg.train.seed)
    loaded = load_for_training(cfg.start, cfg.train.dropout)
    model, tokenizer = loaded
    template = pick_template(cfg.template, loaded.template, [layout.conversation(e) for e in examples])
    say_template(template, cfg.template, loaded.template)
    max_len = sequence_length(cfg.train, model.config.block_size)
    reference = build_reference(cfg, loaded)
    pref = cfg.preference
    objective = PreferenceOptimization(train_examples, val_examples, tokenizer, template, max_len, pref, reference,
                                       sample_prompts=cfg.eval_samples)
    objective.sample_prompts += user_prompts(template, cfg.sample_prompt)
    print(objective.report)
    precomputed = isinstance(reference, Precomputed)
    if precomputed:  # before any step, so the policy is still the starting model; then no reference is held
        main_first(strategy, lambda: objective.precompute_reference(model, run.path / REFERENCE_CACHE, strategy.device,
                                                                    strategy.dtype, cfg.train.batch_size))
    run_meta = {"objective": "dpo", "base_model": loaded.base_ref, "template": template.to_dict(),
                "data": str(cfg.data), "loss": pref.loss, "beta": pref.beta, "reference": reference.name,
                "reference_model": reference.model_ref, "precomputed_reference": precomputed}
    keys = {**data_resume_keys(tokenizer, objective.fingerprint, max_len, model, loaded.base_ref),
            "preference": {"loss": pref.loss, **pref.loss_kwargs()}, "reference": reference.name}
    return Plan(model, tokenizer, objective, cfg.train, run_meta, keys, run, strategy, template)
