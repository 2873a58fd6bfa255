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
from ..runtime import freed_memory_kept
from .config import RUN_CONTROL, TrainConfig, TrainState
from .defaults import describe, settle_run, total_steps
from .metrics import MetricsLog
from .report import RunReport
from .run_folder import RunFolder, open_run
from .state import check_resume_keys, lr_at, next_indices, rng_state, set_rng_state
from .strategy import Single, make_strategy


def train(model, tokenizer, objective: Objective, cfg: TrainConfig, meta: dict, resume_keys: dict,
          run: RunFolder | None = None, strategy: Single | None = None, command: dict | None = None) -> Path | None:
    """Train `model` on `objective`; checkpoints and logs go to the run folder cfg.out. A recipe hands over
    the run folder it opened and the strategy it made (the device and dtype, resolved once); without them,
    train() makes both; `command` (the CLI's verb and options) goes into config.yaml, so that `--config`
    reruns it. Every process of a torchrun launch runs this. Returns the last checkpoint saved."""
    run = run or open_run(cfg.out, meta.get("objective") or objective.name, cfg.resume, cfg.overwrite)
    strategy = strategy or make_strategy(cfg)
    if len(objective.train) == 0:
        raise UserError("the training set is empty (is --max-length larger than the data?)")
    cfg, derived = settle_run(cfg, objective, model, strategy.world)  # unset --epochs, --lr, ...: from data and model
    if run.main:
        run.remove_leftovers()
    torch.manual_seed(cfg.seed)
    global_batch = cfg.batch_size * cfg.grad_accum * strategy.world
    resume_keys = {**resume_keys, "global_batch": global_batch}  # any split into processes resumes exactly
    say = print_err if run.main else lambda msg: None  # what every process knows, the main one prints
    resumed = run.resume_point(cfg.resume, say) if cfg.resume else None
    if resumed:  # into the whole model, before the strategy shards it
        check_resume_keys(resumed[1]["resume_keys"], resume_keys, cfg.force_resume)
        run.restore_weights(model, resumed[0])
    wrapped = strategy.wrap(model, cfg)
    model.train()
    objective.setup(model, strategy)
    optimizer = make_optimizer(model, cfg)  # after wrapping: under FSDP its parameters are the shards
    scaler = torch.amp.GradScaler(strategy.device.type) if strategy.dtype == torch.float16 else None
    state, last_saved = TrainState(), None
    if resumed:
        last_saved, state = resumed[0], _restore(resumed[1], model, optimizer, scaler, strategy)
        say(f"resumed from {last_saved} at step {state.step}")
    total = total_steps(cfg, len(objective.train), strategy.world)
    if cfg.patience and (objective.val is None or len(objective.val) == 0) and objective.best_metric.startswith("val"):
        raise UserError(f"--patience {cfg.patience} stops on {objective.best_metric}, but this run has no validation "
                        "data (--val-fraction 0, or too few records for one): hold some out or drop --patience")
    if resumed and state.step >= total:
        say(f"the run is at step {state.step} already, past its {total} steps: nothing left to train; a larger "
            "--max-steps (or --epochs) trains on")
    if resumed and cfg.patience and state.evals_since_best >= cfg.patience:  # it ended there: resuming adds nothing
        say(f"the run stopped early at step {state.step} ({objective.best_metric} did not improve in {cfg.patience} "
            "evaluations): nothing left to train; a larger --patience trains on")
        total = state.step
    if run.main:
        run.drop_replaced()  # every check passed: the run --overwrite replaces goes now
        if derived:
            print_err(describe(objective.name, len(objective.train), derived))
        run.write_config(_config_yaml(cfg, {**meta, "derived": derived, "data_fingerprint": resume_keys.get("data")},
                                      _command_record(run, command, resumed, state.step, cfg, resume_keys.get("data"))))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print_err(f"training {trainable:,} parameters for {total} steps of {global_batch} sequences "
                  f"({len(objective.train)} training examples) on {strategy.device}, "
                  f"{str(strategy.dtype).removeprefix('torch.')}{_processes(strategy)}")
        print_err("config: " + json.dumps(asdict(cfg), default=str))
        if global_batch > len(objective.train):  # each step then holds some examples twice and others once
            print_err(f"warning: a step's {global_batch} sequences are more than the {len(objective.train)} training "
                      f"examples, so each step repeats some of them; a --batch-size (x --grad-accum) of at most "
                      f"{len(objective.train)} sees each once per epoch")
    step = Step(model, wrapped, objective, optimizer, scaler, cfg, strategy)
    log = MetricsLog(run, total, state.step, cfg.progress)
    report = RunReport(run, objective, cfg, total, log)  # the console: scores, a sample, warnings, the summary
    if state.step == 0:  # the starting point of the loss curves
        initial = step.validate()
        if initial:
            log.write({"step": 0, "tokens_seen": 0, **initial})
            if run.main:
                report.evaluation(0, initial, [])

    def save(best: bool) -> Path:  # every process: a sharded state is gathered from all; the main one writes
        extra = {"scaler": scaler.state_dict() if scaler else None, "resume_keys": resume_keys, "config": asdict(cfg)}
        return _save(run, strategy, model, optimizer, tokenizer, meta, state, extra, cfg.keep_last, best)

    with StopSignals() as signals, contextlib.closing(log), contextlib.closing(strategy), \
            freed_memory_kept(strategy.device.type == "cpu"):  # each step's large buffers reused, not faulted in afresh
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
                best, stop_early = evaluate(step, state, record, objective, tokenizer, cfg, log, report)
            if state.step % cfg.log_every == 0 or evaluating:
                log.write({k: v for k, v in record.items() if k != "finite"})
            log.tick(record)
            stopping = signals.received is not None
            if strategy.world > 1:  # a signal to any process stops them all, after the same step
                stopping = strategy.sum(float(stopping))[0] > 0
            if best or is_last or stop_early or stopping or (cfg.save_every and state.step % cfg.save_every == 0):
                last_saved = save(best)
                strategy.barrier()
            if stopping:
                log.log(f"stopped at step {state.step}; checkpoint {last_saved}; continue with --resume auto")
                raise SystemExit(signals.exit_code if signals.received else 128 + signal.SIGTERM)
            if stop_early:
                break
    if run.main:
        report.finish(state.step, last_saved)
    return last_saved


