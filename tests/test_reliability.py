"""One test per rule, each driving the real CLI (in this process; see conftest.run_cli): the exit code, exactly one
clear error line on stderr, and the bytes of every file that existed before left unchanged (and no
file added). The world: a word tokenizer, prepared data and a 4-step pretrain run, made once."""
from __future__ import annotations

import gc
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_clean_error, run_cli, snapshot
from gpt2ft.checkpoint import run_checkpoints

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "32", "--batch-size", "2",
        "--device", "cpu", "--no-progress", "--warmup-steps", "1", "--eval-batches", "1"]
WORDS = "the king queen said to be or not that is question love night day sword crown".split()


def gpt2ft(*args, cwd=None):
    """run_cli from another working directory."""
    if cwd is None:
        return run_cli(*args)
    here = os.getcwd()
    os.chdir(cwd)
    try:
        return run_cli(*args)
    finally:
        os.chdir(here)


def refused(root: Path, *args, needles=(), cwd=None, run_out: Path | None = None):
    """Run a command that must be refused: clean one-line error naming `needles`, nothing changed.
    run_out: a new training --out, which must not be left behind either (no empty run folder)."""
    before, existed = snapshot(root), run_out is not None and Path(run_out).exists()
    proc = gpt2ft(*args, cwd=cwd)
    assert_clean_error(proc, *needles)
    assert snapshot(root) == before, "a refused command changed files"
    assert run_out is None or Path(run_out).exists() == existed, f"a refused command left {run_out} behind"
    return proc


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    (root / "text.txt").write_text("\n".join(" ".join(rng.choice(WORDS, 12)) for _ in range(300)) + "\n")
    run_cli("tokenizer", "train", root / "text.txt", "--kind", "word", "--vocab-size", "100", "--out", root / "tok",
            check=True)
    run_cli("prepare", root / "text.txt", "--tokenizer", root / "tok", "--out", root / "data", check=True)
    run_cli("pretrain", "--data", root / "data", "--out", root / "run", *TINY, "--max-steps", "4",
            "--save-every", "2", "--eval-every", "2", check=True)
    (root / "user").mkdir()
    (root / "user" / "notes.txt").write_text("a week of notes\n")
    return root


# ----- nothing a user owns is destroyed -------------------------------------------------------------
@pytest.mark.parametrize("out", ["user", ".", "run", "run/best", "run/checkpoints", "text.txt"])
def test_export_never_writes_onto_user_files_or_its_source(world, out):
    refused(world, "export", "run", "--out", out, cwd=world)


def test_export_overwrite_writes_beside_user_files(world, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = gpt2ft("export", world / "run", "--out", tmp_path, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "model.safetensors").exists()


def test_a_finished_run_is_not_restarted_without_resume(world):
    refused(world, "pretrain", "--data", world / "data", "--out", world / "run", *TINY, "--max-steps", "4",
            needles=("--resume auto", "--overwrite"))


def test_overwrite_never_deletes_the_model_a_run_trains_from(world):
    refused(world, "finetune", world / "run", "--data", world / "data", "--out", world / "run", "--overwrite",
            "--max-steps", "2", "--device", "cpu", needles=("trains from",))


def test_overwrite_replaces_a_run_only_once_the_new_one_trains(world, tmp_path):
    """--overwrite with a mistake found only once the model loads keeps the old run whole; a file of the user's
    inside the run's folders is never deleted with it; a good --overwrite leaves only the new run."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(world / "run", out, symlinks=True)
    pretrain = ["pretrain", "--data", world / "data", "--out", out, *TINY, "--max-steps", "2", "--overwrite"]
    refused(tmp_path, *pretrain, "--max-length", "999", needles=("--max-length 999",))  # past the context of 32
    (out / "checkpoints" / "README.txt").write_text("my notes on step 2\n")
    refused(tmp_path, *pretrain, needles=("README.txt", "move it out"))
    (out / "checkpoints" / "README.txt").unlink()
    old = snapshot(out)
    run_cli(*pretrain, check=True)
    assert run_checkpoints(out)[0].name == "step-00000002"  # the 4-step run's checkpoints are gone
    assert not (out / ".replaced-run").exists() and snapshot(out) != old
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 2


def test_a_run_set_aside_by_an_overwrite_killed_before_training_comes_back(world, tmp_path):
    """kill -9 between --overwrite setting the old run aside and the new run's first step, or while a failed
    one put it back: the next command in that folder finds the old run in its place, and nothing of the new
    run's."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(world / "run", out, symlinks=True)
    (out / ".replaced-run").mkdir()
    names = ["checkpoints", "latest", "best", "metrics.jsonl", "config.yaml"]
    (out / ".replaced-run" / ".names.json").write_text(json.dumps(names))
    for name in names[:3]:  # killed while the old run moved back: two of its files are in place already
        os.replace(out / name, out / ".replaced-run" / name)
    (out / "splits").mkdir()  # and the new run had written its own splits
    proc = run_cli("pretrain", "--data", world / "data", "--out", out, *TINY, "--max-steps", "5", "--resume", "auto",
                   check=True)
    assert "at step 4" in proc.stderr and not (out / ".replaced-run").exists() and not (out / "splits").exists()
    steps = {json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert {2, 4, 5} <= steps  # the old run's log, already back before the kill, kept and continued


@pytest.mark.parametrize("out", ["run/best", "user", "data"])
def test_tokenizer_train_refuses_a_model_a_user_folder_and_other_outputs(world, out):
    refused(world, "tokenizer", "train", "text.txt", "--kind", "word", "--out", out, cwd=world, needles=(out,))


@pytest.mark.parametrize("out", ["user", "tok", "run", "text.txt"])
def test_prepare_refuses_folders_it_did_not_make(world, out):
    refused(world, "prepare", "text.txt", "--tokenizer", "tok", "--out", out, cwd=world, needles=(out,))


def test_outputs_never_overwrite_their_own_input(world, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "hi", "output": "the king"}) + "\n")
    refused(tmp_path, "data", "convert", data, "--out", data, needles=("the input",))
    refused(tmp_path, "data", "convert", data, "--out", tmp_path, needles=("is a folder",))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the king\n")
    for flag in ("--out-md", "--out-json"):
        refused(tmp_path, "compare", world / "run", world / "run", "--prompts", prompts, flag, prompts,
                needles=(flag, "input"))
    refused(world, "compare", "run", "run", "--prompt", "the", "--out-md", "run/compare.md", cwd=world,
            needles=("--out-md",))
    # eval writes REPORT_DIR/summary.json: never when that file is the --data it reads
    report = tmp_path / "report"
    report.mkdir()
    (report / ".gpt2ft-output.json").write_text(json.dumps({"made_by": "gpt2ft eval"}))
    (report / "summary.json").write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    refused(tmp_path, "eval", world / "run", "--data", report / "summary.json", "--out", report,
            needles=("--data",))
    refused(world, "eval", "run", "--data", "text.txt", "--out", "user", cwd=world, needles=("--overwrite",))


