"""Preference optimisation (DPO and its relatives) as one more objective of the training loop.

Each batch holds B chosen rows then the same B prompts with their rejected answers; one forward pass
gives the per-sequence log-probs of both (losses.sequence_logps). The reference is one of:
  a frozen module (a copy of the starting model, or another model), run under no_grad;
  "adapters-off": the policy itself with its LoRA adapters disabled (no second model in memory);
  precomputed: log-probs computed once before training and carried by the batches (no model at all);
  None: reference-free losses (SimPO, ORPO).
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .losses import PREFERENCE_LOSSES, REFERENCE_FREE, preference_loss, sequence_logps, unwrap
from .objectives import Objective

ADAPTERS_OFF = "adapters-off"
PRECOMPUTED = "precomputed"  # filled in by precompute_reference() before training
DEFAULT_BETA = {"simpo": 2.0}  # SimPO's rewards are per-token averages: a larger scale (Meng et al. use 2-2.5)


@dataclass
class PreferenceConfig:
    loss: str = "sigmoid"
    beta: float | None = None  # None: 0.1, or 2.0 for simpo
    label_smoothing: float = 0.0
    gamma: float = 0.5  # SimPO's target margin
    lam: float = 0.1  # ORPO's odds-ratio weight
    sft_weight: float = 0.0  # RPO: weight of the chosen answer's NLL

    def __post_init__(self):
        if self.loss not in PREFERENCE_LOSSES:
            raise UserError(f"--loss must be one of {', '.join(PREFERENCE_LOSSES)}, not {self.loss!r}")
        if self.beta is None:
            self.beta = DEFAULT_BETA.get(self.loss, 0.1)
        if not self.beta > 0:
            raise UserError(f"--beta must be positive, not {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"--label-smoothing must be in [0, 0.5), not {self.label_smoothing}")
        if self.label_smoothing and self.loss not in ("sigmoid", "robust"):
            raise UserError(f"--label-smoothing applies to the sigmoid (cDPO) and robust losses, not {self.loss}")
        if self.sft_weight < 0 or self.lam < 0:
            raise UserError("--sft-weight and --lambda must be >= 0")

    @property
    def reference_free(self) -> bool:
        return self.loss in REFERENCE_FREE

    def loss_kwargs(self) -> dict:
        return {"beta": self.beta, "label_smoothing": self.label_smoothing, "gamma": self.gamma, "lam": self.lam,
                "sft_weight": self.sft_weight}


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """A reference model: eval mode (no dropout), no gradients, ever."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def weights_fingerprint(model, adapters_off: bool = False) -> str:
    """Identity of the weights a reference computes with (LoRA tensors left out when adapters are off)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(unwrap(model).state_dict().items()):
        if adapters_off and "lora_" in name:
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def evaluating(model):
    """Run a training model as a reference: eval mode (no dropout, no checkpointing) for the block."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


