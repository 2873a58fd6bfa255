"""Train a GPT-2 from scratch (GPT-2's initialisation) on data made by `gpt2ft prepare`.

    gpt2ft pretrain --model-config micro --data data/shakespeare --out runs/micro --max-steps 500
"""
from __future__ import annotations

import os

from ..argtypes import ranged
from . import add_common, add_training, data_resume_keys, required, train_config


def add_args(p):
    p.add_argument("--model-config", default="micro", help="preset: micro, tiny, small, gpt2, gpt2-medium, ...")
    for name in ("n_layer", "n_head", "n_embd", "block_size"):
        p.add_argument("--" + name.replace("_", "-"), type=ranged(int, 1), default=None,
                       help=f"override the preset's {name} (>= 1)")
    required(p.add_argument("--data", help="prepared data folder (train.bin, val.bin, meta.json)"))
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer folder (default: the data's)")
    add_common(p, model=False)
    add_training(p, lr=1e-3, warmup_steps=100, dropout=0.0)


def run(args):
    from ..config import preset
    from ..data.text import read_meta
    from ..errors import UserError
    from ..model import GPT
    from ..objectives import LanguageModeling
    from ..runtime import seed_everything
    from ..tokenizer import load_tokenizer
    from ..train import open_run, sequence_length, train

    cfg = train_config(args)
    run = open_run(cfg.out, "pretrain", cfg.resume, cfg.overwrite, inputs=(args.data,))
    meta = read_meta(args.data)
    tokenizer = load_tokenizer(args.tokenizer or meta["tokenizer"].get("dir"))
    if tokenizer.fingerprint() != meta["tokenizer"]["fingerprint"]:
        raise UserError(f"{args.data} was prepared with another tokenizer than {args.tokenizer or 'GPT-2 BPE'}; "
                        "prepare it again with --tokenizer, or pass the tokenizer it was made with")
    overrides = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "block_size")}
    config = preset(args.model_config, vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                    bos_token_id=tokenizer.eos_id, dropout=args.dropout, **overrides)
    seed_everything(args.seed)
    model = GPT(config)
    length = sequence_length(cfg, config.block_size)
    objective = LanguageModeling.from_prepared(args.data, meta, length, tokenizer, args.sample_prompt, "pretrain")
    run_meta = {"objective": "pretrain", "model_config": args.model_config,
                "data": os.path.abspath(args.data)}  # absolute: the run is read from other directories
    train(model, tokenizer, objective, cfg, run_meta, data_resume_keys(tokenizer, meta["fingerprint"], length, config),
          run)
    return 0