def test_two_trainings_in_one_out_then_kill_9_and_resume_auto(world, tmp_path):
    """The second process is refused while the first trains; after kill -9 the stale lock is taken over."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "gpt2ft.cli", "pretrain", "--data", world / "data", "--out", out, *TINY,
            "--max-steps", "100000", "--save-every", "3", "--eval-every", "0", "--log-every", "1"]
    first = subprocess.Popen(list(map(str, args)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list((out / "checkpoints").glob("step-*/COMPLETE")) and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, "the first training ended early"
        second = run_cli("pretrain", "--data", world / "data", "--out", out, *TINY, "--max-steps", "2",
                         "--resume", "auto")
        assert_clean_error(second, "in use", str(first.pid))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    metrics_rows = (out / "metrics.jsonl").read_text().count("\n")
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    step = int(newest.name.split("-")[1])
    proc = run_cli("pretrain", "--data", world / "data", "--out", out, *TINY, "--max-steps", step + 2,
                   "--resume", "auto", "--save-every", "3", "--eval-every", "0", "--log-every", "1")
    assert proc.returncode == 0, proc.stderr
    assert f"step-{step + 2:08d}" in {p.name for p in (out / "checkpoints").iterdir()}
    assert (out / "metrics.jsonl").read_text().count("\n") > metrics_rows - 3
    assert not list(out.rglob(".tmp-*")), "a temp file survived"


# ----- weights are verified -------------------------------------------------------------------------
def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # inside the tensor data, not the header: the size stays the same
    path.write_bytes(bytes(data))


def test_damaged_weights_name_the_file_and_a_run_falls_back(world, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world / "run", run, symlinks=True)
    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    _flip_byte(newest / "model.safetensors")
    assert_clean_error(run_cli("generate", newest, "--prompt", "the king", "--max-new-tokens", "3"),
                       "model.safetensors")
    fallback = run_cli("generate", run, "--prompt", "the king", "--max-new-tokens", "3", "--temperature", "0")
    assert fallback.returncode == 0, fallback.stderr
    assert newest.name in fallback.stderr and "model.safetensors" in fallback.stderr  # says what it skipped
    older = run_cli("generate", run / "checkpoints" / "step-00000002", "--prompt", "the king", "--max-new-tokens",
                    "3", "--temperature", "0", check=True)
    assert fallback.stdout == older.stdout  # and generates from the newest intact checkpoint


# ----- every flag and YAML key checked where parsed --------------------------------------------------
@pytest.mark.parametrize("flags,needle", [
    (["--max-steps", "0"], "--max-steps"), (["--max-steps", "-5"], "--max-steps"), (["--epochs", "nan"], "--epochs"),
    (["--epochs", "0"], "--epochs"), (["--log-every", "0"], "--log-every"), (["--warmup-steps", "-1"], "--warmup"),
    (["--max-length", "1000"], "--max-length"), (["--lr", "inf"], "--lr"), (["--n-layer", "0"], "--n-layer"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_training_flags_out_of_range(world, tmp_path, flags, needle):
    args = ["pretrain", "--data", world / "data", "--out", tmp_path / "r", *TINY, *flags]
    refused(tmp_path, *args, needles=(needle,), run_out=tmp_path / "r")
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").glob("checkpoints/*"))


@pytest.mark.parametrize("yaml_text,needle", [
    ("lr: true\n", "--lr"), ("max_steps: 3.7\n", "--max-steps"), ("epochs: .nan\n", "epochs"),
    ("grad_clip: -3\n", "--grad-clip"), ("seed: 1.5\n", "--seed"), ("progress: 1\n", "progress"),
])
def test_training_yaml_values_of_the_wrong_type_or_range(world, tmp_path, yaml_text, needle):
    (tmp_path / "c.yaml").write_text(yaml_text)
    refused(tmp_path, "pretrain", "--data", world / "data", "--out", tmp_path / "r", *TINY, "--config",
            tmp_path / "c.yaml", needles=(needle,), run_out=tmp_path / "r")


@pytest.mark.parametrize("yaml_text,needle", [
    ("prompt: 42\n", "prompt"), ("prompt: [a, b]\n", "prompt"), ("top_k: 2.5\n", "top_k"),
    ("temperature: -1\n", "temperature"), ("stream: yes please\n", "stream"), ("stop: [1]\n", "stop"),
    ("max_new_tokens: true\n", "max_new_tokens"), ("device: 3\n", "device"),
])
def test_yaml_values_for_other_verbs_are_checked_like_their_flags(world, tmp_path, yaml_text, needle):
    (tmp_path / "c.yaml").write_text(yaml_text)
    refused(world, "generate", "run", "--config", tmp_path / "c.yaml", cwd=world, needles=(needle,))


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\xff\xfe", b"1: 2\n", b"config: other.yaml\n", b"_run: 3\n",
                                     b"[1, 2]\n", b"prompt: [unclosed\n"])
def test_bad_config_files(world, tmp_path, content):
    (tmp_path / "c.yaml").write_bytes(content)
    refused(world, "generate", "run", "--prompt", "the", "--config", tmp_path / "c.yaml", cwd=world,
            needles=("--config",))


@pytest.mark.parametrize("yaml_text,flags,needles", [
    ("lr: -1\n", [], ("c.yaml", "lr", "out of range")),  # a range error names the file, as a type error does
    ("dropout: 1.5\n", [], ("c.yaml", "dropout")),
    ("epochs: 2\n", ["--max-steps", "1"], ("--epochs", "--max-steps")),  # it would be dropped unsaid
    ("{}\n", ["--max-steps", "1", "--epochs", "2"], ("--epochs", "--max-steps")),
])
def test_training_values_refused_where_they_come_from(world, tmp_path, yaml_text, flags, needles):
    (tmp_path / "c.yaml").write_text(yaml_text)
    refused(tmp_path, "finetune", world / "run", "--data", world / "data", "--out", tmp_path / "f", *flags,
            "--config", tmp_path / "c.yaml", needles=needles, run_out=tmp_path / "f")


def test_yaml_values_of_the_right_type_work(world, tmp_path):
    (tmp_path / "c.yaml").write_text("prompt: the king\nmax_new_tokens: 3\ntemperature: 0\nstop: [zzz]\n")
    proc = gpt2ft("generate", world / "run", "--config", tmp_path / "c.yaml")
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr


@pytest.mark.parametrize("args,needle", [
    (["generate", "run", "--prompt", "the", "--top-next", "-1"], "--top-next"),
    (["generate", "run", "--prompt", "the", "--top-next", "1000"], "--top-next"),
    (["generate", "run", "--prompt", "the", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "run", "--prompt", "the", "--temperature", "nan"], "--temperature"),
    (["generate", "run", "--prompt", "the", "--top-p", "1.5"], "--top-p"),
    (["generate", "run", "--prompt", "the", "--seed", "-1"], "--seed"),
    (["eval", "run", "--data", "text.txt", "--max-examples", "0"], "--max-examples"),
    (["eval", "run", "--data", "text.txt", "--batch-size", "0"], "--batch-size"),
    (["sft", "run", "--data", "text.txt", "--out", "s", "--factor", "-2"], "--factor"),
    (["sft", "run", "--data", "text.txt", "--out", "s", "--val-fraction", "1"], "--val-fraction"),
    (["prepare", "text.txt", "--out", "p", "--val-fraction", "-0.1"], "--val-fraction"),
    (["tokenizer", "train", "text.txt", "--out", "t", "--vocab-size", "0"], "--vocab-size"),
    (["tokenizer", "train", "text.txt", "--out", "t", "--kind", "word", "--vocab-size", "1"], "--vocab-size"),
    (["tokenizer", "train", "text.txt", "--out", "t", "--vocab-size", "100"], "257"),
    (["compare", "run", "run", "--prompt", "the", "--repetition-penalty", "0"], "--repetition-penalty"),
])
def test_flags_out_of_range_for_every_verb(world, args, needle):
    refused(world, *args, cwd=world, needles=(needle,))


def test_help_states_the_accepted_range():
    out = run_cli("generate", "--help", check=True).stdout
    assert "(0, 1]" in out and "vocabulary size" in out
    assert ">= 1" in run_cli("eval", "--help", check=True).stdout


# ----- empty, binary and damaged inputs -------------------------------------------------------------
def test_empty_inputs(world, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    refused(tmp_path, "eval", world / "run", "--data", empty, needles=("empty",))
    refused(tmp_path, "tokenizer", "train", empty, "--out", tmp_path / "t", needles=("no text",))
    refused(tmp_path, "prepare", empty, "--tokenizer", world / "tok", "--out", tmp_path / "p",
            needles=("too little text",))


def test_binary_inputs(world, tmp_path):
    rng = np.random.default_rng(1)
    blob = tmp_path / "blob.txt"
    blob.write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"the king\nthe\x00queen\n")
    refused(tmp_path, "compare", world / "run", world / "run", "--prompts", blob, needles=("blob.txt:",))
    refused(tmp_path, "compare", world / "run", world / "run", "--prompts", nul, needles=("nul.txt:2", "binary"))
    (tmp_path / "blank.txt").write_text("\n  \n")
    refused(tmp_path, "compare", world / "run", world / "run", "--prompts", tmp_path / "blank.txt",
            needles=("blank.txt: no prompts in it",))
    refused(tmp_path, "prepare", nul, "--tokenizer", world / "tok", "--out", tmp_path / "p", needles=("nul.txt:2",))
    refused(tmp_path, "eval", world / "run", "--data", blob, needles=("blob.txt",))
    refused(tmp_path, "data", "convert", blob, "--from", "lines", "--instruction", "x", "--out", tmp_path / "o.jsonl",
            needles=("blob.txt",))


@pytest.mark.parametrize("damage", ["odd size", "random bytes", "bad meta"])
def test_damaged_prepared_data(world, tmp_path, damage):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(world / "data", data)
    size = (data / "train.bin").stat().st_size
    if damage == "odd size":
        (data / "train.bin").write_bytes((data / "train.bin").read_bytes()[:-1])
    elif damage == "random bytes":  # same size, ids beyond the vocabulary
        (data / "train.bin").write_bytes(np.random.default_rng(2).integers(0, 256, size, dtype=np.uint8).tobytes())
    else:
        (data / "meta.json").write_text('{"tokenizer": 3}')
    refused(tmp_path, "pretrain", "--data", data, "--out", tmp_path / "r", *TINY, "--max-steps", "1",
            needles=("prepare",), run_out=tmp_path / "r")


def test_foreign_metrics_file_in_out(world, tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"hello": 1}\n')
    for extra in ([], ["--overwrite"]):
        refused(tmp_path, "pretrain", "--data", world / "data", "--out", tmp_path, *TINY, "--max-steps", "1", *extra,
                needles=(str(tmp_path),))


def test_a_tokenizer_trained_again_into_its_folder_is_the_one_loaded(world, tmp_path):
    """A word tokenizer's vocabulary left beside a new BPE one would be loaded instead of it."""
    from gpt2ft.tokenizer import load_tokenizer

    tok = tmp_path / "tok"
    for kind, size in (("word", "50"), ("bpe", "300")):
        run_cli("tokenizer", "train", world / "text.txt", "--kind", kind, "--vocab-size", size, "--out", tok,
                check=True)
    assert load_tokenizer(tok).vocab_size == 300
    assert not list(tok.glob("word*"))


