"""`gpt2ft dpo` end to end on a tiny from-scratch model: SFT'd on both a plain and a longer, assured answer
to each question, DPO teaches it to prefer the assured one (held-out accuracy, sigmoid, ipo and simpo);
exact resume after SIGKILL; LoRA-DPO with the adapters-off reference; precomputed reference cache;
bad data; eval and data pairs."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import assert_clean_error, run_cli
from gpt2ft.checkpoint import run_checkpoints, save_model
from gpt2ft.config import GPTConfig
from gpt2ft.model import GPT
from gpt2ft.templates import get_template
from gpt2ft.tokenizer import train_tokenizer

CPU = ["--device", "cpu", "--no-progress"]
COLOURS = {"grass": "green", "snow": "white", "coal": "black", "blood": "red", "the sky": "blue", "a lemon": "yellow"}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    """(folder, SFT'd model, preference file): the model saw both answers (and, briefly trained, finds the
    shorter one likelier); DPO must make it prefer the longer one."""
    root = tmp_path_factory.mktemp("dpo")
    qa = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a in range(1, 8) for b in range(1, 8)]
    qa += [(f"Which colour is {t}?", f"{t.capitalize()} is {c}.") for t, c in COLOURS.items()]
    hedge = lambda answer: answer[:-1] + ", I am sure."
    sft = [{"instruction": q, "input": "", "output": out} for q, a in qa for out in (a, hedge(a))]
    prefs = _jsonl(root / "prefs.jsonl", [{"prompt": q, "chosen": hedge(a), "rejected": a} for q, a in qa])
    corpus = [x for r in sft for x in (r["instruction"], r["output"])]
    tok = train_tokenizer((corpus + [get_template("instruction-response").prompt_no_input]) * 3, "bpe", 400)
    torch.manual_seed(0)
    save_model(root / "base", GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=tok.vocab_size,
                                            eos_token_id=tok.eos_id, bos_token_id=tok.eos_id)), tok)
    run_cli("sft", root / "base", "--data", _jsonl(root / "sft.jsonl", sft), "--out", root / "sft",
            "--template", "instruction-response", "--val-fraction", "0", "--test-fraction", "0", "--max-steps", "60",
            "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "5", "--eval-every", "0", *CPU, check=True)
    return root, root / "sft", prefs


def _eval(model, data, *extra):
    proc = run_cli("eval", model, "--data", data, "--device", "cpu", *extra, check=True)
    return {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines() if len(line.split()) == 2}


def _metrics(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "simpo"])
def test_dpo_lifts_held_out_preference_accuracy(sft_model, tmp_path, loss):
    root, sft, prefs = sft_model
    run = tmp_path / loss
    run_cli("dpo", sft, "--data", prefs, "--out", run, "--loss", loss, "--epochs", "2", "--lr", "2.4e-4", "--val-fraction", "0.25",
            "--test-fraction", "0", "--eval-every", "0", *CPU, check=True)
    meta = json.loads((run / "latest" / "gpt2ft.json").read_text())
    assert meta["objective"] == "dpo" and meta["loss"] == loss and meta["template"]["name"] == "instruction-response"
    val = run / "splits" / "val.jsonl"
    before, after = _eval(sft, val), _eval(run, val)
    assert float(before["likelihood_accuracy"]) <= 0.5  # the SFT model does not prefer the chosen answers
    assert float(after["preference_accuracy"]) >= 0.9, (before, after)
    assert float(after["mean_logp_margin"]) > float(before["mean_logp_margin"]) + 0.5
    first, last = _metrics(run)[0], _metrics(run)[-1]  # the loop evaluates at step 0 and at the end
    assert last["val_reward_accuracy"] >= 0.9 and last["val_reward_margin"] > first["val_reward_margin"]
    assert {"train_loss", "train_reward_chosen", "train_reward_rejected", "train_reward_margin",
            "train_reward_accuracy", "train_logp_chosen", "train_logp_rejected"} <= set(_metrics(run)[1])
    if loss != "simpo":  # scored by the implicit reward against the run's own reference, the SFT model
        assert first["val_reward_accuracy"] == 0.5 and first["val_reward_margin"] == 0  # policy == reference
        assert after["reference"].startswith(str(sft))
        assert _eval(sft, val, "--reference", sft)["preference_accuracy"] == "0.5000"  # ties: chance
    run_cli("plot", run, check=True)
    assert (run / "loss.png").exists()


def _popen(args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "gpt2ft.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_then_resume_is_bitwise_exact(sft_model, tmp_path):
    from safetensors.torch import load_file

    root, sft, prefs = sft_model
    args = lambda out: ["dpo", sft, "--data", prefs, "--out", out, "--max-steps", "40", "--save-every", "1",
                        "--eval-every", "8", "--log-every", "1", *CPU]
    assert _popen(args(tmp_path / "ref")).wait(timeout=300) == 0
    run = tmp_path / "killed"
    proc = _popen(args(run))
    deadline = time.time() + 120
    steps = lambda: [int(c.name.split("-")[1]) for c in (run / "checkpoints").glob("step-*")]
    while (not (run / "checkpoints").exists() or max(steps(), default=0) < 5) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(0).uniform(0, 0.5))  # somewhere in a later step or save
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run
    proc = _popen(args(run) + ["--resume", "auto"])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "resumed from" in err, err
    a, b = (load_file(run_checkpoints(r)[0] / "model.safetensors") for r in (tmp_path / "ref", run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_dpo_precomputed_reference_is_cached_and_reused(sft_model, tmp_path):
    root, sft, prefs = sft_model
    run = tmp_path / "lora"
    args = ["dpo", sft, "--data", prefs, "--out", run, "--lora", "--precompute-reference", "--max-steps", "4",
            "--lr", "1e-3", "--eval-every", "0", *CPU]
    first = run_cli(*args, check=True)
    assert "reference log-probs: computing" in first.stdout + first.stderr
    assert (run / "reference_logps" / "logps.pt").exists() and (run / "latest" / "adapter_model.safetensors").exists()
    meta = json.loads((run / "latest" / "gpt2ft.json").read_text())
    assert meta["reference"] == "adapters-off" and meta["precomputed_reference"]
    again = run_cli(*args[:-len(CPU)], "--max-steps", "6", "--resume", "auto", *CPU, check=True)
    assert "reference log-probs: reusing" in again.stdout + again.stderr
    assert "resumed from" in again.stderr


def test_bad_pairs_are_reported_before_the_model_loads(tmp_path):
    data = _jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q2", "chosen": "a"},
                                         {"prompt": "q3", "chosen": "same", "rejected": "same"}])
    assert_clean_error(run_cli("dpo", tmp_path / "no-such-model", "--data", data, "--out", tmp_path / "run"),
                       f"{data}:2", "missing field 'rejected'", "--on-invalid skip")
    assert_clean_error(run_cli("dpo", tmp_path / "m", "--data", data, "--out", tmp_path / "r", "--loss", "kto"),
                       "--loss", "invalid choice")


def test_skipped_and_dropped_pairs_go_to_rejected_jsonl(sft_model, tmp_path):
    root, sft, prefs = sft_model
    rows = [json.loads(l) for l in prefs.read_text().splitlines()][:12]
    rows += [{"prompt": "q", "chosen": "a"}, {"prompt": "q", "chosen": "same", "rejected": "same"}]
    run = tmp_path / "run"
    proc = run_cli("dpo", sft, "--data", _jsonl(tmp_path / "p.jsonl", rows), "--out", run, "--on-invalid", "skip",
                   "--loss", "orpo", "--max-steps", "2", "--eval-every", "0", *CPU, check=True)
    rejected = [json.loads(l) for l in (run / "rejected.jsonl").read_text().splitlines()]
    assert [(r["where"].split(":")[-1], r["dropped"]) for r in rejected] == [("13", False), ("14", True)]
    assert "kept 12" in proc.stdout


def test_data_pairs_keeps_answers_that_differ(sft_model, tmp_path):
    root, sft, prefs = sft_model
    data = _jsonl(tmp_path / "i.jsonl", [{"instruction": "What is 1 plus 1?", "input": "", "output": "1 plus 1 is 2."},
                                         {"instruction": "Which colour is snow?", "input": "", "output": "Nothing like it."}])
    run_cli("data", "pairs", sft, "--data", data, "--out", tmp_path / "p.jsonl", "--temperature", "0",
            "--max-new-tokens", "16", "--device", "cpu", check=True)
    rows = [json.loads(l) for l in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert rows and all(r["chosen"] != r["rejected"] and r["prompt"] for r in rows)
    assert any(r["chosen"] == "Nothing like it." for r in rows)  # the model never says that


def test_another_model_as_reference(sft_model, hf_dir, tmp_path, monkeypatch):
    """--reference MODEL, given relative: recorded as the checkpoint it loaded, so that the run resumes through
    its own config.yaml from another folder (and MODEL, a run folder, is recorded as its checkpoint too)."""
    import os

    import yaml

    root, sft, prefs = sft_model
    run = tmp_path / "other"
    monkeypatch.chdir(root)
    run_cli("dpo", sft, "--data", prefs, "--out", run, "--reference", "base", "--precompute-reference",
            "--max-steps", "1", "--eval-every", "0", *CPU, check=True)
    meta = json.loads((run / "latest" / "gpt2ft.json").read_text())
    assert meta["reference_model"] == os.path.realpath(root / "base") and meta["precomputed_reference"]
    options = yaml.safe_load((run / "config.yaml").read_text())["options"]
    assert options["reference"] == os.path.realpath(root / "base")
    assert options["model"] == os.path.realpath(sft / "latest")  # the run folder's checkpoint, not the folder
    monkeypatch.chdir(tmp_path)
    run_cli("dpo", "--config", run / "config.yaml", "--resume", "auto", "--max-steps", "2", check=True)
    assert_clean_error(run_cli("dpo", sft, "--data", prefs, "--out", tmp_path / "bad", "--reference", hf_dir, *CPU),
                       "its tokenizer differs")
