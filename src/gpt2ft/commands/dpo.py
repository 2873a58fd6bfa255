"""Preference-tune a model on (prompt, chosen, rejected) pairs: DPO and its relatives.

Data: JSON/JSONL/CSV/hf: rows with `prompt` (or `instruction` + optional `input`), `chosen` and
`rejected`, or TRL's conversational form (messages); --columns maps other names. Prompts are rendered
with the model's saved template, exactly as SFT rendered them.

Losses (--loss): sigmoid (DPO; --label-smoothing makes it cDPO), robust, ipo, hinge, simpo
(reference-free, length-normalised, --gamma) and orpo (reference-free, NLL + --lambda x odds ratio);
--sft-weight adds the chosen answer's NLL (RPO).

Reference (--reference): copy (a frozen copy of the starting model; the default), adapters-off (the
default with --lora: the same weights with the adapters disabled, no second model; when continuing an
adapter with --lora DIR that reference is the base without it, so pass --reference copy to keep the
starting adapter as the reference), or another MODEL.
--precompute-reference computes its log-probs once, caches them in the run folder, and trains
holding the policy only.

    gpt2ft dpo runs/sft --data prefs.jsonl --out runs/dpo
    gpt2ft dpo runs/sft --data prefs.jsonl --lora --out runs/dpo-lora
    gpt2ft dpo runs/sft --data prefs.jsonl --loss simpo --out runs/simpo
"""
from __future__ import annotations

import copy
from pathlib import Path

from . import (add_columns_args, add_common, add_lora, add_training, load_for_training, parse_columns, required,
               save_rejected_and_splits, train_config)

REFERENCE_CACHE = Path("reference_logps") / "logps.pt"  # in the run folder


