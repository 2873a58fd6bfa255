"""Preference-tune a model on (prompt, chosen, rejected) pairs: DPO and its relatives.

Data: JSON/JSONL/CSV/hf: rows with `prompt` (or `instruction` + optional `input`), `chosen` and
`rejected`, or TRL's conversational form (messages); --columns maps other names. Prompts are rendered
with the model's saved template, exactly as SFT rendered them.

Losses (--loss): sigmoid (DPO; --label-smoothing makes it cDPO), robust, ipo, hinge, simpo
(reference-free, length-normalised, --gamma) and orpo (reference-free, NLL + --lambda x odds ratio);
--sft-weight adds the chosen answer's NLL (RPO).

Reference (--reference): copy (a frozen copy of the starting model; the default), adapters-off (the
default with --lora: the same weights with the adapters disabled, no second model), or another MODEL.
--precompute-reference computes its log-probs once, caches them in the run folder, and trains
holding the policy only.

    gpt2ft dpo runs/sft --data prefs.jsonl --out runs/dpo
    gpt2ft dpo runs/sft --data prefs.jsonl --lora --out runs/dpo-lora
    gpt2ft dpo runs/sft --data prefs.jsonl --loss simpo --out runs/simpo
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from ..cli import required
from . import add_common, add_lora, add_training, base_model_ref, load_for_training, train_config


def add_args(p):
    add_common(p, adapter_flag=False)
    add_preference_data_args(p)
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
    add_training(p, lr=5e-5, warmup_steps=10, epochs=1.0, eval_every=50, batch_size=4)
    p.set_defaults(dropout=0.0)  # as TRL: dropout off, so the policy's and reference's log-probs compare
    add_lora(p)


def add_preference_data_args(p) -> None:
    required(p.add_argument("--data", help="preference data (.json, .jsonl, .csv) or hf:DATASET_ID"))
    p.add_argument("--split", default="train", help="split of an hf: dataset")
    p.add_argument("--columns", default=None, metavar="MAP",
                   help="field mapping, e.g. prompt=question,chosen=good,rejected=bad")
    p.add_argument("--template", default=None,
                   help="alpaca|instruction-response|chat|FILE (default: the model's saved template)")
    p.add_argument("--on-invalid", default="error", help="error: stop and list bad pairs; skip: train on the rest")


def model_template(name: str | None, model, pairs) -> dict:
    """--template, else the template the model was instruction-tuned with, else SFT's default choice."""
    from ..templates import get_template
    from .sft import choose_template

    if name:
        return get_template(name)
    saved = (getattr(model, "meta", None) or {}).get("template")
    if saved:
        return saved if isinstance(saved, dict) else get_template(str(saved))
    return choose_template(None, [p.record(p.chosen) for p in pairs])


def write_rejected(run_dir: Path, rejected: list[dict], kept: int) -> None:
    from ..checkpoint import atomic_write_text

    if not rejected:
        return
    atomic_write_text(run_dir / "rejected.jsonl", "".join(json.dumps(r) + "\n" for r in rejected))
    dropped = sum(r["dropped"] for r in rejected)
    print(f"left out {len(rejected) - dropped} invalid pair(s) and {dropped} with identical or empty answers, "
          f"kept {kept}; reasons in {run_dir / 'rejected.jsonl'}")


def build_reference(args, model, tokenizer, precompute: bool):
    """(reference for the objective, reference for precomputing, description). The objective's is None
    when precomputing; the precompute one is a module or (model, 'adapters-off')."""
    from ..checkpoint import load
    from ..errors import UserError
    from ..objectives_pref import ADAPTERS_OFF, freeze

    lora = getattr(model, "lora_config", None) is not None
    kind = args.reference or (ADAPTERS_OFF if lora else "copy")
    if kind == ADAPTERS_OFF:
        if not lora:
            raise UserError("--reference adapters-off needs --lora (there are no adapters to switch off)")
        return (None if precompute else ADAPTERS_OFF), (model, ADAPTERS_OFF), ADAPTERS_OFF
    if kind == "copy":  # precomputing runs before any step: the policy itself is the starting model
        return (None, model, "copy") if precompute else (freeze(copy.deepcopy(model)), None, "copy")
    other, other_tokenizer = load(kind, device="cpu", dtype="float32")
    if other_tokenizer.fingerprint() != tokenizer.fingerprint():
        raise UserError(f"--reference {kind}: its tokenizer differs from MODEL's; log-probs would not compare")
    other = freeze(other)
    return (None if precompute else other), other, str(kind)