class PreferenceOptimization(Objective):
    """DPO-family losses over (prompt, chosen, rejected) pairs; the unit is a pair."""

    name = "dpo"
    unit = "pairs"
    best_metric = "val_loss"
    best_mode = "min"

    def __init__(self, train_pairs, val_pairs, tokenizer, template, max_length: int,
                 config: PreferenceConfig, reference=None, sample_prompts: int = 3):
        """reference: None (reference-free losses), a frozen nn.Module, ADAPTERS_OFF or PRECOMPUTED."""
        from .data.preferences import PreferenceDataset, fingerprint, tokenize_pairs

        self.config = config
        if config.reference_free:
            reference = None
        elif reference is None:
            raise UserError(f"the {config.loss} loss needs a reference model")
        self.reference = reference
        train, self.train_pairs, train_counts = tokenize_pairs(train_pairs, template, tokenizer, max_length)
        val, self.val_pairs, val_counts = tokenize_pairs(val_pairs, template, tokenizer, max_length)
        if not train:
            raise UserError(f"no training pair fits --max-length {max_length}")
        self.train, self.val = PreferenceDataset(train, tokenizer.eos_id), PreferenceDataset(val, tokenizer.eos_id)
        self.fingerprint = fingerprint(train)
        self.val_fingerprint = fingerprint(val)
        self.sample_prompts = [template.prompt(p.prompt) for p in self.val_pairs[:sample_prompts]]
        counts = {k: train_counts[k] + val_counts[k] for k in train_counts}
        self.report = (f"preference data: {len(train)} train / {len(val)} val pairs; "
                       f"{counts['response truncated']} with answers and {counts['prompt truncated']} with prompts "
                       f"truncated to {max_length} tokens, {counts['identical after truncation']} dropped "
                       "(answers identical after truncation)")

    # ----- the protocol ---------------------------------------------------------------------------
    def setup(self, model, device, dtype) -> None:
        if isinstance(self.reference, torch.nn.Module):
            self.reference.to(device=device, dtype=torch.float32)  # autocast gives it the policy's compute dtype

    def count(self, batch: dict) -> int:
        return len(batch["index"])

    def tokens(self, batch: dict) -> int:
        return batch["n_tokens"]

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Summed loss over the batch's pairs and summed metrics (the loop divides by the pair count)."""
        logps, lengths = sequence_logps(model, batch)
        out = self.pair_outputs(logps, lengths, self.reference_logps(model, batch))
        return out.pop("loss").sum(), {k: float(v.sum()) for k, v in out.items()}

    def evaluate(self, model, tokenizer, step: int) -> dict:
        return {}

    # ----- pieces ---------------------------------------------------------------------------------
    def reference_logps(self, model, batch: dict) -> torch.Tensor | None:
        """(2B,) reference log-probs in the batch's row order, or None for reference-free losses."""
        if "ref_chosen" in batch:
            return torch.cat([batch["ref_chosen"], batch["ref_rejected"]]).float()
        if self.reference is None:
            return None
        if self.reference == PRECOMPUTED:
            raise RuntimeError("precompute_reference() was not called before training")
        with torch.no_grad():
            if self.reference == ADAPTERS_OFF:
                from .lora import disable_adapters

                gpt = unwrap(model)
                with evaluating(gpt), disable_adapters(gpt):
                    return sequence_logps(gpt, batch)[0]
            return sequence_logps(self.reference, batch)[0]

    def pair_outputs(self, logps: torch.Tensor, lengths: torch.Tensor, ref: torch.Tensor | None) -> dict:
        """Per-pair loss (B,) and the per-pair metrics the loop sums and logs."""
        B = len(logps) // 2
        ref_c, ref_r = (ref[:B], ref[B:]) if ref is not None else (None, None)
        out = preference_loss(self.config.loss, logps[:B], logps[B:], lengths[:B], lengths[B:], ref_c, ref_r,
                              **self.config.loss_kwargs())
        chosen, rejected = out["chosen_reward"], out["rejected_reward"]
        margin = chosen - rejected
        return {"loss": out["loss"],
                "reward_chosen": chosen, "reward_rejected": rejected, "reward_margin": margin,
                "reward_accuracy": (margin > 0).float() + 0.5 * (margin == 0).float(),  # a tie prefers neither
                "logp_chosen": logps[:B].detach(), "logp_rejected": logps[B:].detach()}

    # ----- --precompute-reference -----------------------------------------------------------------
    def precompute_reference(self, reference, path: Path, reference_key: str, device, dtype,
                             batch_size: int, log=print) -> None:
        """Fill train.reference / val.reference with the reference's log-probs of every pair, from the cache
        at `path` when its key (data fingerprints + reference weights) matches, else computed and cached.
        The objective then holds no reference model. `reference` is a module or (model, ADAPTERS_OFF)."""
        from .fileio import atomic_torch_save

        key = {"train": self.fingerprint, "val": self.val_fingerprint, "reference": reference_key,
               "dtype": str(dtype)}
        cached = torch.load(path, map_location="cpu") if Path(path).exists() else None
        if cached is not None and cached.get("key") == key:
            log(f"reference log-probs: reusing {path}")
        else:
            log(f"reference log-probs: computing {len(self.train) + len(self.val)} pairs once -> {path}")
            cached = {"key": key, "train": self.compute_reference(reference, self.train, device, dtype, batch_size),
                      "val": self.compute_reference(reference, self.val, device, dtype, batch_size)}
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(cached, Path(path))
        self.train.reference, self.val.reference = cached["train"], cached["val"]
        self.reference = None

    @staticmethod
    @torch.no_grad()
    def compute_reference(reference, dataset, device, dtype, batch_size: int) -> torch.Tensor:
        """(N, 2) reference log-probs (chosen, rejected) of every pair of `dataset`."""
        from .data import to_device
        from .lora import disable_adapters

        adapters_off = isinstance(reference, tuple)
        model = (reference[0] if adapters_off else reference).to(device)
        out = torch.zeros(len(dataset), 2)
        autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        with evaluating(model), disable_adapters(model) if adapters_off else contextlib.nullcontext(), autocast:
            for start in range(0, len(dataset), batch_size):
                idx = list(range(start, min(start + batch_size, len(dataset))))
                batch = to_device({k: v for k, v in dataset.batch(idx).items() if not k.startswith("ref_")}, device)
                logps = sequence_logps(model, batch)[0].float().cpu()
                out[idx, 0], out[idx, 1] = logps[:len(idx)], logps[len(idx):]
        return out


