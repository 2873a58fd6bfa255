"""Recipes: for each training verb, one function that builds what the loop needs from a typed config —
the model with its adapters, the tokenizer, the objective, the template, the reference, the resume keys
and the run metadata — in a run folder opened once, on a device resolved once. A verb parses its flags
into the config and calls `recipe(config).train()`.

    common.py  Start (the model and its adapters), Plan, the checks made before anything is written
    lm.py      pretrain, finetune
    sft.py     sft
    dpo.py     dpo (the loss from the registry, the reference as a type)
"""
from .common import Plan, Start, load_for_training
from .dpo import DPOConfig, dpo
from .lm import FinetuneConfig, PretrainConfig, finetune, pretrain
from .sft import SFTConfig, sft

__all__ = ["Plan", "Start", "load_for_training", "PretrainConfig", "pretrain", "FinetuneConfig", "finetune",
           "SFTConfig", "sft", "DPOConfig", "dpo"]