def reference_model_ref(ref_name: str, model, args) -> str | None:
    """What `gpt2ft eval` loads as this run's reference: the starting model, its base, or the named MODEL."""
    if ref_name == "none":
        return None
    if ref_name == "copy":
        return str(model.source)
    return base_model_ref(model, args) if ref_name == "adapters-off" else ref_name


def is_preference_data(path) -> bool:
    """Whether a data file holds chosen/rejected pairs (its first row has both)."""
    from ..data.preferences import read_rows

    for _, row in read_rows(path, "train", {}):
        return isinstance(row, dict) and "chosen" in row and "rejected" in row
    return False


def run_eval(args, data) -> int:
    """gpt2ft eval MODEL --data PREFS: preference accuracy and mean margin, by likelihood or, with a
    reference (--reference, or the one a DPO checkpoint recorded), by DPO's implicit reward."""
    from ..checkpoint import atomic_write_text, load
    from ..data.preferences import load_pairs
    from ..losses import REFERENCE_FREE
    from ..objectives_pref import score_pairs
    from .evaluate import _print_table
    from .sft import parse_columns

    pairs, rejected = load_pairs(data, args.split, parse_columns(args.columns), args.on_invalid)
    pairs = pairs[: args.max_examples] if args.max_examples else pairs
    loaded = load(args.model, device=args.device, dtype=args.dtype, lora=getattr(args, "lora", None))
    model, tokenizer = loaded
    meta = getattr(model, "meta", None) or {}
    template = model_template(args.template, model, pairs)
    ref_ref = args.reference or (meta.get("reference_model") if meta.get("objective") == "dpo" else None)
    beta = args.beta if args.beta is not None else float(meta.get("beta") or 0.1)
    reference = None
    if ref_ref:
        reference, _ = load(ref_ref, device=args.device, dtype=args.dtype)
    per_token = meta.get("objective") == "dpo" and meta.get("loss") in REFERENCE_FREE  # SimPO's / ORPO's reward
    rows, summary = score_pairs(model, tokenizer, pairs, template, model.config.block_size - 1, reference, beta,
                                args.batch_size, per_token)
    scored_by = "per-token likelihood" if per_token else "likelihood"
    summary.update(model=str(args.model), data=str(data), reference=str(ref_ref) if ref_ref else f"none ({scored_by})",
                   rejected=len(rejected), template=template.get("name"))
    _print_table(summary)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        print(f"wrote {out / 'pairs.jsonl'} and {out / 'summary.json'}")
    return 0


