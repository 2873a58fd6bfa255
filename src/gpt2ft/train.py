"""The one training loop, for every objective (pretrain, finetune, sft, dpo; with or without LoRA).

Reads top to bottom: set up -> resume -> for each step: LR, micro-batches (exact per-token
accumulation), clip, skip non-finite updates, step -> log -> evaluate -> save. Exact resume restores
weights, optimizer, RNG states and the data position, so a killed run ends bitwise-equal on CPU.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import (TRAIN_STATE_FILE, atomic_torch_save, atomic_write_text, commit_checkpoint,
                         run_checkpoints, verify_checkpoint, write_model_files)
from .data import to_device
from .errors import UserError
from .objectives import Objective
from .runtime import resolve_device, resolve_dtype


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Options shared by every training verb (flags and YAML keys of the same names)."""

    out: str | None = _f(None, "run folder: checkpoints, metrics.jsonl, config.yaml, plots")
    max_steps: int = _f(-1, "optimizer steps (-1: derive from --epochs)")
    epochs: float = _f(1.0, "passes over the training data when --max-steps is -1")
    batch_size: int = _f(8, "micro-batch size (sequences per forward pass, per process)")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step")
    max_length: int | None = _f(None, "sequence length in tokens (default: the model's context)")
    lr: float = _f(3e-4, "peak learning rate")
    min_lr: float | None = _f(None, "final learning rate of the cosine schedule (default: lr/10)")
    warmup_steps: int = _f(100, "linear warmup steps (capped at a tenth of the run)")
    weight_decay: float = _f(0.1, "AdamW weight decay (not on biases, norms and embeddings)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    dropout: float | None = _f(None, "override the model's dropout")
    eval_every: int = _f(100, "evaluate every N steps (0: only at the end)")
    eval_batches: int = _f(20, "validation micro-batches per evaluation")
    save_every: int = _f(500, "save a checkpoint every N steps (and always at the end)")
    keep_last: int = _f(2, "checkpoints to keep besides best/")
    patience: int = _f(0, "stop after N evaluations without a better val loss (0: never)")
    log_every: int = _f(10, "write metrics every N steps")
    seed: int = _f(1337, "seed for initialisation, data order and dropout")
    resume: str | None = _f(None, "'auto' (newest good checkpoint in --out) or a checkpoint folder")
    force_resume: bool = _f(False, "resume even if batch size, data or tokenizer changed")
    device: str = _f("auto", "auto|cpu|cuda|mps")
    dtype: str = _f("auto", "auto (bf16 autocast on GPUs, fp32 on CPU)|float32|bfloat16|float16")
    compile: bool = _f(False, "torch.compile the model")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    max_bad_steps: int = _f(5, "stop after this many non-finite steps in a row")
    sample_tokens: int = _f(40, "tokens per sample generation at each evaluation")
    progress: bool = _f(True, "show a progress bar")


@dataclass
class TrainState:
    """Everything besides weights and optimizer that exact resume needs."""

    step: int = 0
    epoch: int = 0
    offset: int = 0
    tokens_seen: int = 0
    best_val: float = math.inf
    evals_since_best: int = 0
    skipped_steps: int = 0


# ----- pieces the loop uses ------------------------------------------------------------------
def sequence_length(cfg: TrainConfig, context: int) -> int:
    """--max-length, capped at the model's context (which it defaults to)."""
    return min(cfg.max_length or context, context)


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step."""
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    warmup = min(cfg.warmup_steps, max(total // 10, 0))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (not biases, LayerNorms, embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.dim() >= 2 and "wte" not in name and "wpe" not in name
        (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:  # one fused kernel: on CPU too it is several times faster than the foreach default
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def order_for_epoch(n: int, epoch: int, seed: int, weights: torch.Tensor | None) -> torch.Tensor:
    """The data order of an epoch, a function of (seed, epoch) only, so resume needs no sampler state."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    if weights is not None:
        return torch.multinomial(weights, n, replacement=True, generator=g)
    return torch.randperm(n, generator=g)


def next_indices(state: TrainState, n: int, count: int, seed: int, weights) -> list[int]:
    """The next `count` example indices, continuing into the next epoch when one runs out."""
    out: list[int] = []
    order = order_for_epoch(n, state.epoch, seed, weights)
    while len(out) < count:
        take = order[state.offset: state.offset + count - len(out)].tolist()
        out += take
        state.offset += len(take)
        if state.offset >= n:
            state.epoch, state.offset = state.epoch + 1, 0
            order = order_for_epoch(n, state.epoch, seed, weights)
    return out


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopSignals:
    """SIGINT/SIGTERM ask the loop to finish its step, save and exit 130/143; a second Ctrl-C aborts."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now; saved checkpoints are atomic
        self.received = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step, then saving", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    @property
    def exit_code(self) -> int:
        return 128 + int(self.received)


class Distributed:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1), else a single process."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1:
            import torch.distributed as dist

            if device.type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


# ----- checkpoints ---------------------------------------------------------------------------
def _link(run_dir: Path, name: str, target: Path) -> None:
    """Point run_dir/name at target (relative symlink, replaced atomically)."""
    tmp = run_dir / f".tmp-link-{name}"
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, run_dir), tmp)
    os.replace(tmp, run_dir / name)


def save_checkpoint(run_dir: Path, model, tokenizer, meta: dict, trainer_state: dict, keep_last: int,
                    best: bool) -> Path:
    """Write checkpoints/step-N atomically, update latest (and best), then rotate old ones."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise UserError(f"refusing to save non-finite weights ({name}); the last good checkpoint is "
                            f"{run_dir / 'latest'}")
    root = run_dir / "checkpoints"
    final = root / f"step-{trainer_state['state']['step']:08d}"
    tmp = root / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if getattr(model, "lora_config", None) is not None:
        from .lora import write_adapter_files

        write_adapter_files(tmp, model, tokenizer, meta)
    else:
        write_model_files(tmp, model, tokenizer, meta)
    atomic_torch_save(trainer_state, tmp / TRAIN_STATE_FILE)
    commit_checkpoint(tmp, final)
    _link(run_dir, "latest", final)
    if best:
        _link(run_dir, "best", final)
    best_target = (run_dir / "best").resolve() if (run_dir / "best").exists() else None
    for old in run_checkpoints(run_dir)[max(keep_last, 1):]:
        if old.resolve() != best_target:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_resume_state(run_dir: Path, resume: str, log) -> tuple[Path, dict] | None:
    """The checkpoint to resume from and its trainer state; auto skips corrupt ones with a log line."""
    if resume == "auto":
        candidates = run_checkpoints(run_dir)
        if not candidates:
            log(f"--resume auto: no checkpoint in {run_dir}, starting fresh")
            return None
    else:
        candidates = [Path(resume)]
    for folder in candidates:
        problem = verify_checkpoint(folder) if (folder / TRAIN_STATE_FILE).exists() or resume == "auto" \
            else f"no {TRAIN_STATE_FILE} (not a training checkpoint)"
        if problem is None:
            try:
                return folder, torch.load(folder / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unreadable state counts as corrupt
                problem = f"unreadable {TRAIN_STATE_FILE} ({type(e).__name__})"
        if resume != "auto":
            raise UserError(f"--resume {folder}: cannot resume from it: {problem}")
        log(f"--resume auto: skipping {folder}: {problem}")
    raise UserError(f"--resume auto: no intact checkpoint in {run_dir / 'checkpoints'}")


def check_resume_keys(saved: dict, current: dict, force: bool) -> None:
    diffs = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
             if saved.get(k) != current.get(k)]
    if diffs and not force:
        raise UserError("the run changed since its checkpoint (" + "; ".join(diffs) +
                        "); pass --force-resume to resume anyway, or use a new --out")