def add_args(p):
    add_common(p, adapter_flag=False)
    required(p.add_argument("--data", help="preference data (.json, .jsonl, .csv) or hf:DATASET_ID"))
    add_columns_args(p)
    p.add_argument("--template", default=None,
                   help="alpaca|instruction-response|chat|FILE (default: the model's saved template)")
    p.add_argument("--on-invalid", default="error", help="error: stop and list bad pairs; skip: train on the rest")
    g = p.add_argument_group("preference optimisation")
    g.add_argument("--loss", default="sigmoid", help="sigmoid|robust|ipo|hinge|simpo|orpo")
    g.add_argument("--beta", type=float, default=None, help="reward scale / KL strength (default 0.1; simpo 2.0)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="assumed share of flipped labels (cDPO, robust)")
    g.add_argument("--gamma", type=float, default=0.5, help="SimPO's target reward margin")
    g.add_argument("--lambda", dest="lam", type=float, default=0.1, help="ORPO's odds-ratio weight")
    g.add_argument("--sft-weight", type=float, default=0.0, help="add this times the chosen answer's NLL (RPO)")
    g.add_argument("--reference", default=None, metavar="copy|adapters-off|MODEL",
                   help="the frozen reference (default: copy; adapters-off with --lora)")
    g.add_argument("--precompute-reference", action="store_true",
                   help="compute the reference log-probs once, cached in the run folder; train without a reference model")
    g.add_argument("--val-fraction", type=float, default=0.10, help="share of pairs for validation")
    g.add_argument("--test-fraction", type=float, default=0.05, help="share of pairs held out for testing")
    g.add_argument("--eval-samples", type=int, default=3, help="validation prompts generated from at each evaluation")
    add_training(p, lr=5e-5, warmup_steps=10, epochs=1.0, eval_every=50, batch_size=4)
    p.set_defaults(dropout=0.0)  # as TRL: dropout off, so the policy's and reference's log-probs compare
    add_lora(p)


def build_reference(args, loaded, precompute: bool):
    """(the objective's reference, the one to precompute with, its name). When precomputing, the
    objective holds none; the precompute one is a module or (model, 'adapters-off')."""
    from ..checkpoint import load
    from ..errors import UserError
    from ..objectives_pref import ADAPTERS_OFF, PRECOMPUTED, freeze

    model, tokenizer = loaded
    lora = model.lora_config is not None
    kind = args.reference or (ADAPTERS_OFF if lora else "copy")
    if kind == ADAPTERS_OFF:
        if not lora:
            raise UserError("--reference adapters-off needs --lora (there are no adapters to switch off)")
        return (PRECOMPUTED if precompute else ADAPTERS_OFF), (model, ADAPTERS_OFF), ADAPTERS_OFF
    if kind == "copy":  # precomputing runs before any step: the policy itself is the starting model
        return (PRECOMPUTED, model, "copy") if precompute else (freeze(copy.deepcopy(model)), None, "copy")
    other, other_tokenizer = load(kind, device="cpu", dtype="float32", verify=getattr(args, "verify", True))
    if other_tokenizer.fingerprint() != tokenizer.fingerprint():
        raise UserError(f"--reference {kind}: its tokenizer differs from MODEL's; log-probs would not compare")
    other = freeze(other)
    return (PRECOMPUTED if precompute else other), other, str(kind)


def reference_model_ref(ref_name: str, loaded) -> str | None:
    """What `gpt2ft eval` loads as this run's reference: the starting model, its base, or the named MODEL."""
    if ref_name == "none":
        return None
    if ref_name == "copy":
        return loaded.ref
    return loaded.base_ref if ref_name == "adapters-off" else ref_name


def run(args):
    from ..data.preferences import load_pairs
    from ..objectives_pref import PreferenceConfig, PreferenceOptimization, pick_template, weights_fingerprint
    from ..runtime import resolve_device, resolve_dtype, seed_everything
    from ..train import open_run, sequence_length, train

    cfg = train_config(args)
    pref = PreferenceConfig(args.loss, args.beta, args.label_smoothing, args.gamma, args.lam, args.sft_weight)
    # Validate all data before the run folder is claimed and the (slow) model loads.
    pairs, rejected = load_pairs(args.data, args.split, parse_columns(args.columns), args.on_invalid)
    run = open_run(cfg.out, "dpo", cfg.resume, cfg.overwrite, inputs=(args.model, args.data))
    dropped = sum(r["dropped"] for r in rejected)
    train_pairs, val_pairs, _ = save_rejected_and_splits(
        run.path, pairs, rejected,
        f"{len(rejected) - dropped} invalid pair(s) and {dropped} with identical or empty answers", args)

    seed_everything(args.seed)
    loaded = load_for_training(args)
    model, tokenizer = loaded
    template = pick_template(args.template, loaded.template, [p.prompt for p in pairs])
    max_len = sequence_length(cfg, model.config.block_size)
    precompute = args.precompute_reference and not pref.reference_free
    reference, to_precompute, ref_name = (None, None, "none") if pref.reference_free else \
        build_reference(args, loaded, precompute)
    objective = PreferenceOptimization(train_pairs, val_pairs, tokenizer, template, max_len, pref, reference,
                                       sample_prompts=args.eval_samples)
    print(objective.report)
    if precompute:  # before any step, so the policy is still the starting model; then no reference is held
        device = resolve_device(cfg.device)
        adapters_off = isinstance(to_precompute, tuple)
        key = weights_fingerprint(to_precompute[0] if adapters_off else to_precompute, adapters_off)
        objective.precompute_reference(to_precompute, run.path / REFERENCE_CACHE, key, device,
                                       resolve_dtype(cfg.dtype, device), cfg.batch_size)
        del to_precompute  # another MODEL is freed here
    run_meta = {"objective": "dpo", "base_model": loaded.base_ref, "template": template.to_dict(),
                "data": str(args.data), "loss": pref.loss, "beta": pref.beta, "reference": ref_name,
                "reference_model": reference_model_ref(ref_name, loaded), "precomputed_reference": bool(precompute)}
    keys = {"tokenizer": tokenizer.fingerprint(), "data": objective.fingerprint, "max_length": max_len,
            "model": model.config.to_dict(), "preference": {"loss": pref.loss, **pref.loss_kwargs()},
            "reference": ref_name}
    train(model, tokenizer, objective, cfg, run_meta, keys, run)
    return 0