def run(args):
    from ..data.instructions import split_records
    from ..data.preferences import load_pairs
    from ..errors import UserError
    from ..objectives_pref import PreferenceConfig, PreferenceOptimization, weights_fingerprint
    from ..runtime import resolve_device, resolve_dtype, seed_everything
    from ..train import sequence_length, train
    from .sft import parse_columns

    cfg = train_config(args)
    if not cfg.out:
        raise UserError("--out is required: the run folder for checkpoints and logs")
    pref = PreferenceConfig(args.loss, args.beta, args.label_smoothing, args.gamma, args.lam, args.sft_weight)
    # Validate all data before the (slow) model load.
    pairs, rejected = load_pairs(args.data, args.split, parse_columns(args.columns), args.on_invalid)
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_rejected(run_dir, rejected, len(pairs))
    train_pairs, val_pairs, test_pairs = split_records(pairs, args.val_fraction, args.test_fraction, args.seed)
    (run_dir / "splits").mkdir(exist_ok=True)
    from ..checkpoint import atomic_write_text

    for name, part in (("train", train_pairs), ("val", val_pairs), ("test", test_pairs)):
        atomic_write_text(run_dir / "splits" / f"{name}.jsonl", "".join(json.dumps(p.raw) + "\n" for p in part))

    seed_everything(args.seed)
    model, tokenizer = load_for_training(args)
    template = model_template(args.template, model, pairs)
    max_len = sequence_length(cfg, model.config.block_size)
    precompute = args.precompute_reference and not pref.reference_free
    live_ref, pre_ref, ref_name = (None, None, "none") if pref.reference_free else \
        build_reference(args, model, tokenizer, precompute)
    objective = PreferenceOptimization(train_pairs, val_pairs, tokenizer, template, max_len, pref,
                                       reference=live_ref if not precompute else "precomputed")
    print(objective.report)
    if precompute:
        device = resolve_device(cfg.device)
        key = weights_fingerprint(pre_ref[0] if isinstance(pre_ref, tuple) else pre_ref, isinstance(pre_ref, tuple))
        objective.precompute_reference(pre_ref, run_dir / "reference_logps.pt", key, device,
                                       resolve_dtype(cfg.dtype, device), cfg.batch_size)
        if pre_ref is not model and not isinstance(pre_ref, tuple):
            del pre_ref  # another MODEL: free it before training
    run_meta = {"objective": "dpo", "base_model": base_model_ref(model, args), "template": template,
                "data": str(args.data), "loss": pref.loss, "beta": pref.beta, "reference": ref_name,
                "reference_model": reference_model_ref(ref_name, model, args),
                "precomputed_reference": bool(precompute)}
    keys = {"tokenizer": tokenizer.fingerprint(), "data": objective.fingerprint, "max_length": max_len,
            "model": model.config.to_dict(), "preference": {"loss": pref.loss, **pref.loss_kwargs()},
            "reference": ref_name}
    train(model, tokenizer, objective, cfg, run_meta, keys)
    return 0



def pair_row(record, rejected: str) -> dict:
    """A preference row from an instruction record (its answer chosen) and another answer (rejected)."""
    from ..data.instructions import record_to_json

    users = [m for m in record.messages if m["role"] == "user"]
    if len(record.messages) == 2 and len(users) == 1:
        content = users[0]["content"]
        if isinstance(content, dict):
            return {"instruction": content["instruction"], "input": content["input"], "chosen": record.response,
                    "rejected": rejected}
        return {"prompt": content, "chosen": record.response, "rejected": rejected}
    messages = record_to_json(record)["messages"]
    return {"prompt": messages[:-1], "chosen": [messages[-1]], "rejected": [{"role": "assistant", "content": rejected}]}


def run_pairs(args) -> int:
    """gpt2ft data pairs MODEL --data SFT_FILE --out PREFS: the model's own answer becomes `rejected`
    wherever it differs from the reference answer (on-policy pairs)."""
    from ..checkpoint import atomic_write_text, load
    from ..data.instructions import load_records, prompt_text
    from ..errors import UserError
    from ..evaluate import normalize_answer
    from ..generation import generate_batch
    from . import sampling_config
    from .sft import parse_columns

    if not args.data:
        raise UserError("data pairs needs --data: the instruction data whose answers are `chosen`")
    records, _ = load_records(args.data, "auto", args.split, parse_columns(args.columns), args.on_invalid)
    model, tokenizer = load(args.input, device=args.device, dtype=args.dtype)
    template = model_template(args.template or (None if model.meta.get("template") else "alpaca"), model, [])
    sampling = sampling_config(args, list(template.get("stop", [])))
    prompts = [prompt_text(r, template) for r in records]
    limit = model.config.block_size - sampling.max_new_tokens
    kept = [i for i, p in enumerate(prompts) if 0 < len(tokenizer.encode(p)) <= limit]
    model.eval()
    outputs = generate_batch(model, tokenizer, [prompts[i] for i in kept], sampling, args.batch_size)
    rows, same = [], 0
    for i, output in zip(kept, outputs):
        output = output.strip()
        if not output or normalize_answer(output) == normalize_answer(records[i].response):
            same += 1  # the model already gives this answer: no preference to learn
            continue
        rows.append(pair_row(records[i], output))
    atomic_write_text(Path(args.out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} pairs to {args.out}; {same} answers matched the reference (or were empty) and "
          f"{len(records) - len(kept)} prompts were too long for {sampling.max_new_tokens} new tokens")
    return 0