def test_paths_too_long_or_looping_are_one_line_errors(tmp_path):
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    for out in (tmp_path / ("a" * 300 + ".jsonl"), tmp_path / "loop1"):
        assert_clean_error(run_cli("data", "convert", data, "--out", out), str(out)[:40])
    assert_clean_error(run_cli("tokenizer", "train", data, "--out", tmp_path / ("a" * 300)), "a" * 40)


def test_a_metrics_row_cut_short_by_kill_9_is_left_out(world, tmp_path):
    """kill -9 can cut a write short (the kernel stops at a page boundary): the unfinished last row is not
    an error for plot or resume; a bad row that was finished still is."""
    import shutil

    from gpt2ft.train.run_folder import read_jsonl_steps

    run = tmp_path / "run"
    shutil.copytree(world / "run", run, symlinks=True)
    metrics = run / "metrics.jsonl"
    text = metrics.read_text()
    lines = text.count("\n")
    metrics.write_text(text + '{"step": 99, "train_lo')
    assert run_cli("plot", run).returncode == 0
    assert read_jsonl_steps(metrics, 10**9) == text
    metrics.write_text(text + '{"step": 99, "train_lo\n')
    refused(tmp_path, "plot", run, needles=(f"metrics.jsonl:{lines + 1}",))


@pytest.mark.parametrize("rows,needle", [
    ('{"step": 1, "train_loss": "x", "tokens_seen": 2}\n', "train_loss"),
    ('[1, 2]\n', "object"),
    ('{"step": 1, "train_loss": 2.0, "tokens_seen": 4}\nnot json\n', "metrics.jsonl:2"),
])
def test_plot_bad_metrics_rows(tmp_path, rows, needle):
    (tmp_path / "metrics.jsonl").write_text(rows)
    refused(tmp_path, "plot", tmp_path, needles=(needle,))