def restore_weights(model, folder: Path) -> None:
    if getattr(model, "lora_config", None) is not None:
        from .lora import load_adapter_weights

        load_adapter_weights(model, folder)
    else:
        from .checkpoint import load_hf_state_dict, read_weights

        load_hf_state_dict(model, read_weights(folder), str(folder))


def accumulate_gradients(model, objective: Objective, micro: list[dict], units: float, world: int, device,
                         autocast=contextlib.nullcontext, scaler=None) -> float:
    """Backward over micro-batches so the gradient is that of the mean over all `units` (tokens,
    pairs) of the global batch, however they fall into micro-batches and processes. Returns the
    summed loss."""
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    total = 0.0
    for a, batch in enumerate(micro):
        batch = to_device(batch, device)
        with contextlib.nullcontext() if a == len(micro) - 1 else no_sync():  # DDP: all-reduce once
            with autocast():
                loss_sum, _ = objective.loss_sum(model, batch)
            loss = loss_sum * (world / max(units, 1))  # DDP averages over ranks; undo that
            (scaler.scale(loss) if scaler else loss).backward()
        total += float(loss_sum.detach())
    return total


# ----- evaluation ----------------------------------------------------------------------------
@torch.no_grad()
def evaluate_loss(model, objective: Objective, cfg: TrainConfig, device, autocast) -> float | None:
    if objective.val is None or len(objective.val) == 0:
        return None
    model.eval()
    n = min(len(objective.val), cfg.eval_batches * cfg.batch_size)
    total, units = 0.0, 0
    for start in range(0, n, cfg.batch_size):
        batch = to_device(objective.val.batch(list(range(start, min(start + cfg.batch_size, n)))), device)
        with autocast():
            loss, count = objective.loss_sum(model, batch)
        total, units = total + float(loss), units + count
    model.train()
    return total / max(units, 1)


