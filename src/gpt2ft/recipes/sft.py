"""Instruction tuning: the loss on response tokens only, in the template the run records."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..templates import pick_template
from ..train import TrainConfig, sequence_length
from ..train.run_folder import open_run
from .common import (Plan, Start, begin, check_start, data_resume_keys, load_for_training, recipe,
                     save_rejected_and_splits, say_template, user_prompts)


@dataclass
class SFTConfig:
    """gpt2ft sft: instruction records -> the response-only loss, validated before the model loads."""

    train: TrainConfig
    start: Start
    data: str  # instruction data file or hf:DATASET_ID
    format: str = "auto"
    split: str = "train"  # split of an hf: dataset
    columns: dict[str, str] = field(default_factory=dict)  # CSV header -> field
    template: str | None = None  # name or file (default: templates.pick_template's choice)
    on_invalid: str = "error"  # error | skip
    train_on_prompt: bool = False
    packing: bool = False
    val_fraction: float = 0.10
    test_fraction: float = 0.05
    oversample_keyword: str | None = None
    factor: float = 3.0
    eval_examples: int = 32
    eval_max_new_tokens: int = 64
    keyword: list[str] | None = None
    sample_prompt: list[str] | None = None  # user messages answered at each evaluation (through the template)


@recipe
def sft(cfg: SFTConfig) -> Plan:
    from ..data.instructions import load_records
    from ..objectives import InstructionTuning
    from ..runtime import seed_everything

    strategy = begin(cfg.train, {**cfg.start.inputs(), "the --data it trains from": cfg.data})
    # Validate all data (and a named template) before the run folder is claimed and the (slow) model loads.
    records, rejected = load_records(cfg.data, cfg.format, cfg.split, cfg.columns, cfg.on_invalid)
    if cfg.template:
        pick_template(cfg.template)
    check_start(cfg.start)
    run = open_run(cfg.train.out, "sft", cfg.train.resume, cfg.train.overwrite)
    train_records, val_records, _ = save_rejected_and_splits(run, records, rejected,
                                                             f"{len(rejected)} invalid record(s)",
                                                             cfg.val_fraction, cfg.test_fraction, cfg.train.seed)
    seed_everything(cfg.train.seed)
    loaded = load_for_training(cfg.start, cfg.train.dropout)
    model, tokenizer = loaded
    template = pick_template(cfg.template, loaded.template, [r.messages for r in records])
    say_template(template, cfg.template, loaded.template)
    max_len = sequence_length(cfg.train, model.config.block_size)
    objective = InstructionTuning(train_records, val_records, tokenizer, template, max_len,
                                  train_on_prompt=cfg.train_on_prompt, packing=cfg.packing,
                                  oversample=(cfg.oversample_keyword, cfg.factor), eval_examples=cfg.eval_examples,
                                  eval_max_new_tokens=cfg.eval_max_new_tokens, keywords=cfg.keyword or [])
    objective.sample_prompts = user_prompts(template, cfg.sample_prompt)
    print(objective.report)
    run_meta = {"objective": "sft", "base_model": loaded.base_ref, "template": template.to_dict(),
                "data": str(cfg.data)}
    return Plan(model, tokenizer, objective, cfg.train, run_meta,
                data_resume_keys(tokenizer, objective.fingerprint, max_len, model, loaded.base_ref,
                                 train_on_prompt=cfg.train_on_prompt, packing=cfg.packing), run, strategy,
                template)
