"""Preference-tune a model on (prompt, chosen, rejected) pairs: DPO and its relatives.

Data: JSON/JSONL/CSV/hf: rows with `prompt` (or `instruction` + optional `input`), `chosen` and
`rejected`, or TRL's conversational form (messages); --columns maps other names. Prompts are rendered
with the model's saved template, exactly as SFT rendered them.

Losses (--loss, from the registry gpt2ft.preference_losses): sigmoid (DPO; --label-smoothing makes
it cDPO), robust, ipo, hinge, simpo (reference-free, length-normalised, --gamma) and orpo (reference-free,
NLL + --lambda x odds ratio); --sft-weight adds the chosen answer's NLL (RPO). A flag that does not apply
to the chosen loss (--gamma with sigmoid, --reference with orpo, ...) is refused.

Reference (--reference, for the losses that use one): copy (a frozen copy of the starting model; the
default), adapters-off (the default with --lora: the same weights with the adapters disabled, no second
model; when continuing an adapter with --lora DIR that reference is the base without it, so pass
--reference copy to keep the starting adapter as the reference), or another MODEL.
--precompute-reference computes its log-probs once, caches them in the run folder, and trains
holding the policy only.

    gpt2ft dpo runs/sft --data prefs.jsonl --out runs/dpo
    gpt2ft dpo runs/sft --data prefs.jsonl --lora --out runs/dpo-lora
    gpt2ft dpo runs/sft --data prefs.jsonl --loss simpo --out runs/simpo
"""
from __future__ import annotations

from ..argtypes import ranged
from . import (add_columns_args, add_common, add_lora, add_on_invalid, add_template, add_training, parse_columns,
               path_option, recipe_config, refuse_given, required, train_plan)


def add_args(p):
    from ..preference_losses import PREFERENCE_LOSSES, losses_using

    add_common(p, adapter_flag=False)
    path_option(required(p.add_argument("--data", help="preference data (.json, .jsonl, .csv) or hf:DATASET_ID")))
    add_columns_args(p)
    add_template(p, "prompts")
    add_on_invalid(p, "pairs", "train on the rest")
    g = p.add_argument_group("preference optimisation")
    losses = PREFERENCE_LOSSES.values()
    g.add_argument("--loss", default="sigmoid", choices=list(PREFERENCE_LOSSES),
                   help="; ".join(f"{loss.name}: {loss.help}" for loss in losses))
    betas = "".join(f", {loss.name} {loss.default_beta}" for loss in losses
                    if "beta" in loss.params and loss.default_beta != 0.1)

    def only(option: str) -> str:
        return f"for {', '.join(losses_using(option))}"

    g.add_argument("--beta", type=float, default=None,
                   help=f"reward scale / KL strength, > 0 (unset: 0.1{betas}; {only('beta')})")
    g.add_argument("--label-smoothing", type=float, default=None,
                   help=f"assumed share of flipped labels, in [0, 0.5) (unset: 0; {only('label_smoothing')})")
    g.add_argument("--gamma", type=float, default=None,
                   help=f"SimPO's target reward margin (unset: 0.5; {only('gamma')})")
    g.add_argument("--lambda", dest="lam", type=float, default=None,
                   help=f"ORPO's odds-ratio weight, >= 0 (unset: 0.1; {only('lam')})")
    g.add_argument("--sft-weight", type=float, default=0.0, help="add this times the chosen answer's NLL (RPO)")
    path_option(g.add_argument("--reference", default=None, metavar="copy|adapters-off|MODEL",
                               help="the frozen reference (unset: copy; adapters-off with --lora; for the losses "
                                    "with a reference)"), ("copy", "adapters-off"), model=True)
    g.add_argument("--precompute-reference", action="store_true",
                   help="compute the reference log-probs once, cached in the run folder; train without a reference "
                        "model (for the losses with a reference)")
    g.add_argument("--val-fraction", type=ranged(float, 0, 1, hi_open=True), default=0.10,
                   help="share of pairs for validation, in [0, 1)")
    g.add_argument("--test-fraction", type=ranged(float, 0, 1, hi_open=True), default=0.05,
                   help="share of pairs held out for testing, in [0, 1)")
    g.add_argument("--eval-samples", type=ranged(int, 0), default=3,
                   help="validation prompts generated from at each evaluation, >= 0")
    add_training(p, "dpo", batch_size=4)
    p.set_defaults(dropout=0.0)  # as TRL: dropout off, so the policy's and reference's log-probs compare
    add_lora(p)


def run(args):
    from ..recipes import DPOConfig, dpo

    if args.val_fraction == 0:
        refuse_given(args, {"eval_batches", "eval_samples"}, "with --val-fraction 0 (no validation pairs)")
    if not args.sample_prompt and args.eval_samples == 0:
        refuse_given(args, {"sample_tokens"}, "with --eval-samples 0 and no --sample-prompt (nothing is sampled)")
    return train_plan(dpo(recipe_config(DPOConfig, args, columns=parse_columns(args.columns))), args)