def test_plot_rows_missing_a_field_are_left_out_and_user_plots_kept(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_loss": 2.0}\n'
                                            '{"step": 2, "train_loss": 1.5, "tokens_seen": 64}\n{"step": 3}\n')
    proc = run_cli("plot", tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
    refused(tmp_path, "plot", tmp_path, needles=("loss.png", "--overwrite"))  # not a run's: only with --overwrite
    assert run_cli("plot", tmp_path, "--overwrite").returncode == 0
    (tmp_path / "loss.svg").write_text("<svg>mine</svg>")
    for extra in ([], ["--overwrite"]):  # a plot of the user's is never replaced
        refused(tmp_path, "plot", tmp_path, "--format", "svg", *extra, needles=("loss.svg",))


def test_plot_replaces_a_training_runs_own_plot(world, tmp_path):
    import shutil

    shutil.copytree(world / "run", tmp_path / "run", symlinks=True)
    for _ in range(2):
        assert run_cli("plot", tmp_path / "run").returncode == 0
    assert (tmp_path / "run" / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_a_model_whose_tokenizer_is_smaller_than_its_vocabulary(world, tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "word_vocab.json").write_bytes((world / "tok" / "word_vocab.json").read_bytes())
    refused(tmp_path, "generate", tmp_path / "m", "--prompt", "the king", needles=("tokenizer",))
    refused(tmp_path, "generate", tmp_path / "m", "--prompt", "the king", "--top-next", "5", needles=("tokenizer",))


def test_out_naming_an_existing_file(world):
    for args in (["pretrain", "--data", "data", *TINY], ["prepare", "text.txt", "--tokenizer", "tok"],
                 ["tokenizer", "train", "text.txt", "--kind", "word"], ["eval", "run", "--data", "text.txt"],
                 ["export", "run"], ["demo"]):
        assert refused(world, *args, "--out", "user/notes.txt", cwd=world, needles=("notes.txt",)).returncode == 2


# ----- prepare: split by tokens, no temp files, paths that do not depend on the cwd -------------------
def test_prepare_splits_a_single_line_by_tokens(world, tmp_path):
    from gpt2ft.tokenizer import load_tokenizer

    text = " ".join(np.random.default_rng(3).choice(WORDS, 300_000))  # ~1.6 MB, one line
    (tmp_path / "one.txt").write_text(text)
    proc = run_cli("prepare", tmp_path / "one.txt", "--tokenizer", world / "tok", "--out", tmp_path / "d",
                   "--val-fraction", "0.1")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    expected = load_tokenizer(world / "tok").encode(text) + [0]  # the oracle: the whole file, then EOS
    train = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint16).tolist()
    val = np.fromfile(tmp_path / "d" / "val.bin", dtype=np.uint16).tolist()
    assert train + val == expected
    assert len(val) == int(len(expected) * 0.1) == meta["val_tokens"]
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [".gpt2ft-output.json", "meta.json", "train.bin",
                                                                  "val.bin"]


def test_a_failed_prepare_leaves_no_temp_file(world, tmp_path):
    (tmp_path / "a.txt").write_text("the king said\n")
    (tmp_path / "b.txt").write_bytes(b"the queen\n\xff\n")  # fails on the second file, mid-write
    proc = run_cli("prepare", tmp_path / "a.txt", tmp_path / "b.txt", "--tokenizer", world / "tok",
                   "--out", tmp_path / "d")
    assert_clean_error(proc, "b.txt:2")
    assert not list((tmp_path / "d").glob(".tmp*"))


def test_prepared_data_works_from_another_directory(world, tmp_path):
    """meta.json records the tokenizer by an absolute path, so pretrain runs from anywhere."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    proc = gpt2ft("prepare", world / "text.txt", "--tokenizer", os.path.relpath(world / "tok", tmp_path / "a"),
                  "--out", "data", cwd=tmp_path / "a")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "a" / "data" / "meta.json").read_text())
    assert Path(meta["tokenizer"]["dir"]).is_absolute()
    proc = gpt2ft("pretrain", "--data", "../a/data", "--out", "r", *TINY, "--max-steps", "1", cwd=tmp_path / "b")
    assert proc.returncode == 0, proc.stderr


def test_ctrl_c_during_training_saves_and_leaves_no_temp(world, tmp_path):
    out = tmp_path / "r"
    args = [sys.executable, "-m", "gpt2ft.cli", "pretrain", "--data", world / "data", "--out", out, *TINY,
            "--max-steps", "100000", "--eval-every", "0", "--log-every", "1"]
    proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while (not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip()) \
            and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert list((out / "checkpoints").glob("step-*/COMPLETE")), "no checkpoint written on Ctrl-C"
    assert not list(out.rglob(".tmp-*"))


def test_chat_transcript_never_appends_to_a_model_or_a_user_file(world, tmp_path):
    for target in (world / "run" / "best" / "config.json", world / "run" / "notes.jsonl", world / "text.txt",
                   world / "user"):
        refused(world, "chat", world / "run", "--transcript", target, "--max-new-tokens", "2",
                needles=("--transcript",))
    log = tmp_path / "chat.jsonl"
    for _ in range(2):  # a new file, then the same transcript again: appended
        proc = run_cli("chat", world / "run", "--transcript", log, "--max-new-tokens", "2", input="the king\n")
        assert proc.returncode == 0, proc.stderr
    assert len(log.read_text().splitlines()) >= 2


def _interrupt_prepare(monkeypatch, where: str):
    """Make `prepare` raise KeyboardInterrupt (what Ctrl-C raises) at a known point."""
    import tqdm

    import gpt2ft.data.text as text

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "before the temp files are opened":
        monkeypatch.setattr(tqdm, "tqdm", interrupt)
    elif where == "while tokenizing":  # at the second file, the first one's tokens written
        real, calls = text.iter_documents, []

        def documents(*args, **kwargs):
            calls.append(1)
            if len(calls) % 2 == 0:
                raise KeyboardInterrupt
            yield from real(*args, **kwargs)
        monkeypatch.setattr(text, "iter_documents", documents)
    elif where == "between moving train.bin and val.bin in":
        real_replace = os.replace
        monkeypatch.setattr(os, "replace", lambda a, b: interrupt() if str(b).endswith("val.bin")
                            else real_replace(a, b))
    else:  # "writing meta.json"
        monkeypatch.setattr(text, "atomic_write_text", interrupt)


@pytest.mark.parametrize("where", ["before the temp files are opened", "while tokenizing",
                                   "between moving train.bin and val.bin in", "writing meta.json"])
def test_ctrl_c_at_any_point_of_prepare_leaves_nothing(world, tmp_path, monkeypatch, where):
    """Deterministic: the interrupt comes at a chosen point, in-process, through the verb's own run()."""
    from gpt2ft.cli import parse

    (tmp_path / "two.txt").write_text("the king said\n\n" * 40)
    args = ["prepare", tmp_path / "two.txt", world / "text.txt", "--tokenizer", world / "tok", "--val-fraction", "0.2"]
    earlier = tmp_path / "earlier"
    assert run_cli(*args, "--out", earlier).returncode == 0
    _interrupt_prepare(monkeypatch, where)
    for out in (tmp_path / "new", earlier):
        with pytest.raises(KeyboardInterrupt):
            parsed = parse(list(map(str, [*args, "--out", out])))
            parsed._run(parsed)
        if out == earlier:  # the earlier data is kept whole, or gone with its meta.json; never half of each
            names = {p.name for p in out.iterdir()}
            assert names in ({".gpt2ft-output.json"}, {".gpt2ft-output.json", "meta.json", "train.bin", "val.bin"})
            if "meta.json" in names:
                meta = json.loads((out / "meta.json").read_text())
                assert (out / "train.bin").stat().st_size == 2 * meta["train_tokens"]
        else:
            assert not out.exists(), sorted(p.name for p in out.iterdir())  # the folder it made is gone


def test_ctrl_c_during_prepare_leaves_nothing(world, tmp_path):
    """The real signal, in a subprocess, sent once prepare says it is tokenizing (its temp files exist)."""
    rng = np.random.default_rng(4)
    (tmp_path / "big.txt").write_text("\n".join(" ".join(rng.choice(WORDS, 1_000_000)) for _ in range(2)))
    args = [sys.executable, "-m", "gpt2ft.cli", "prepare", tmp_path / "big.txt", "--tokenizer", world / "tok",
            "--out", tmp_path / "d"]
    proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = []
    while not seen or "prepare: tokenizing" not in seen[-1]:
        line = proc.stderr.readline()
        assert line, f"prepare ended before tokenizing: {seen}"
        seen.append(line)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "interrupted" in err
    assert not (tmp_path / "d").exists()  # the folder it made is gone with its temp files


def test_a_ctrl_c_while_a_progress_bar_is_built_waits_for_it(monkeypatch):
    """A SIGINT that lands inside tqdm() (as it did in the test above, once in CI's runs) used to leave a
    half-built bar whose destructor printed a traceback; now it is held until the bar is whole, then raised."""
    import tqdm

    from gpt2ft.runtime import progress_bar

    class Interrupted(tqdm.tqdm):
        @classmethod
        def _get_free_pos(cls, instance=None):  # called inside tqdm(), before the bar's `pos` is set
            signal.raise_signal(signal.SIGINT)
            return super()._get_free_pos(instance)

    monkeypatch.setattr(tqdm, "tqdm", Interrupted)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(KeyboardInterrupt):
        progress_bar(total=3, file=io.StringIO())
    gc.collect()
    assert not unraisable


# ----- one guarded writer for every file a verb writes (issue 15) ---------------------------------------
def _writers(hf_dir, data, out, model=None):
    """Every verb that writes a loose file, reading `data` (records, or prompts for compare) and writing
    `out`, with the cheapest settings."""
    model = model or hf_dir
    fast = ["--max-new-tokens", "2", "--device", "cpu"]
    return {
        "data convert": ["data", "convert", data, "--out", out],
        "data pairs": ["data", "pairs", model, "--data", data, "--out", out, *fast],
        "compare --out-md": ["compare", model, model, "--prompts", data, "--out-md", out, *fast],
        "compare --out-json": ["compare", model, model, "--prompts", data, "--out-json", out, *fast],
    }


@pytest.mark.parametrize("verb", list(_writers("m", "d", "o")))
def test_loose_outputs_go_through_the_guarded_writer(hf_dir, tmp_path, verb):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Name a king.", "output": "Lear"}) + "\n")
    user = tmp_path / "notes.md"
    user.write_text("a week of notes")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights")
    mine = lambda out, model=None: _writers(hf_dir, data, out, model)[verb]
    for extra in ([], ["--overwrite"]):  # a file gpt2ft did not write: never replaced; checked before the model
        refused(tmp_path, *mine(user, tmp_path / "missing-model"), *extra, needles=("notes.md", "did not write"))
    refused(tmp_path, *mine(data), "--overwrite", needles=("d.jsonl", "an input is never overwritten"))
    refused(tmp_path, *mine(user / "o.jsonl"), needles=("is a file, not a folder",))
    refused(tmp_path, *mine(tmp_path / "model" / "o.jsonl"), needles=("model or run folder",))
    refused(tmp_path, *mine(tmp_path), needles=("is a folder",))
    out = tmp_path / "out" / "o.jsonl"
    proc = run_cli(*mine(out))
    assert proc.returncode == 0 and out.is_file(), proc.stderr
    refused(tmp_path, *mine(out), needles=("written by gpt2ft earlier", "--overwrite"))
    proc = run_cli(*mine(out), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == [".gpt2ft-files.json", "o.jsonl"]  # no temp file


@pytest.mark.parametrize("args,files", [
    (["export", "run"], ["config.json"]),
    (["tokenizer", "train", "text.txt", "--kind", "word"], ["word_vocab.json"]),
    (["prepare", "text.txt", "--tokenizer", "tok"], ["meta.json"]),
    (["eval", "run", "--data", "text.txt"], ["summary.json"]),
])
def test_output_folders_never_replace_a_users_file_nor_hold_an_input(world, tmp_path, args, files):
    import shutil

    shutil.copytree(world, tmp_path / "w", symlinks=True, ignore=shutil.ignore_patterns("user"))
    w = tmp_path / "w"
    (w / "mine").mkdir()
    for name in files:
        (w / "mine" / name).write_text("mine")
    refused(w, *args, "--out", "mine", "--overwrite", cwd=w, needles=(files[0], "never replaces"))
    refused(w, *args, "--out", ".", "--overwrite", cwd=w, needles=("holds",))  # the folder of the inputs
    refused(w, *args, "--out", "run/best/out", cwd=w, needles=("model or run folder",))


def test_folders_are_checked_before_the_model_loads(world, tmp_path):
    for args in (["export", "missing-model"], ["eval", "missing-model", "--data", world / "text.txt"]):
        refused(world, *args, "--out", world / "user", needles=(str(world / "user"),))
        refused(world, *args, "--out", world / "run" / "x", needles=("model or run folder",))


def test_data_files_read_whole_have_a_size_limit(world, tmp_path):
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:
        f.truncate(257 * 2**20)  # sparse: instant, and never read
    needles = ("big.jsonl", "over the limit of 256 MB")
    refused(tmp_path, "data", "convert", big, "--out", tmp_path / "o.jsonl", needles=needles)
    refused(tmp_path, "data", "pairs", world / "run", "--data", big, "--out", tmp_path / "o.jsonl", needles=needles)
    refused(tmp_path, "eval", world / "run", "--data", big, needles=needles)
    big.rename(tmp_path / "big.txt")
    refused(tmp_path, "eval", world / "run", "--data", tmp_path / "big.txt", needles=("big.txt", "256 MB"))


def test_a_folder_or_binary_file_as_data_is_one_line(world, tmp_path):
    (tmp_path / "folder.jsonl").mkdir()
    (tmp_path / "bin.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    refused(tmp_path, "data", "convert", tmp_path / "folder.jsonl", "--out", tmp_path / "o.jsonl",
            needles=("folder.jsonl",))
    refused(tmp_path, "data", "convert", tmp_path / "bin.json", "--out", tmp_path / "o.jsonl", needles=("bin.json",))
    refused(tmp_path, "eval", world / "run", "--data", tmp_path / "bin.json", needles=("bin.json",))


# ----- found by the red team (issue 15's judging) ------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["eval", "run", "--data", "sft.jsonl", "--reference", "run", "--beta", "nan"], "--beta"),
    (["eval", "run", "--data", "sft.jsonl", "--beta", "-1"], "--beta"),
    (["eval", "run", "--data", "sft.jsonl", "--reference", "missing"], "--reference"),  # not preference data
    (["data", "pairs", "run", "--data", "sft.jsonl", "--out", "o.jsonl", "--batch-size", "0"], "--batch-size"),
    (["sft", "run", "--data", "sft.jsonl", "--out", "s", "--eval-examples", "-1"], "--eval-examples"),
    (["sft", "run", "--data", "sft.jsonl", "--out", "s", "--eval-max-new-tokens", "0"], "--eval-max-new-tokens"),
    (["sft", "run", "--data", "sft.jsonl", "--out", "s", "--lora", "--lora-r", "0"], "--lora-r"),
    (["sft", "run", "--data", "sft.jsonl", "--out", "s", "--lora", "--lora-alpha", "nan"], "--lora-alpha"),
    (["sft", "run", "--data", "sft.jsonl", "--out", "s", "--lora", "--lora-dropout", "1.5"], "--lora-dropout"),
    (["dpo", "run", "--data", "pairs.jsonl", "--out", "s", "--eval-samples", "-1"], "--eval-samples"),
    (["dpo", "run", "--data", "pairs.jsonl", "--out", "s", "--val-fraction", "nan"], "--val-fraction"),
])
def test_more_flags_out_of_range(world, tmp_path, args, needle):
    (tmp_path / "sft.jsonl").write_text(json.dumps({"instruction": "say king", "output": "the king"}) + "\n")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "say", "chosen": "the king", "rejected": "no"}) + "\n")
    args = [world / "run" if a == "run" else a for a in args]
    refused(tmp_path, *args, cwd=tmp_path, needles=(needle,), run_out=tmp_path / "s")


