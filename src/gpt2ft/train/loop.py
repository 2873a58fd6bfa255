"""The one training loop. Reads top to bottom: set up -> resume -> for each step: LR, micro-batches
(exact per-unit accumulation), clip, skip non-finite updates, step -> log -> evaluate -> save.
What differs between verbs is the objective (objectives.py): its data, loss and metrics."""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..data import to_device
from ..errors import UserError
from ..generation import SamplingConfig, fits_context, generate_batch
from ..losses import perplexity
from ..objectives import Objective
from ..runtime import freed_memory_kept, resolve_device, resolve_dtype
from .config import TrainConfig, TrainState
from .distributed import Distributed
from .metrics import MetricsLog
from .run_folder import RunFolder, open_run
from .state import check_resume_keys, lr_at, next_indices, rng_state, set_rng_state


def train(model, tokenizer, objective: Objective, cfg: TrainConfig, meta: dict, resume_keys: dict,
          run: RunFolder | None = None, device: torch.device | None = None,
          dtype: torch.dtype | None = None) -> Path | None:
    """Train `model` on `objective`; checkpoints and logs go to the run folder cfg.out. A recipe hands over
    the run folder it opened and the device and dtype it resolved; without them, train() does both.
    Returns the last checkpoint saved."""
    run = run or open_run(cfg.out, meta.get("objective") or objective.name, cfg.resume, cfg.overwrite)
    device = device or resolve_device(cfg.device)
    dtype = dtype or resolve_dtype(cfg.dtype, device)
    dist = Distributed(device)
    if len(objective.train) == 0:
        raise UserError("the training set is empty (is --max-length larger than the data?)")
    if run.main:
        run.remove_leftovers()
    torch.manual_seed(cfg.seed)
    model.to(device=device, dtype=torch.float32)  # master weights in fp32; autocast does the rest
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.train()
    objective.setup(model, device, dtype)
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    resume_keys = {**resume_keys, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "world_size": dist.world}
    state, last_saved = TrainState(), None
    resumed = run.resume_point(cfg.resume, print_err) if cfg.resume else None
    if resumed:
        last_saved, saved = resumed
        check_resume_keys(saved["resume_keys"], resume_keys, cfg.force_resume)
        run.restore_weights(model, last_saved)
        optimizer.load_state_dict(saved["optimizer"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        state = TrainState(**saved["state"])
        set_rng_state(saved["rng"])
        print_err(f"resumed from {last_saved} at step {state.step}")
    global_batch = cfg.batch_size * cfg.grad_accum * dist.world
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * len(objective.train) / global_batch))
    if run.main:
        run.write_config(_config_yaml(cfg, meta))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print_err(f"training {trainable:,} parameters for {total} steps of {global_batch} sequences "
                  f"({len(objective.train)} training examples) on {device}, {str(dtype).removeprefix('torch.')}")
        print_err("config: " + json.dumps(asdict(cfg), default=str))
    step = Step(model, _wrap(model, cfg, dist, device), objective, optimizer, scaler, cfg, dist, device, dtype)
    log = MetricsLog(run, total, state.step, cfg.progress)
    if state.step == 0 and run.main:  # the starting point of the loss curves
        initial = step.validate()
        if initial:
            log.write({"step": 0, "tokens_seen": 0, **initial})
            log.log(f"step 0: {_shown(initial)}")

    def save(best: bool) -> Path:
        trainer_state = {"state": asdict(state), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict() if scaler else None, "rng": rng_state(),
                         "resume_keys": resume_keys, "config": asdict(cfg), "versions": {"torch": str(torch.__version__)}}
        saved_meta = {**meta, "step": state.step, "tokens_seen": state.tokens_seen}
        return run.save(model, tokenizer, saved_meta, trainer_state, cfg.keep_last, best)

    with StopSignals() as signals, contextlib.closing(log), contextlib.closing(dist), \
            freed_memory_kept(device.type == "cpu"):  # each step's large buffers reused, not faulted in afresh
        bad_in_a_row, window = 0, Window()
        while state.step < total:
            record = step.run(state, total, window)  # one optimizer step: the heart of it
            bad_in_a_row = 0 if record["finite"] else bad_in_a_row + 1
            if bad_in_a_row >= cfg.max_bad_steps:
                raise UserError(f"{bad_in_a_row} non-finite steps in a row at step {state.step}; stopping. "
                                f"Last good checkpoint: {last_saved or 'none yet'}. Lower --lr or check the data")
            is_last, best, stop_early = state.step == total, False, False
            evaluating = (cfg.eval_every and state.step % cfg.eval_every == 0) or is_last
            if evaluating:
                best, stop_early = evaluate(step, state, record, objective, tokenizer, cfg, log)
            if state.step % cfg.log_every == 0 or evaluating:
                log.write({k: v for k, v in record.items() if k != "finite"})
            log.tick(record)
            if best or is_last or stop_early or signals.received or (cfg.save_every and state.step % cfg.save_every == 0):
                if run.main:
                    last_saved = save(best)
                dist.barrier()
            if signals.received:
                log.log(f"stopped at step {state.step}; checkpoint {last_saved}; continue with --resume auto")
                raise SystemExit(signals.exit_code)
            if stop_early:
                break
    if run.main:
        print_err(f"done: {state.step} steps; checkpoints in {run.path}")
    return last_saved