# ----- scoring any model on preference data (gpt2ft eval --data PREFS) ------------------------------
@torch.no_grad()
def score_pairs(model, tokenizer, pairs, template, max_length: int, reference=None, beta: float = 0.1,
                batch_size: int = 8, per_token: bool = False) -> tuple[list[dict], dict]:
    """Per-pair log-probs and a summary. preference_accuracy: with a reference, the share of pairs whose
    chosen answer has the higher implicit reward beta * (log p - log p_ref), as DPO defines it; without,
    the higher log-likelihood (per token if per_token, SimPO's and ORPO's reward). Ties count half."""
    from .data import to_device
    from .data.preferences import PreferenceDataset, tokenize_pairs

    tokenized, kept, _ = tokenize_pairs(pairs, template, tokenizer, max_length)
    if not tokenized:
        raise UserError(f"no preference pair fits the model's context of {max_length} tokens")
    data = PreferenceDataset(tokenized, tokenizer.eos_id)
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(data), batch_size):
        idx = list(range(start, min(start + batch_size, len(data))))
        batch = to_device(data.batch(idx), device)
        with evaluating(model):
            logps, lengths = sequence_logps(model, batch)
        ref = None
        if reference is not None:
            with evaluating(reference):
                ref = sequence_logps(reference, batch)[0]
        B = len(idx)
        for j, i in enumerate(idx):
            row = {"where": kept[i].where, "logp_chosen": float(logps[j]), "logp_rejected": float(logps[B + j]),
                   "tokens_chosen": int(lengths[j]), "tokens_rejected": int(lengths[B + j])}
            if ref is not None:
                row["reward_chosen"] = beta * (row["logp_chosen"] - float(ref[j]))
                row["reward_rejected"] = beta * (row["logp_rejected"] - float(ref[B + j]))
            rows.append(row)

    def accuracy(margins):
        return sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(margins)

    likelihood = [r["logp_chosen"] - r["logp_rejected"] for r in rows]
    average = [r["logp_chosen"] / r["tokens_chosen"] - r["logp_rejected"] / r["tokens_rejected"] for r in rows]
    summary = {"pairs": len(rows), "left_out": len(pairs) - len(rows),
               "likelihood_accuracy": accuracy(likelihood), "mean_logp_margin": sum(likelihood) / len(rows),
               "per_token_accuracy": accuracy(average), "mean_per_token_margin": sum(average) / len(rows)}
    if reference is not None:
        rewards = [r["reward_chosen"] - r["reward_rejected"] for r in rows]
        summary.update(preference_accuracy=accuracy(rewards), mean_margin=sum(rewards) / len(rows), beta=beta)
    else:
        kind = "per_token" if per_token else "likelihood"
        summary.update(preference_accuracy=summary[f"{kind}_accuracy"],
                       mean_margin=summary["mean_per_token_margin" if per_token else "mean_logp_margin"])
    return rows, summary


def pick_template(name: str | None, saved, prompts: list[list[dict]]):
    """--template, else the template the model was instruction-tuned with, else SFT's default
    (chat for conversations with a system turn or several turns, alpaca otherwise)."""
    from .templates import get_template

    if name:
        return get_template(name)
    if saved is not None:
        return saved
    multi_turn = any(len(p) > 1 or p[0]["role"] == "system" for p in prompts)
    return get_template("chat" if multi_turn else "alpaca")


def evaluate_preferences(loaded, pairs, template_name: str | None = None, reference_ref: str | None = None,
                         beta: float | None = None, batch_size: int = 8) -> tuple[list[dict], dict]:
    """`gpt2ft eval MODEL --data PREFS`: score_pairs with the reference given, or else the one a DPO
    checkpoint recorded (and its beta); a SimPO/ORPO checkpoint is scored by its per-token reward."""
    from .checkpoint import load

    model, tokenizer = loaded
    meta = loaded.meta or {}
    dpo_run = meta.get("objective") == "dpo"
    reference_ref = reference_ref or (meta.get("reference_model") if dpo_run else None)
    beta = beta if beta is not None else float(meta.get("beta") or 0.1)
    device = next(model.parameters()).device
    reference = load(reference_ref, device=device, dtype=next(model.parameters()).dtype).model if reference_ref else None
    per_token = dpo_run and meta.get("loss") in REFERENCE_FREE
    template = pick_template(template_name, loaded.template, [p.prompt for p in pairs])
    rows, summary = score_pairs(model, tokenizer, pairs, template, model.config.block_size - 1, reference, beta,
                                batch_size, per_token)
    scored_by = "per-token likelihood" if per_token else "likelihood"
    summary.update(reference=str(reference_ref) if reference_ref else f"none ({scored_by})", template=template.name)
    return rows, summary


@torch.no_grad()
def on_policy_pairs(model, tokenizer, records, template, sampling, batch_size: int = 8) -> tuple[list[dict], dict]:
    """`gpt2ft data pairs`: the model answers each instruction record; where its answer differs from the
    record's (after normalising case and punctuation), the record's answer is chosen and the model's is
    rejected. Returns (preference rows, counts)."""
    from .data.preferences import pair_row
    from .evaluate import normalize_answer
    from .generation import generate_batch

    conversations = [r.messages[:-1] for r in records]
    prompts = [template.prompt(c) for c in conversations]
    limit = model.config.block_size - sampling.max_new_tokens
    kept = [i for i, p in enumerate(prompts) if 0 < len(tokenizer.encode(p)) <= limit]
    with evaluating(model):
        outputs = generate_batch(model, tokenizer, [prompts[i] for i in kept], sampling, batch_size)
    model.clear_cache()
    rows, same = [], 0
    for i, output in zip(kept, outputs):
        output = output.strip()
        if not output or normalize_answer(output) == normalize_answer(records[i].response):
            same += 1  # the model already gives this answer: no preference to learn
            continue
        rows.append(pair_row(conversations[i], records[i].response, output))
    return rows, {"pairs": len(rows), "same_answer": same, "too_long": len(records) - len(kept)}