@torch.no_grad()
def sample_generations(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[dict]:
    from .generation import SamplingConfig, generate_batch

    if not prompts:
        return []
    model.eval()
    max_new_tokens = min(max_new_tokens, model.config.block_size // 2)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, seed=0)
    limit = model.config.block_size - max_new_tokens
    usable = [p for p in prompts if 0 < len(tokenizer.encode(p)) <= limit]
    outputs = generate_batch(model, tokenizer, usable, cfg) if usable else []
    model.clear_cache()
    model.train()
    return [{"prompt": p, "output": o} for p, o in zip(usable, outputs)]


# ----- the loop ------------------------------------------------------------------------------
def train(model, tokenizer, objective: Objective, cfg: TrainConfig, meta: dict, resume_keys: dict) -> Path:
    """Train `model` on `objective`; checkpoints and logs go to cfg.out. Returns the final checkpoint."""
    if not cfg.out:
        raise UserError("--out is required: the run folder for checkpoints and logs")
    for name in ("batch_size", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.lr <= 0 or not math.isfinite(cfg.lr):
        raise UserError(f"--lr must be a positive number, not {cfg.lr}")
    run_dir = Path(cfg.out)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    dist = Distributed(device)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if dist.main else (lambda msg: None)
    if len(objective.train) == 0:
        raise UserError("the training set is empty (is --max-length larger than the data?)")

    run_dir.mkdir(parents=True, exist_ok=True)
    for leftover in list(run_dir.glob(".tmp-*")) + list((run_dir / "checkpoints").glob(".tmp-*")):
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()

    torch.manual_seed(cfg.seed)
    model.to(device=device, dtype=torch.float32)  # master weights in fp32; autocast does the rest
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.train()
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    state = TrainState()
    resume_keys = {**resume_keys, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                   "world_size": dist.world}

    resumed = load_resume_state(run_dir, cfg.resume, log) if cfg.resume else None
    if resumed:
        folder, saved = resumed
        check_resume_keys(saved["resume_keys"], resume_keys, cfg.force_resume)
        restore_weights(model, folder)
        optimizer.load_state_dict(saved["optimizer"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        state = TrainState(**saved["state"])
        set_rng_state(saved["rng"])
        log(f"resumed from {folder} at step {state.step}")
    if dist.main:
        _truncate_metrics(run_dir / "metrics.jsonl", state.step)
        atomic_write_text(run_dir / "config.yaml", _config_yaml(cfg, meta))

    global_batch = cfg.batch_size * cfg.grad_accum * dist.world
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * len(objective.train) / global_batch))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"training {trainable:,} parameters for {total} steps of {global_batch} sequences "
        f"({len(objective.train)} training examples) on {device}, {str(dtype).removeprefix('torch.')}")
    if dist.main:
        log("config: " + json.dumps({k: v for k, v in asdict(cfg).items()}, default=str))

    wrapped = model
    if cfg.compile:
        wrapped = torch.compile(model)
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(wrapped, device_ids=[device.index] if device.type == "cuda" else None)

    def autocast():
        if device.type == "cpu" and dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def checkpoint_now(best: bool) -> Path:
        trainer_state = {"state": asdict(state), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict() if scaler else None, "rng": rng_state(),
                         "resume_keys": resume_keys, "config": asdict(cfg),
                         "versions": {"torch": str(torch.__version__)}}
        saved_meta = {**meta, "step": state.step, "tokens_seen": state.tokens_seen}
        return save_checkpoint(run_dir, model, tokenizer, saved_meta, trainer_state, cfg.keep_last, best)

    writer = _tensorboard(run_dir) if dist.main else None
    metrics = open(run_dir / "metrics.jsonl", "a") if dist.main else None
    bar = _progress(total, state.step, cfg.progress and dist.main)
    last_saved: Path | None = run_checkpoints(run_dir)[0] if resumed else None
    bad_in_a_row, started, window_tokens, window_start = 0, time.time(), 0, time.time()
    stopped_early = False

    if state.step == 0 and dist.main:  # the starting point of the loss curves
        initial = evaluate_loss(model, objective, cfg, device, autocast)
        if initial is not None:
            metrics.write(json.dumps({"step": 0, "tokens_seen": 0, "val_loss": initial,
                                      "val_ppl": math.exp(min(initial, 50))}) + "\n")
            log(f"step 0: val_loss {initial:.4f}")

    with StopSignals() as signals:
        while state.step < total:
            # --- one optimizer step over grad_accum micro-batches ---
            lr = lr_at(state.step, cfg, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            indices = next_indices(state, len(objective.train), global_batch, cfg.seed, objective.weights)
            micro = []
            for a in range(cfg.grad_accum):
                start = (a * dist.world + dist.rank) * cfg.batch_size
                micro.append(objective.train.batch(indices[start:start + cfg.batch_size]))
            units = dist.sum(sum(objective.count(b) for b in micro))  # global normaliser: exact per unit
            try:
                loss_total = accumulate_gradients(wrapped, objective, micro, units, dist.world, device,
                                                  autocast, scaler)
            except torch.OutOfMemoryError:
                raise UserError(f"out of memory at --batch-size {cfg.batch_size} and length "
                                f"{micro[0]['input_ids'].shape[1]}: lower --batch-size and raise --grad-accum "
                                "to keep the global batch, lower --max-length, or add --gradient-checkpointing") from None
            if scaler:
                scaler.unscale_(optimizer)
            params = [p for p in model.parameters() if p.requires_grad]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
            train_loss = dist.sum(loss_total) / max(units, 1)
            step_tokens = int(dist.sum(sum(objective.tokens(b) for b in micro)))
            state.tokens_seen += step_tokens
            window_tokens += step_tokens

            if not (math.isfinite(train_loss) and math.isfinite(grad_norm)) and scaler is None:
                optimizer.zero_grad(set_to_none=True)  # skip: weights and optimizer stay as they were
                state.skipped_steps += 1
                bad_in_a_row += 1
                log(f"step {state.step + 1}: non-finite loss/gradient (loss={train_loss}, grad_norm={grad_norm}); "
                    f"update skipped ({state.skipped_steps} so far)")
                if bad_in_a_row >= cfg.max_bad_steps:
                    good = last_saved or "none yet"
                    raise UserError(f"{bad_in_a_row} non-finite steps in a row at step {state.step + 1}; stopping. "
                                    f"Last good checkpoint: {good}. Lower --lr or check the data")
            else:
                bad_in_a_row = 0
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.step += 1

            # --- log ---
            record = None
            if state.step % cfg.log_every == 0 or state.step == total:
                elapsed = time.time() - window_start
                record = {"step": state.step, "epoch": state.epoch + state.offset / len(objective.train),
                          "train_loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                          "tokens_seen": state.tokens_seen, "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                          "skipped_steps": state.skipped_steps, "elapsed_s": time.time() - started}
                window_tokens, window_start = 0, time.time()
            if bar is not None:
                bar.update(1)
                if record:
                    bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                                    refresh=False)

            # --- evaluate ---
            is_last = state.step == total
            best = False
            if (cfg.eval_every and state.step % cfg.eval_every == 0) or is_last:
                record = record or {"step": state.step, "tokens_seen": state.tokens_seen}
                val_loss = evaluate_loss(model, objective, cfg, device, autocast)
                if val_loss is not None:
                    record.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)))
                    if val_loss < state.best_val:
                        state.best_val, state.evals_since_best, best = val_loss, 0, True
                    else:
                        state.evals_since_best += 1
                if dist.main:
                    record.update(objective.evaluate(model, tokenizer, state.step))
                    samples = sample_generations(model, tokenizer, objective.sample_prompts, cfg.sample_tokens)
                    if samples:
                        with open(run_dir / "samples.jsonl", "a") as f:
                            f.write(json.dumps({"step": state.step, "samples": samples}) + "\n")
                    shown = {k: round(v, 4) for k, v in record.items() if k.startswith("val")}
                    (bar.write if bar is not None else log)(f"step {state.step}: {shown}")
                if cfg.patience and state.evals_since_best >= cfg.patience:
                    log(f"early stopping: val loss has not improved for {cfg.patience} evaluations "
                        f"(best {state.best_val:.4f})")
                    stopped_early = True
            if record and dist.main:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if writer:
                    for k, v in record.items():
                        if k != "step" and isinstance(v, (int, float)):
                            writer.add_scalar(k, v, state.step)

            # --- save ---
            if best or is_last or stopped_early or signals.received or (cfg.save_every and state.step % cfg.save_every == 0):
                if dist.main:
                    last_saved = checkpoint_now(best)
                dist.barrier()
            if signals.received:
                log(f"stopped at step {state.step}; checkpoint {last_saved}; continue with --resume auto")
                _close(bar, metrics, writer, dist)
                raise SystemExit(signals.exit_code)
            if stopped_early:
                break
    _close(bar, metrics, writer, dist)
    if dist.main:
        log(f"done: {state.step} steps, best val loss {state.best_val:.4f}; checkpoints in {run_dir}")
    return last_saved


def _close(bar, metrics, writer, dist) -> None:
    if bar is not None:
        bar.close()
    if metrics is not None:
        metrics.close()
    if writer is not None:
        writer.close()
    dist.close()


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop logged lines from steps after the checkpoint (they will be logged again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _config_yaml(cfg: TrainConfig, meta: dict) -> str:
    import yaml

    return yaml.safe_dump({"train": asdict(cfg), "run": meta}, sort_keys=False)