# ----- one optimizer step ---------------------------------------------------------------------
class Step:
    """Everything an optimizer step needs, so the loop above reads as a list of stages."""

    def __init__(self, model, wrapped, objective, optimizer, scaler, cfg: TrainConfig, dist: Distributed, device, dtype):
        self.model, self.wrapped, self.objective = model, wrapped, objective
        self.optimizer, self.scaler, self.cfg, self.dist, self.device = optimizer, scaler, cfg, dist, device
        self.autocast = _autocast(device, dtype)

    def run(self, state: TrainState, total: int, window: "Window") -> dict:
        """LR, micro-batches, clip, step (or skip a non-finite one); returns the step's record."""
        cfg, dist, objective = self.cfg, self.dist, self.objective
        lr = lr_at(state.step, cfg, total)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        global_batch = cfg.batch_size * cfg.grad_accum * dist.world
        indices = next_indices(state, len(objective.train), global_batch, cfg.seed, objective.weights)
        micro = [objective.train.batch(indices[(a * dist.world + dist.rank) * cfg.batch_size:][:cfg.batch_size])
                 for a in range(cfg.grad_accum)]
        units, tokens = dist.sum(sum(objective.count(b) for b in micro), sum(objective.tokens(b) for b in micro))
        try:
            loss, metrics = accumulate_gradients(self.wrapped, objective, micro, units, dist.world, self.device,
                                                 self.autocast, self.scaler)
        except torch.OutOfMemoryError:
            raise UserError(f"out of memory at --batch-size {cfg.batch_size}: lower --batch-size and raise "
                            "--grad-accum to keep the global batch, lower --max-length, or add "
                            "--gradient-checkpointing") from None
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
        names = sorted(metrics)
        loss, *values = dist.sum(loss, *(metrics[k] for k in names))
        train_loss = loss / max(units, 1)
        finite = self.scaler is not None or (math.isfinite(train_loss) and math.isfinite(grad_norm))
        if finite and self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        else:  # skip: weights and optimizer stay as they were
            state.skipped_steps += 1
            print_err(f"step {state.step + 1}: non-finite loss/gradient (loss={train_loss}, grad_norm={grad_norm}); "
                      f"update skipped ({state.skipped_steps} so far)")
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens_seen += int(tokens)
        return {"step": state.step, "epoch": state.epoch + state.offset / len(objective.train),
                "train_loss": train_loss, **{f"train_{k}": v / max(units, 1) for k, v in zip(names, values)},
                "lr": lr, "grad_norm": grad_norm, "tokens_seen": state.tokens_seen,
                "tokens_per_s": window.rate(tokens), "skipped_steps": state.skipped_steps,
                "elapsed_s": window.elapsed(), "finite": finite}

    @torch.no_grad()
    def validate(self) -> dict:
        """val_loss, val_ppl and val_<metric> over up to eval_batches micro-batches of the val set."""
        val = self.objective.val
        if val is None or len(val) == 0:
            return {}
        self.model.eval()
        n = min(len(val), self.cfg.eval_batches * self.cfg.batch_size)
        loss, units, metrics = 0.0, 0, {}
        for start in range(0, n, self.cfg.batch_size):
            batch = to_device(val.batch(list(range(start, min(start + self.cfg.batch_size, n)))), self.device)
            with self.autocast():
                batch_loss, batch_metrics = self.objective.loss(self.model, batch)
            loss, units = loss + float(batch_loss), units + self.objective.count(batch)
            for k, v in batch_metrics.items():
                metrics[k] = metrics.get(k, 0.0) + float(v)
        self.model.train()
        val_loss = loss / max(units, 1)
        return {"val_loss": val_loss, "val_ppl": perplexity(val_loss),
                **{f"val_{k}": v / max(units, 1) for k, v in metrics.items()}}


