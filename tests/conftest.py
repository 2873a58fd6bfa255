"""Tiny GPT-2 models built here (no network): HF checkpoints saved by transformers, our own models."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist runs one worker per core: each worker, and the gpt2ft processes it starts, gets its share of
# the cores (capped by OMP_NUM_THREADS if set); more threads than cores make tiny models slower, not faster
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(int(os.environ.get("OMP_NUM_THREADS") or 2), (os.cpu_count() or 1) // WORKERS))
torch.set_num_threads(THREADS)


@pytest.fixture(scope="session", autouse=True)
def child_process_defaults():
    """What the gpt2ft processes tests start inherit, set here rather than at import (xdist's controller imports
    this file too, and every worker inherits its environment): their share of the cores, and a Ctrl-C that
    interrupts (a shell starts a background job with SIGINT ignored, and children inherit that)."""
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


TINY = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)

# the files from the longest down (measured), so the run ends on short ones and no worker waits long for the
# other (xdist keeps a file on one worker and, left to itself, sends the files with the fewest tests last)
LONGEST_FIRST = ("test_demo.py", "test_distributed.py", "test_demo_from_model.py", "test_reliability.py",
                 "test_dpo_cli.py", "test_chat.py", "test_train.py", "test_lora.py", "test_sft.py", "test_cli.py",
                 "test_serve.py", "test_gguf.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST
               else len(LONGEST_FIRST))


def hf_tiny(seed: int = 0, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(**{**TINY, **overrides})
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random non-trivial LayerNorm and bias values, so a wrong mapping shows
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def hf_model():
    return hf_tiny()


@pytest.fixture(scope="session")
def hf_dir(hf_model, tmp_path_factory):
    """A folder as transformers saves it (model.safetensors) plus GPT-2's tokenizer files."""
    from gpt2ft.tokenizer import gpt2_tokenizer

    folder = tmp_path_factory.mktemp("hf_tiny")
    hf_model.save_pretrained(folder)
    gpt2_tokenizer().save(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(hf_dir):
    from gpt2ft.checkpoint import load

    return load(hf_dir, device="cpu", dtype="float32")


def run_cli(*args, check: bool = False, env=None, timeout: float | None = None, input: str | None = None):
    """Run `gpt2ft ARGS` and return a CompletedProcess (text). In this process (torch and the verbs are
    imported once, not once per call: most of the suite's time was process start-up), with its own
    stdin/stdout/stderr, exit code and traceback as the interpreter would give them. With `env` it runs
    in a real subprocess, since some variables (HF_HUB_OFFLINE, HF_HOME) are read when a library is
    imported. No time limit by default: a loaded machine makes work slower, not wrong."""
    argv = [str(a) for a in args]
    if env is not None or timeout is not None:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = subprocess.run([sys.executable, "-m", "gpt2ft.cli", *argv], capture_output=True, text=True,
                              env=full_env, timeout=timeout, input=input)
    else:
        proc = _run_in_process(argv, input)
    if check and proc.returncode != 0:
        raise AssertionError(f"gpt2ft {' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _run_in_process(argv: list[str], input: str | None) -> subprocess.CompletedProcess:
    import io
    import traceback
    import warnings

    from gpt2ft.cli import main

    def stream(data: bytes = b""):
        return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", write_through=True)

    saved = sys.stdin, sys.stdout, sys.stderr, signal.getsignal(signal.SIGINT), torch.get_num_threads()
    sys.stdin, sys.stdout, sys.stderr = stream((input or "").encode()), stream(), stream()
    out, err = sys.stdout, sys.stderr
    try:
        with warnings.catch_warnings():  # each run shows its warnings, as a fresh process would
            warnings.simplefilter("default")
            try:
                code = main(argv)
            except SystemExit as e:  # --help, argparse, a verb's own exit
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            except Exception:  # what the interpreter would print for an uncaught exception
                traceback.print_exc()
                code = 1
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved[:3]
        signal.signal(signal.SIGINT, saved[3])
        torch.set_num_threads(saved[4])
    text = [s.buffer.getvalue().decode("utf-8", errors="replace") for s in (out, err)]
    return subprocess.CompletedProcess(["gpt2ft", *argv], code, text[0], text[1])


def assert_clean_error(proc, *needles):
    """A user mistake: non-zero exit, one error line naming the problem, no traceback."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if "error" in l]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def snapshot(root) -> dict[str, str]:
    """Every file and link under root -> its sha256 (or link target). `.lock` holds the pid of whoever
    last locked a run folder, so it is left out."""
    from pathlib import Path

    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.name == ".lock":
            continue
        if p.is_symlink():
            out[str(p.relative_to(root))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