def _processes(strategy: Single) -> str:
    return f", {strategy.world} processes ({strategy.name})" if strategy.world > 1 else ""


def _save(run: RunFolder, strategy: Single, model, optimizer, tokenizer, meta: dict, state: TrainState,
          extra: dict, keep_last: int, best: bool) -> Path:
    """A checkpoint of the step just done: the strategy gathers the whole weights and optimizer state (and
    every process's RNG state) on the main process, which writes them; returns its folder on every process."""
    weights = strategy.model_state(model)
    optimizer_state = strategy.optimizer_state(model, optimizer)
    rng = strategy.gather(rng_state())
    if not run.main:
        return run.checkpoint_dir(state.step)
    trainer_state = {"state": asdict(state), "optimizer": optimizer_state, "rng": rng[0], "rng_ranks": rng, **extra,
                     "versions": {"torch": str(torch.__version__)}}
    saved_meta = {**meta, "step": state.step, "tokens_seen": state.tokens_seen}
    return run.save(model, tokenizer, saved_meta, trainer_state, keep_last, best, weights)


def _restore(saved: dict, model, optimizer, scaler, strategy: Single) -> TrainState:
    """Optimizer, scaler and RNG states of a checkpoint (the weights are restored before wrapping). Each
    process takes its own RNG state when the checkpoint has one for its rank, else the main one's."""
    strategy.load_optimizer_state(model, optimizer, saved["optimizer"])
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    ranks = saved.get("rng_ranks") or []
    set_rng_state(ranks[strategy.rank] if strategy.rank < len(ranks) else saved["rng"])
    return TrainState(**saved["state"])


# ----- one optimizer step ---------------------------------------------------------------------
class Step:
    """Everything an optimizer step needs, so the loop above reads as a list of stages."""

    def __init__(self, model, wrapped, objective, optimizer, scaler, cfg: TrainConfig, strategy: Single):
        self.model, self.wrapped, self.objective = model, wrapped, objective
        self.optimizer, self.scaler, self.cfg, self.strategy = optimizer, scaler, cfg, strategy
        self.device = strategy.device
        self.autocast = _autocast(strategy.device, strategy.dtype)

    def run(self, state: TrainState, total: int, window: "Window") -> dict:
        """LR, micro-batches, clip, step (or skip a non-finite one); returns the step's record."""
        cfg, dist, objective = self.cfg, self.strategy, self.objective
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
        grad_norm = dist.clip([p for p in self.model.parameters() if p.requires_grad], cfg.grad_clip)
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
            if dist.main:
                print_err(f"step {state.step + 1}: non-finite loss/gradient (loss={train_loss}, "
                          f"grad_norm={grad_norm}); update skipped ({state.skipped_steps} so far)")
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
        """val_loss, val_ppl and val_<metric> over up to eval_batches micro-batches of the val set. Every
        process runs the same batches (a sharded model needs them all in each forward pass)."""
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
        return {"val_loss": val_loss, **({"val_ppl": perplexity(val_loss)} if self.objective.loss_is_nll else {}),
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
             log: MetricsLog, report: RunReport) -> tuple[bool, bool]:
    """Validation loss and metrics, the objective's own scores and samples into `record`; returns (is this
    the best so far, stop early). Every process evaluates and generates (a sharded model needs them all);
    the main process's numbers are the ones recorded, so all of them take the same decisions."""
    scores = step.validate()
    scores.update(objective.evaluate(step.model, tokenizer, state.step))
    samples = sample_generations(step.model, tokenizer, objective.sample_prompts, cfg.sample_tokens)
    record.update(step.strategy.broadcast(scores))
    log.samples(state.step, samples)
    if step.strategy.main:
        report.evaluation(state.step, record, objective.eval_samples() + samples)
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


