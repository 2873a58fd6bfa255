"""Preference optimisation (DPO and its relatives) as one more objective of the training loop.

The loss comes from the registry (preference_losses.PREFERENCE_LOSSES); the batch layout it needs from LAYOUTS here
(`pairs`: B chosen rows then the same B prompts with their rejected answers, so one forward pass gives
the per-sequence log-probs of both). The reference is a type (`Reference`):
  FrozenCopy: a frozen copy of the starting model; OtherModel: another model, frozen (both under no_grad);
  AdaptersOff: the policy itself with its LoRA adapters disabled (no second model in memory);
  Precomputed: another reference's log-probs, computed once before training and carried by the batches;
  NoReference: reference-free losses (SimPO, ORPO).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .data.preferences import PreferenceDataset, fingerprint, load_pairs, tokenize_pairs
from .errors import UserError
from .losses import PairLogps, preference_loss, sequence_logps, unwrap
from .objectives import Objective, prompt_cut_warning
from .preference_losses import OPTION_DEFAULTS, PREFERENCE_LOSSES, PreferenceLoss, losses_using
from .templates import pick_template

OPTION_FLAGS = {"beta": "--beta", "label_smoothing": "--label-smoothing", "gamma": "--gamma", "lam": "--lambda"}


@dataclass
class PreferenceConfig:
    """The preference loss and its options. An option left None takes its default (beta's is the loss's);
    one given to a loss that does not take it is refused."""
    loss: str = "sigmoid"
    beta: float | None = None  # reward scale / KL strength
    label_smoothing: float | None = None  # cDPO / robust: assumed share of flipped labels
    gamma: float | None = None  # SimPO's target margin
    lam: float | None = None  # ORPO's odds-ratio weight
    sft_weight: float = 0.0  # RPO: weight of the chosen answer's NLL (any loss)

    def __post_init__(self):
        if self.loss not in PREFERENCE_LOSSES:
            raise UserError(f"--loss must be one of {', '.join(PREFERENCE_LOSSES)}, not {self.loss!r}")
        for option, flag in OPTION_FLAGS.items():
            if getattr(self, option) is not None and option not in self.definition.params:
                raise UserError(f"{flag} does not apply to --loss {self.loss} (only to "
                                f"{', '.join(losses_using(option))}); drop it")
        for option, value in {"beta": self.definition.default_beta, **OPTION_DEFAULTS}.items():
            if getattr(self, option) is None:
                setattr(self, option, value)
        if not self.beta > 0:
            raise UserError(f"--beta must be positive, not {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"--label-smoothing must be in [0, 0.5), not {self.label_smoothing}")
        if not math.isfinite(self.gamma):
            raise UserError(f"--gamma must be a finite number, not {self.gamma}")
        if not (self.sft_weight >= 0 and self.lam >= 0 and math.isfinite(self.sft_weight + self.lam)):
            raise UserError("--sft-weight and --lambda must be finite and >= 0")

    @property
    def definition(self) -> PreferenceLoss:
        return PREFERENCE_LOSSES[self.loss]

    @property
    def reference_free(self) -> bool:
        return not self.definition.needs_reference

    def loss_kwargs(self) -> dict:
        return {"beta": self.beta, "label_smoothing": self.label_smoothing, "gamma": self.gamma, "lam": self.lam,
                "sft_weight": self.sft_weight}


# ----- batch layouts --------------------------------------------------------------------------------
class PairLayout:
    """(prompt, chosen, rejected) pairs; each batch holds B chosen rows, then the same B prompts with their
    rejected answers (TRL's layout: one forward pass serves both). The unit is a pair."""

    name, unit, rows = "pairs", "pairs", 2  # rows: batch rows per example
    read = staticmethod(load_pairs)  # (path, split, columns, on_invalid) -> (pairs, rejected rows)
    tokenize = staticmethod(tokenize_pairs)  # (pairs, template, tokenizer, max_length) -> (tokenized, kept, counts)
    fingerprint = staticmethod(fingerprint)
    dataset = PreferenceDataset  # (tokenized, pad_id) -> .batch(indices); .reference for precomputed log-probs

    @staticmethod
    def prompt(pair) -> list[dict]:
        return pair.prompt

    @staticmethod
    def conversation(pair) -> list[dict]:
        """The prompt and the chosen answer: what the template picker sees (as SFT sees a record)."""
        return [*pair.prompt, {"role": "assistant", "content": pair.chosen}]

    @staticmethod
    def inputs(logps: torch.Tensor, lengths: torch.Tensor, ref: torch.Tensor | None) -> PairLogps:
        B = len(logps) // 2
        refs = (ref[:B], ref[B:]) if ref is not None else (None, None)
        return PairLogps(logps[:B], logps[B:], lengths[:B], lengths[B:], *refs)

    @staticmethod
    def precomputed(batch: dict) -> torch.Tensor | None:
        """(2B,) precomputed reference log-probs in the batch's row order, if the batch carries them."""
        return torch.cat([batch["ref_chosen"], batch["ref_rejected"]]).float() if "ref_chosen" in batch else None

    @staticmethod
    def per_example(logps: torch.Tensor, n: int) -> torch.Tensor:
        """(2n,) row log-probs -> (n, 2): chosen, rejected."""
        return torch.stack([logps[:n], logps[n:]], dim=1)

    @staticmethod
    def metrics(p: PairLogps, out: dict) -> dict:
        """Per-pair metrics the loop sums and logs."""
        chosen, rejected = out["chosen_reward"], out["rejected_reward"]
        margin = chosen - rejected
        metrics = {"reward_chosen": chosen, "reward_rejected": rejected, "reward_margin": margin,
                   "reward_accuracy": (margin > 0).float() + 0.5 * (margin == 0).float(),  # a tie prefers neither
                   "logp_chosen": p.chosen.detach(), "logp_rejected": p.rejected.detach()}
        if p.ref_chosen is not None:  # how far the chosen answers' log-prob moved from the reference's
            metrics["logp_chosen_vs_ref"] = (p.chosen - p.ref_chosen).detach()
        return metrics

    @staticmethod
    def report(n_train: int, n_val: int, counts: dict, max_length: int) -> str:
        return (f"preference data: {n_train} train / {n_val} val pairs; "
                f"{counts['response truncated']} with answers and {counts['prompt truncated']} with prompts "
                f"truncated to {max_length} tokens, {counts['identical after truncation']} dropped "
                "(answers identical after truncation)")

    @staticmethod
    def left_out(rejected: list[dict]) -> str:
        dropped = sum(r["dropped"] for r in rejected)
        return f"{len(rejected) - dropped} invalid pair(s) and {dropped} with identical or empty answers"


PAIRS = PairLayout()
LAYOUTS = {layout.name: layout for layout in (PAIRS,)}  # a loss's PreferenceLoss.layout names one


# ----- references -----------------------------------------------------------------------------------
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


class Reference:
    """Where a batch's reference log-probs come from."""

    name = "none"  # as the run records it (also a resume key)
    model_ref: str | None = None  # what `gpt2ft eval` loads as this run's reference
    uses_policy = False  # computes with the policy's own weights

    def setup(self, place) -> None:
        """Put what it holds where it computes: place(module) returns the module on the training device
        (sharded under FSDP)."""

    def logps(self, policy, batch: dict, layout) -> torch.Tensor | None:
        """Reference log-probs of the batch's rows, in row order (None: no reference)."""
        return None

    def weights_key(self, policy) -> str:
        """Identity of the weights it computes with (the key of a precomputed cache)."""
        raise TypeError(f"the {self.name} reference computes nothing")


class NoReference(Reference):
    """Reference-free losses (SimPO, ORPO)."""


class FrozenModel(Reference):
    """A frozen module beside the policy, run under no_grad."""

    def __init__(self, module: torch.nn.Module, name: str, model_ref: str | None):
        self.module, self.name, self.model_ref = module, name, model_ref

    def setup(self, place) -> None:
        self.module = place(self.module)  # fp32: autocast gives it the policy's compute dtype

    @torch.no_grad()
    def logps(self, policy, batch, layout):
        with evaluating(self.module):
            return sequence_logps(self.module, batch)[0]

    def weights_key(self, policy) -> str:
        return weights_fingerprint(self.module)


class FrozenCopy(FrozenModel):
    """A frozen copy of the starting model (the default without LoRA). shared=True, only to precompute
    before the first step: the policy itself, which then still is the starting model."""

    def __init__(self, model, model_ref: str | None = None, shared: bool = False):
        super().__init__(model if shared else freeze(copy.deepcopy(model)), "copy", model_ref)


class OtherModel(FrozenModel):
    """Another model as the reference (--reference MODEL)."""

    def __init__(self, module, ref: str):
        super().__init__(freeze(module), str(ref), str(ref))


class AdaptersOff(Reference):
    """The policy with its LoRA adapters disabled: its base model, with no second copy in memory."""

    name, uses_policy = "adapters-off", True

    def __init__(self, model_ref: str | None = None):
        self.model_ref = model_ref

    @torch.no_grad()
    def logps(self, policy, batch, layout):
        """Through the policy as the loop calls it (wrapped: DDP, FSDP), so a sharded model gathers its weights."""
        from .lora import disable_adapters

        with evaluating(policy), disable_adapters(unwrap(policy)):
            return sequence_logps(policy, batch)[0]

    def weights_key(self, policy) -> str:
        return weights_fingerprint(policy, adapters_off=True)


class Precomputed(Reference):
    """Another reference's log-probs, computed once before training (precompute_reference) and carried by
    the batches: no reference model is held while training. Recorded under its source's name."""

    def __init__(self, source: Reference):
        self.source, self.name, self.model_ref = source, source.name, source.model_ref

    def logps(self, policy, batch, layout):
        ref = layout.precomputed(batch)
        if ref is None:
            raise RuntimeError("precompute_reference() was not called before training")
        return ref


# ----- the objective --------------------------------------------------------------------------------
class PreferenceOptimization(Objective):
    """A registered preference loss over its layout's examples, against a reference (or none)."""

    name = "dpo"
    best_metric = "val_loss"
    best_mode = "min"
    loss_is_nll = False  # a preference loss: exp() of it is no perplexity

    def __init__(self, train_examples, val_examples, tokenizer, template, max_length: int,
                 config: PreferenceConfig, reference: Reference | None = None, sample_prompts: int = 3):
        self.config, self.layout = config, LAYOUTS[config.definition.layout]
        self.unit = self.layout.unit
        self.reference = reference or NoReference()
        if config.reference_free != isinstance(self.reference, NoReference):
            needs = "takes no reference (it is reference-free)" if config.reference_free else "needs a reference model"
            raise UserError(f"the {config.loss} loss {needs}")
        layout = self.layout
        train, self.train_pairs, train_counts = layout.tokenize(train_examples, template, tokenizer, max_length)
        val, self.val_pairs, val_counts = layout.tokenize(val_examples, template, tokenizer, max_length)
        if not train:
            raise UserError(f"none of the training {layout.unit} fits --max-length {max_length}")
        self.train, self.val = layout.dataset(train, tokenizer.eos_id), layout.dataset(val, tokenizer.eos_id)
        self.fingerprint, self.val_fingerprint = layout.fingerprint(train), layout.fingerprint(val)
        self.sample_prompts = [template.prompt(layout.prompt(p)) for p in self.val_pairs[:sample_prompts]]
        self.report = layout.report(len(train), len(val), {k: train_counts[k] + val_counts[k] for k in train_counts},
                                    max_length)
        self.report += prompt_cut_warning(train_counts["prompt truncated"] + val_counts["prompt truncated"],
                                          len(train_examples) + len(val_examples), max_length)

    def setup(self, model, strategy) -> None:
        self.reference.setup(strategy.place_frozen)

    def count(self, batch: dict) -> int:
        return len(batch["index"])

    def tokens(self, batch: dict) -> int:
        return batch["n_tokens"]

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Summed loss over the batch's examples and summed metrics (the loop divides by their count)."""
        logps, lengths = sequence_logps(model, batch)
        inputs = self.layout.inputs(logps, lengths, self.reference.logps(model, batch, self.layout))
        out = preference_loss(self.config.loss, *inputs, **self.config.loss_kwargs())
        return out["loss"].sum(), {k: float(v.sum()) for k, v in self.layout.metrics(inputs, out).items()}

    # ----- a Precomputed reference ------------------------------------------------------------------
    def precompute_reference(self, policy, path: Path, device, dtype, batch_size: int, log=print) -> None:
        """Fill train.reference / val.reference with the Precomputed reference's source log-probs of every
        example, from the cache at `path` when its key (data fingerprints, the source's weights, dtype)
        matches, else computed and cached. Then the source (another model) is let go."""
        from .fileio import atomic_torch_save

        if not isinstance(self.reference, Precomputed) or self.reference.source is None:
            raise TypeError("precompute_reference() needs a Precomputed reference that was not filled yet")
        source = self.reference.source
        key = {"train": self.fingerprint, "val": self.val_fingerprint, "reference": source.weights_key(policy),
               "dtype": str(dtype)}
        cached = torch.load(path, map_location="cpu") if Path(path).exists() else None
        if cached is not None and cached.get("key") == key:
            log(f"reference log-probs: reusing {path}")
        else:
            log(f"reference log-probs: computing {len(self.train) + len(self.val)} {self.unit} once -> {path}")
            source.setup(lambda module: module.to(device=device, dtype=torch.float32))
            if source.uses_policy:
                policy.to(device)
            cached = {"key": key, **{name: self.compute_reference(source, policy, data, device, dtype, batch_size)
                                     for name, data in (("train", self.train), ("val", self.val))}}
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(cached, Path(path))
        self.train.reference, self.val.reference = cached["train"], cached["val"]
        self.reference.source = None

    @torch.no_grad()
    def compute_reference(self, source: Reference, policy, dataset, device, dtype, batch_size: int) -> torch.Tensor:
        """(N, rows per example) reference log-probs of every example of `dataset`."""
        from .data import to_device

        out = torch.zeros(len(dataset), self.layout.rows)
        autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        with autocast:
            for start in range(0, len(dataset), batch_size):
                idx = list(range(start, min(start + batch_size, len(dataset))))
                batch = to_device({k: v for k, v in dataset.batch(idx).items() if not k.startswith("ref_")}, device)
                out[idx] = self.layout.per_example(source.logps(policy, batch, self.layout).float().cpu(), len(idx))
        return out


# ----- scoring any model on preference data (gpt2ft eval --data PREFS) ------------------------------
@torch.no_grad()
def score_pairs(model, tokenizer, pairs, template, max_length: int, reference=None, beta: float = 0.1,
                batch_size: int = 8, per_token: bool = False) -> tuple[list[dict], dict]:
    """Per-pair log-probs and a summary. preference_accuracy: with a reference, the share of pairs whose
    chosen answer has the higher implicit reward beta * (log p - log p_ref), as DPO defines it; without,
    the higher log-likelihood (per token if per_token, SimPO's and ORPO's reward). Ties count half."""
    from .data import to_device

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


def evaluate_preferences(loaded, pairs, template_name: str | None = None, reference_ref: str | None = None,
                         beta: float | None = None, batch_size: int = 8) -> tuple[list[dict], dict]:
    """`gpt2ft eval MODEL --data PREFS`: score_pairs with the reference given, or else the one a DPO
    checkpoint recorded (and its beta); a SimPO/ORPO checkpoint is scored by its per-token reward."""
    from .checkpoint import load

    model, tokenizer = loaded
    meta = loaded.meta or {}
    dpo_run = meta.get("objective") == "dpo"
    reference_ref = reference_ref or (meta.get("reference_model") if dpo_run else None)
    given_beta, beta = beta, beta if beta is not None else float(meta.get("beta") or 0.1)
    device = next(model.parameters()).device
    reference = load(reference_ref, device=device, dtype=next(model.parameters()).dtype).model if reference_ref else None
    trained_with = PREFERENCE_LOSSES.get(meta.get("loss"))
    per_token = dpo_run and trained_with is not None and not trained_with.needs_reference
    if given_beta is not None and reference is None and not per_token:
        raise UserError(f"--beta {given_beta:g} scales DPO's implicit reward, but these pairs are scored by likelihood "
                        "(no --reference, and the model is no DPO run with one): drop --beta or pass --reference MODEL")
    template = pick_template(template_name, loaded.template, [PAIRS.conversation(p) for p in pairs])
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
        outputs = generate_batch(model, tokenizer, [prompts[i] for i in kept], sampling, batch_size,
                                 progress="pairs")
    rows, same = [], 0
    for i, output in zip(kept, outputs):
        output = output.strip()
        if not output or normalize_answer(output) == normalize_answer(records[i].response):
            same += 1  # the model already gives this answer: no preference to learn
            continue
        rows.append(pair_row(conversations[i], records[i].response, output))
    return rows, {"pairs": len(rows), "same_answer": same, "too_long": len(records) - len(kept)}
