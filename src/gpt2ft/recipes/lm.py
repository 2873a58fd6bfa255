"""Next-token prediction on text: pretraining from scratch and raw-text fine-tuning."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..train import TrainConfig, sequence_length
from ..train.run_folder import open_run
from .common import (Plan, Start, begin, check_start, data_resume_keys, load_for_training, main_first,
                     recipe)


@dataclass
class PretrainConfig:
    """gpt2ft pretrain: a GPT-2 from GPT-2's initialisation on data made by `gpt2ft prepare`."""

    train: TrainConfig
    data: str  # prepared data folder (train.bin, val.bin, meta.json)
    model_config: str = "micro"  # preset name
    n_layer: int | None = None  # overrides of the preset
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    tokenizer: str | None = None  # tokenizer folder (default: the data's)
    sample_prompt: list[str] | None = None


@recipe
def pretrain(cfg: PretrainConfig) -> Plan:
    from ..config import preset
    from ..data.text import read_meta
    from ..model import GPT
    from ..objectives import LanguageModeling
    from ..runtime import seed_everything
    from ..tokenizer import load_tokenizer

    strategy = begin(cfg.train, {"the --data it trains from": cfg.data, "the --tokenizer": cfg.tokenizer})
    run = open_run(cfg.train.out, "pretrain", cfg.train.resume, cfg.train.overwrite)
    meta = read_meta(cfg.data)
    tokenizer = load_tokenizer(cfg.tokenizer or meta["tokenizer"].get("dir"))
    if tokenizer.fingerprint() != meta["tokenizer"]["fingerprint"]:
        raise UserError(f"{cfg.data} was prepared with another tokenizer than {cfg.tokenizer or 'GPT-2 BPE'}; "
                        "prepare it again with --tokenizer, or pass the tokenizer it was made with")
    overrides = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size")}
    config = preset(cfg.model_config, vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                    bos_token_id=tokenizer.eos_id, dropout=cfg.train.dropout, **overrides)
    seed_everything(cfg.train.seed)
    model = GPT(config)
    length = sequence_length(cfg.train, config.block_size)
    objective = LanguageModeling.from_prepared(cfg.data, meta, length, tokenizer, cfg.sample_prompt, "pretrain")
    run_meta = {"objective": "pretrain", "model_config": cfg.model_config,
                "data": os.path.abspath(cfg.data)}  # absolute: the run is read from other directories
    return Plan(model, tokenizer, objective, cfg.train, run_meta,
                data_resume_keys(tokenizer, meta["fingerprint"], length, model), run, strategy)


@dataclass
class FinetuneConfig:
    """gpt2ft finetune: continue training a model on raw text (prepared now if given as text)."""

    train: TrainConfig
    start: Start
    data: str  # prepared data folder, or text file(s)/folder to prepare with the model's tokenizer
    val_fraction: float = 0.1  # held-out share when preparing text
    text_field: str = "text"  # the field of a .jsonl record that holds its text, when preparing
    sample_prompt: list[str] | None = None


@recipe
def finetune(cfg: FinetuneConfig) -> Plan:
    from ..data.text import prepare, read_meta
    from ..objectives import LanguageModeling
    from ..runtime import seed_everything

    for name in ("val_fraction", "text_field"):
        if (Path(cfg.data) / "meta.json").exists() and getattr(cfg, name) != getattr(FinetuneConfig, name):
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} has no effect: {cfg.data} is prepared data, made when it was prepared (pass "
                            f"the text instead, or prepare it again with {flag})")
    strategy = begin(cfg.train, {**cfg.start.inputs(), "the --data it trains from": cfg.data})
    check_start(cfg.start)
    run = open_run(cfg.train.out, "finetune", cfg.train.resume, cfg.train.overwrite)
    seed_everything(cfg.train.seed)
    loaded = load_for_training(cfg.start, cfg.train.dropout)
    model, tokenizer = loaded
    data = Path(cfg.data)
    if not (data / "meta.json").exists():
        data = run.path / "data"
        main_first(strategy, lambda: prepare([cfg.data], data, tokenizer, cfg.val_fraction, text_field=cfg.text_field,
                                            progress=cfg.train.progress)
                   if run.main else None)

    meta = read_meta(data)
    if meta["tokenizer"]["fingerprint"] != tokenizer.fingerprint():
        raise UserError(f"{cfg.data} was prepared with another tokenizer than {cfg.start.model}'s; prepare it "
                        f"again with --tokenizer {loaded.source}")
    length = sequence_length(cfg.train, model.config.block_size)
    objective = LanguageModeling.from_prepared(data, meta, length, tokenizer, cfg.sample_prompt, "finetune")
    run_meta = {"objective": "finetune", "base_model": loaded.base_ref, "data": str(data.resolve())}
    return Plan(model, tokenizer, objective, cfg.train, run_meta,
                data_resume_keys(tokenizer, meta["fingerprint"], length, model, loaded.base_ref), run, strategy)
