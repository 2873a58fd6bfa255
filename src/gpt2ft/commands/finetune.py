"""Continue training a model on raw text (style or domain adaptation, e.g. GPT-2 on Shakespeare).
A text file or folder given to --data is prepared on the fly with the model's tokenizer.

    gpt2ft finetune gpt2 --data shakespeare.txt --out runs/gpt2-shakespeare --max-steps 300
    gpt2ft finetune gpt2 --data shakespeare.txt --out runs/lora --lora --lora-r 8
"""
from __future__ import annotations

from pathlib import Path

from ..argtypes import ranged
from . import add_common, add_lora, add_training, data_resume_keys, load_for_training, required, train_config


def add_args(p):
    add_common(p, adapter_flag=False)
    required(p.add_argument("--data", help="prepared data folder, or text file(s)/folder to prepare now"))
    p.add_argument("--val-fraction", type=ranged(float, 0, 1, hi_open=True), default=0.1,
                   help="held-out share when preparing text, in [0, 1)")
    add_training(p, lr=5e-5, warmup_steps=50)
    add_lora(p)


def run(args):
    from ..data.text import prepare, read_meta
    from ..errors import UserError
    from ..objectives import LanguageModeling
    from ..runtime import seed_everything
    from ..train import open_run, sequence_length, train

    cfg = train_config(args)
    run = open_run(cfg.out, "finetune", cfg.resume, cfg.overwrite, inputs=(args.model, args.data))
    seed_everything(args.seed)
    loaded = load_for_training(args)
    model, tokenizer = loaded
    data = Path(args.data)
    if not (data / "meta.json").exists():
        data = Path(cfg.out) / "data"
        prepare([args.data], data, tokenizer, args.val_fraction)
    meta = read_meta(data)
    if meta["tokenizer"]["fingerprint"] != tokenizer.fingerprint():
        raise UserError(f"{args.data} was prepared with another tokenizer than {args.model}'s; prepare it again "
                        f"with --tokenizer {loaded.source}")
    length = sequence_length(cfg, model.config.block_size)
    objective = LanguageModeling.from_prepared(data, meta, length, tokenizer, args.sample_prompt, "finetune")
    run_meta = {"objective": "finetune", "base_model": loaded.base_ref, "data": str(data.resolve())}
    train(model, tokenizer, objective, cfg, run_meta,
          data_resume_keys(tokenizer, meta["fingerprint"], length, model.config), run)
    return 0
