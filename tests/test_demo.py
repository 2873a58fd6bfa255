import json

from conftest import run_cli
from gpt2ft.checkpoint import load


def test_quick_demo_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--quick", "--out", out, "--device", "cpu", check=True)
    for path in ("tokenizer/vocab.json", "data/train.bin", "pretrain/loss.png", "sft/loss.png",
                 "sft/splits/test.jsonl", "eval/summary.json", "eval/responses.jsonl", "before_after.md",
                 "dpo/loss.png", "prefs_sft/summary.json", "prefs_dpo/summary.json", "sft_vs_dpo.md"):
        assert (out / path).exists(), path
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["examples"] > 0 and 0 <= summary["rougeL"] <= 1
    model, tok = load(out / "sft")
    assert load(out / "sft").meta["template"]["name"] == "instruction-response" and tok.vocab_size == 1024
    assert "$ gpt2ft sft" in proc.stdout and "demo finished" in proc.stdout
    prefs = json.loads((out / "prefs_dpo" / "summary.json").read_text())
    assert prefs["pairs"] > 0 and 0 <= prefs["preference_accuracy"] <= 1 and prefs["reference"].endswith("sft")
    assert load(out / "dpo").meta["objective"] == "dpo"
    assert "HAMLET:" in (out / "pretrain_samples.md").read_text()
    again = run_cli("demo", "--quick", "--out", out, "--device", "cpu")  # never silently over an earlier demo
    assert again.returncode != 0 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