NOT_TRAINING = (*RUN_CONTROL, "out", "progress")  # options that change no step


def _changed_options(saved: dict, cfg: TrainConfig) -> dict[str, tuple]:
    """The resolved training options a resume changes from the checkpoint's: {name: (old, new)}."""
    now = asdict(cfg)
    return {k: (saved[k], now[k]) for k in now if k in saved and k not in NOT_TRAINING and saved[k] != now[k]}


def _note_other_data(command: dict | None, data: str | None) -> None:
    """A rerun through --config RUN/config.yaml whose data files changed since that run: said, since the
    rerun is then not the run it repeats."""
    rerun_of = (command or {}).get("rerun_of")
    if rerun_of and rerun_of.get("data") and rerun_of["data"] != data:
        print_err(f"note: the data is not what the run of --config {rerun_of['config']} trained on (its files "
                  "changed since, or other options read it otherwise): this rerun will not repeat that run")


def _command_record(run: RunFolder, command: dict | None, resumed, step: int, cfg: TrainConfig,
                    data: str | None = None) -> dict:
    """The command for config.yaml: this one's verb and options; after a resume, the command that started
    the run, kept from the config.yaml before (a rerun through --config is that run; this one where there is
    none), and each resume with the options it changed: the training options against the checkpoint's
    saved ones, the recipe's (--eval-examples, --sample-prompt, ...) against the starting command's (said:
    the exact resume keys matched, but these change how it goes on). A rerun on other `data` (its
    fingerprint) than its --config's run is said (_note_other_data)."""
    import yaml

    _note_other_data(command, data)
    record = {"command": command["verb"], "options": command["options"]} if command else {}
    if not resumed:
        return record

    try:
        before = yaml.safe_load((run.path / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        before = {}
    before = before if isinstance(before, dict) else {}  # a hand-edited file: what is not as written is dropped
    changed = _changed_options(resumed[1].get("config") or {}, cfg)
    then, now = before.get("options"), record.get("options")
    if isinstance(then, dict) and isinstance(now, dict):  # options left out take their defaults
        trained = set(asdict(cfg))
        changed.update({k: (then.get(k, "default"), now.get(k, "default")) for k in sorted(set(then) | set(now))
                        if k not in trained and then.get(k, "default") != now.get(k, "default")})
    if changed:
        print_err("note: resuming with options other than the run's: " + ", ".join(
            f"{k} {old} -> {new}" for k, (old, new) in changed.items()) + f"; they apply from step {step}")
    kept = {k: before[k] for k in ("command", "options") if k in before} if isinstance(then, dict) else record
    earlier = before.get("resumes") if isinstance(before.get("resumes"), list) else []
    return {**kept, "resumes": [*earlier, {"at_step": step, "changed": {k: list(v) for k, v in changed.items()}}]}


def _config_yaml(cfg: TrainConfig, meta: dict, record: dict) -> str:
    """The run's config.yaml: the command `record` (`gpt2ft VERB --config config.yaml` reads its options
    back; after a resume, the command that started the run, and each resume), the resolved training options
    (derived ones filled in) and the run's metadata."""
    import yaml

    head = ""
    if "command" in record:
        verb, path = record["command"], Path(cfg.out).absolute() / "config.yaml"
        head = (f"# gpt2ft {verb}: rerun with `gpt2ft {verb} --config {path} --out NEW_RUN` (flags override "
                "its options).\n# Only `options:` is read back; `train:` and `run:` record what the run resolved.\n")
    return head + yaml.safe_dump({**record, "train": asdict(cfg), "run": meta}, sort_keys=False)