@pytest.mark.parametrize("verb,data,extra", [
    ("sft", {"instruction": "say king", "output": "the king"}, ["--lora", "--lora-targets", "nope"]),
    ("sft", {"instruction": "say king", "output": "the king"}, ["--resume", "missing"]),
    ("dpo", {"prompt": "say", "chosen": "the king", "rejected": "no"}, ["--reference", "missing"]),
])
def test_a_refusal_after_the_splits_are_written_leaves_no_run_folder(world, tmp_path, verb, data, extra):
    """The data's splits are written before the model (or adapter, or reference) loads: a refusal then must
    still remove the new run folder."""
    (tmp_path / "d.jsonl").write_text((json.dumps(data) + "\n") * 8)
    refused(tmp_path, verb, world / "run", "--data", tmp_path / "d.jsonl", "--out", tmp_path / "r", "--max-steps", "1",
            "--device", "cpu", *extra, run_out=tmp_path / "r")


# ----- an option that would do nothing is an error, not ignored -----------------------------------
def _inputs(tmp_path):
    (tmp_path / "sft.jsonl").write_text('{"instruction": "the king", "output": "the queen"}\n'
                                        '{"instruction": "night", "output": "day"}\n')
    (tmp_path / "prefs.jsonl").write_text('{"prompt": "the king", "chosen": "the queen", "rejected": "war"}\n')
    (tmp_path / "multi.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}) + "\n")
    (tmp_path / "lines.txt").write_text("question\t\nq\ta\n")
    (tmp_path / "tpl.yaml").write_text('prompt: "Q: {instruction}\\nA:"\nstopp: ["Q:"]\n')
    (tmp_path / "emptytok").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")


@pytest.mark.parametrize("args,needle", [
    (["eval", "{run}", "--data", "{world}/text.txt", "--temperature", "0.9"], "--temperature"),
    (["eval", "{run}", "--data", "{world}/text.txt", "--keyword", "king"], "--keyword"),
    (["eval", "{run}", "--data", "{tmp}/sft.jsonl", "--keyword", " "], "an empty keyword"),
    (["eval", "{run}", "--data", "{tmp}/prefs.jsonl", "--top-p", "0.5"], "--top-p"),
    (["eval", "{run}", "--data", "{tmp}/sft.jsonl", "--beta", "0.1"], "--beta"),
    (["eval", "{run}", "--data", "{tmp}/sft.jsonl", "--template", "{tmp}/tpl.yaml"], "stopp"),
    (["data", "convert", "{tmp}/sft.jsonl", "--out", "{tmp}/o.jsonl", "--batch-size", "4"], "--batch-size"),
    (["data", "convert", "{tmp}/sft.jsonl", "--out", "{tmp}/o.jsonl", "--instruction", "Say"], "--from lines"),
    (["data", "convert", "{tmp}/sft.jsonl", "--out", "{tmp}/o.jsonl", "--split", "test"], "--split"),
    (["data", "convert", "{tmp}/multi.jsonl", "--out", "{tmp}/o.jsonl"], "--to messages"),
    (["data", "convert", "{tmp}/lines.txt", "--from", "lines", "--out", "{tmp}/o.jsonl"], "lines.txt:1"),
    (["data", "convert", "{tmp}/lines.txt", "--from", "lines", "--columns", "instruction=q", "--out", "{tmp}/o.jsonl"],
     "--columns"),
    (["data", "pairs", "{run}", "--data", "{tmp}/sft.jsonl", "--out", "{tmp}/p.jsonl", "--to", "messages"], "--to"),
    (["compare", "{run}", "{run}", "--prompt", "x", "--raw", "--template", "chat"], "--raw"),
    (["finetune", "{run}", "--data", "{world}/data", "--val-fraction", "0.5", "--out", "{tmp}/f", "--max-steps", "1"],
     "--val-fraction"),
    (["prepare", "{world}/text.txt", "--tokenizer", "{world}/tok", "--text-field", "body", "--out", "{tmp}/d"],
     "--text-field"),
    (["prepare", "{world}/text.txt", "--tokenizer", "{tmp}/emptytok", "--out", "{tmp}/d"], "holds no tokenizer"),
    (["prepare", "{world}/text.txt", "--tokenizer", "{world}/tok", "--val-fraction", "0.99999", "--out", "{tmp}/d"],
     "lower --val-fraction"),
    (["tokenizer", "train", "{world}/text.txt", "--kind", "bpe", "--vocab-size", "300", "--lowercase", "--out",
      "{tmp}/t"], "--lowercase"),
    (["generate", "{run}", "--prompt", "the", "--temperature", "0", "--top-p", "0.5"], "--top-p"),
    (["generate", "{run}", "--prompt", "the", "--regex", "[ab]+", "--stop", "a"], "--stop would cut"),
    (["generate", "{run}", "--prompt", "the", "--regex", ""], "needs its text"),  # was: unconstrained output
    (["generate", "{run}", "--prompt", "the", "--draft-k", "3"], "--draft-k"),
    (["chat", "{run}", "--regex", "("], "malformed regular expression"),  # at start-up, not at every turn
    (["eval", "{run}", "--data", "{tmp}/sft.jsonl", "--max-new-tokens", "500"], "no record can be scored"),
    (["data", "convert", "{tmp}/sft.jsonl", "--out", "{tmp}/o.jsonl", "--columns", "instruction=nonexist"],
     "nonexist"),
    (["data", "convert", "{tmp}/sft.jsonl", "--out", "{tmp}/o.jsonl", "--columns", "question=instruction"],
     "did you mean instruction=question"),  # FIELD=HEADER written the other way round
    (["eval", "{run}", "--data", "{tmp}/prefs.jsonl", "--columns", "output=chosen"], "'output' is not a field"),
    (["compare", "{run}", "{run}", "--prompt", "x", "--overwrite"], "--overwrite"),
    (["eval", "{run}", "--data", "{tmp}/prefs.jsonl", "--beta", "5"], "likelihood"),  # no reference to scale
    (["demo", "--quick", "--pretrain-steps", "5", "--out", "{tmp}/demo"], "--pretrain-steps"),
    (["tokenizer", "train", "{world}/text.txt", "--out", "{tmp}/dangling"], "symbolic link"),
    (["plot", "{run}", "--overwrite"], "--overwrite"),
    (["pretrain", "--data", "{world}/data", "--out", "{tmp}/r", "--max-steps", "1", "--force-resume"],
     "--force-resume"),
    (["pretrain", "--data", "{world}/data", "--out", "{tmp}/r", "--max-steps", "1", "--patience", "2",
      "--eval-every", "0"], "--patience"),
    (["eval", "{run}", "--data", "{tmp}/sft.jsonl", "--seed", "3"], "--seed"),  # eval is greedy by default
    (["sft", "{run}", "--data", "{tmp}/sft.jsonl", "--out", "{tmp}/s", "--sample-tokens", "5"], "--sample-tokens"),
    (["sft", "{run}", "--data", "{tmp}/sft.jsonl", "--out", "{tmp}/s", "--factor", "2"], "--factor"),
    (["sft", "{run}", "--data", "{tmp}/sft.jsonl", "--out", "{tmp}/s", "--val-fraction", "0", "--patience", "2",
      "--max-steps", "2"], "no validation data"),
    (["sft", "{run}", "--data", "{tmp}/sft.jsonl", "--out", "{tmp}/s", "--lora", "{tmp}", "--lora-r", "16"],
     "keeps its own settings"),  # continuing an adapter
    (["sft", "{run}", "--data", "{tmp}/sft.jsonl", "--out", "{tmp}/s", "--eval-examples", "0", "--keyword", "x"],
     "--keyword"),
    (["dpo", "{run}", "--data", "{tmp}/prefs.jsonl", "--out", "{tmp}/s", "--eval-samples", "0", "--sample-tokens",
      "5"], "--sample-tokens"),
])
def test_an_option_that_would_do_nothing_is_refused(world, tmp_path, args, needle):
    _inputs(tmp_path)
    args = [a.format(run=world / "run", world=world, tmp=tmp_path) for a in args]
    refused(tmp_path, *args, needles=(needle,))


def test_columns_rename_json_keys_and_eval_leaves_no_report_of_another_evaluation(world, tmp_path):
    (tmp_path / "qa.jsonl").write_text('{"q": "the king", "a": "the queen"}\n')
    run_cli("data", "convert", tmp_path / "qa.jsonl", "--columns", "instruction=q,output=a", "--out",
            tmp_path / "o.jsonl", check=True)
    assert json.loads((tmp_path / "o.jsonl").read_text()) == {"instruction": "the king", "input": "",
                                                                 "output": "the queen"}
    multi = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    (tmp_path / "mix.jsonl").write_text(json.dumps(multi) + "\n" + (tmp_path / "o.jsonl").read_text())
    proc = run_cli("data", "convert", tmp_path / "mix.jsonl", "--on-invalid", "skip", "--out", tmp_path / "m.jsonl",
                   check=True)  # the conversation an Alpaca row cannot hold is left out, and said so
    assert "left out 1" in proc.stdout and (tmp_path / "m.jsonl").read_text() == (tmp_path / "o.jsonl").read_text()
    report = tmp_path / "report"
    run_cli("eval", world / "run", "--data", tmp_path / "o.jsonl", "--out", report, "--max-new-tokens", "2",
            check=True)
    assert (report / "responses.jsonl").exists()
    run_cli("eval", world / "run", "--data", world / "text.txt", "--out", report, check=True)
    assert not (report / "responses.jsonl").exists()  # it described the earlier evaluation
    assert "perplexity" in json.loads((report / "summary.json").read_text())


def test_no_verb_writes_into_a_folder_another_verb_reads_back(world, tmp_path):
    """A tokenizer, prepared data: neither a run (even with --overwrite) nor a loose file goes in them."""
    import shutil

    tok, data = tmp_path / "tok", tmp_path / "data"
    shutil.copytree(world / "tok", tok)
    shutil.copytree(world / "data", data)
    for folder in (tok, data):
        refused(tmp_path, "pretrain", "--data", world / "data", "--out", folder, *TINY, "--max-steps", "1",
                "--overwrite", needles=(str(folder), "another verb"))
        (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
        refused(tmp_path, "data", "convert", tmp_path / "d.jsonl", "--out", folder / "c.jsonl",
                needles=("output folder of",))


def test_a_device_given_as_a_file_is_read_no_further_than_the_limit(world):
    assert_clean_error(run_cli("generate", world / "run", "--prompt", "x", "--json-schema", "/dev/zero"),
                       "/dev/zero", "limit")


def test_an_export_says_what_it_holds(world, tmp_path):
    """info shows the dtype the weights are stored in; a word tokenizer exports as a tokenizer.json that
    transformers' AutoTokenizer reads into the same tokens and text."""
    from transformers import AutoTokenizer

    from gpt2ft.tokenizer import load_tokenizer

    out = tmp_path / "exp"
    run_cli("export", world / "run", "--out", out, "--dtype", "bfloat16", check=True)
    assert "bfloat16" in run_cli("info", out, check=True).stdout
    ours, theirs = load_tokenizer(out), AutoTokenizer.from_pretrained(out)
    assert ours.kind == "word"
    text = "The king\u2019s men \u2014 all (of them) said: \u201cgo!\u201d; an unseenword<|endoftext|>Next"
    ids = ours.encode(text)
    assert theirs.encode(text) == ids and ours.unk_id in ids and ours.eos_id in ids
    assert theirs.decode(ids) == ours.decode(ids)


def test_sft_and_dpo_answer_the_sample_prompts(world, tmp_path):
    """--sample-prompt: a user message answered at each evaluation (through the template), --sample-tokens
    long; it was silently dropped by sft and dpo."""
    (tmp_path / "sft.jsonl").write_text('{"instruction": "the king", "output": "the queen"}\n' * 6)
    (tmp_path / "prefs.jsonl").write_text('{"prompt": "night", "chosen": "day", "rejected": "war"}\n' * 6)
    for verb, data in (("sft", "sft.jsonl"), ("dpo", "prefs.jsonl")):
        run_cli(verb, world / "run", "--data", tmp_path / data, "--out", tmp_path / verb, "--max-steps", "1",
                "--eval-every", "1", "--val-fraction", "0.5", "--sample-prompt", "the king", "--sample-tokens", "3",
                "--template", "instruction-response",
                check=True)
        samples = [json.loads(line) for line in (tmp_path / verb / "samples.jsonl").read_text().splitlines()]
        asked = [s for row in samples for s in row.get("samples", [row]) if "the king" in s.get("prompt", "")]
        assert asked, samples
    evaluations = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in evaluations) and not any("val_ppl" in r for r in evaluations)  # no NLL


def test_an_sft_evaluation_never_ends_the_run_over_long_validation_prompts(world, tmp_path):
    """Every validation prompt longer than the model's context: the run trains, evaluates its loss and saves
    (the generation scores are skipped with a note naming --eval-examples); it used to exit 2 at the first
    evaluation with nothing saved, naming a flag sft does not have."""
    long = " ".join(WORDS * 4)
    rows = [{"instruction": long, "output": "the king"} for _ in range(8)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cli("sft", world / "run", "--data", tmp_path / "d.jsonl", "--out", tmp_path / "r", "--max-steps", "2",
                   "--eval-every", "1", "--val-fraction", "0.5", "--max-length", "24", "--batch-size", "2", check=True)
    assert "generation scores skipped" in proc.stderr and "--eval-examples 0" in proc.stderr
    assert proc.stderr.count("generation scores skipped") == 1  # said once, not at every evaluation
    assert "prompts fill --max-length 24" in proc.stdout  # what truncation did to them, said loudly
    assert "template: alpaca (picked from the data" in proc.stdout
    from gpt2ft.checkpoint import load

    assert load(tmp_path / "r", device="cpu").meta["step"] == 2  # the trained model, saved


def test_finetune_reads_the_text_field_it_is_told_and_a_failed_one_leaves_no_folder(world, tmp_path):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"content": " ".join(WORDS * 3)}) + "\n" for _ in range(8)))
    refused(tmp_path, "finetune", world / "run", "--data", tmp_path / "c.jsonl", "--out", tmp_path / "r",
            "--max-steps", "1", needles=("c.jsonl:1", "--text-field"))
    assert not (tmp_path / "r").exists()  # its half-prepared data/ and lock went with it
    run_cli("finetune", world / "run", "--data", tmp_path / "c.jsonl", "--text-field", "content", "--out",
            tmp_path / "r", "--max-steps", "1", check=True)
    refused(tmp_path, "finetune", world / "run", "--data", world / "data", "--text-field", "content", "--out",
            tmp_path / "r2", "--max-steps", "1", needles=("--text-field has no effect",))


def test_prepare_reads_text_files_in_any_case_and_refuses_records(world, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.TXT").write_text(" ".join(WORDS * 20))
    (docs / "b.pdf").write_text("not text")
    proc = run_cli("prepare", docs, "--tokenizer", world / "tok", "--out", tmp_path / "d", check=True)
    assert "tokenizing 1 file(s)" in proc.stderr and "passed over 1 file(s)" in proc.stderr
    (tmp_path / "t.json").write_text('[{"text": "the king"}]')
    refused(tmp_path, "prepare", tmp_path / "t.json", "--tokenizer", world / "tok", "--out", tmp_path / "d2",
            needles=("t.json", "holds records, not text", ".jsonl"))


def test_eval_shows_its_progress(world, tmp_path):
    _inputs(tmp_path)
    proc = run_cli("eval", world / "run", "--data", tmp_path / "sft.jsonl", "--out", tmp_path / "e",
                   "--template", "instruction-response", "--max-new-tokens", "2", check=True)
    assert "eval: 100%" in proc.stderr and "2/2" in proc.stderr