def accumulate_gradients(model, objective: Objective, micro: list[dict], units: float, world: int, device,
                         autocast=contextlib.nullcontext, scaler=None) -> tuple[float, dict[str, float]]:
    """Backward over micro-batches so the gradient is that of the mean over all `units` (tokens,
    pairs) of the global batch, however they fall into micro-batches and processes. Returns the
    summed loss and summed metrics of this process."""
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    total, metrics = 0.0, {}
    for a, batch in enumerate(micro):
        batch = to_device(batch, device)
        with contextlib.nullcontext() if a == len(micro) - 1 else no_sync():  # DDP: all-reduce once
            with autocast():
                loss_sum, batch_metrics = objective.loss(model, batch)
            loss = loss_sum * (world / max(units, 1))  # DDP averages over ranks; undo that
            (scaler.scale(loss) if scaler else loss).backward()
        total += float(loss_sum.detach())
        for k, v in batch_metrics.items():
            metrics[k] = metrics.get(k, 0.0) + float(v)
    return total, metrics


# ----- evaluation ----------------------------------------------------------------------------
def evaluate(step: Step, state: TrainState, record: dict, objective: Objective, tokenizer, cfg: TrainConfig,
             log: MetricsLog) -> tuple[bool, bool]:
    """Validation loss and metrics, the objective's own scores and samples (main process) into `record`;
    returns (is this the best so far, stop early)."""
    record.update(step.validate())
    if step.dist.main:
        record.update(objective.evaluate(step.model, tokenizer, state.step))
        log.samples(state.step, sample_generations(step.model, tokenizer, objective.sample_prompts, cfg.sample_tokens))
        log.log(f"step {state.step}: {_shown(record)}")
    value = record.get(objective.best_metric)
    if value is None:
        return False, False
    value = -value if objective.best_mode == "max" else value  # stored as lower-is-better
    if value < state.best_val:
        state.best_val, state.evals_since_best = value, 0
        return True, False
    state.evals_since_best += 1
    if cfg.patience and state.evals_since_best >= cfg.patience:
        log.log(f"early stopping: {objective.best_metric} has not improved for {cfg.patience} evaluations")
        return False, True
    return False, False


@torch.no_grad()
def sample_generations(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[dict]:
    if not prompts:
        return []
    model.eval()
    max_new_tokens = min(max_new_tokens, model.config.block_size // 2)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, seed=0)
    usable = [p for p in prompts if fits_context(tokenizer.encode(p), max_new_tokens, model.config.block_size)]
    outputs = generate_batch(model, tokenizer, usable, cfg) if usable else []
    model.train()
    return [{"prompt": p, "output": o} for p, o in zip(usable, outputs)]


# ----- set-up pieces ---------------------------------------------------------------------------
def make_optimizer(model, cfg: TrainConfig) -> torch.optim.AdamW:
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


def _wrap(model, cfg: TrainConfig, dist: Distributed, device):
    wrapped = torch.compile(model) if cfg.compile else model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    return wrapped


def _autocast(device, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


class Window:
    """Tokens/s since the previous step, and time since the start."""

    def __init__(self):
        self.started = self.last = time.time()

    def rate(self, tokens: float) -> float:
        now = time.time()
        rate, self.last = tokens / max(now - self.last, 1e-9), now
        return rate

    def elapsed(self) -> float:
        return time.time() - self.started


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


def print_err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _shown(record: dict) -> dict:
    return {k: round(v, 4) for k, v in record.items() if k.startswith("val") and isinstance(v, float)}


def _config_yaml(cfg: TrainConfig, meta: dict) -> str:
    import yaml

    return yaml.safe_dump({"train": asdict(cfg), "run": meta}, sort_keys=False)
