"""The quickstart from a model one already has, and offline: in a file of their own so that pytest-xdist runs
them beside the whole-pipeline demo test (test_demo.py), not after it on the same worker."""
from conftest import run_cli
from gpt2ft.checkpoint import load


def test_quick_demo_from_an_existing_model_skips_pretraining(hf_dir, tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--quick", "--model", hf_dir, "--out", out, "--device", "cpu", check=True)
    assert "pretrain a small GPT-2" not in proc.stdout and not (out / "pretrain").exists()
    assert (out / "sft" / "loss.png").exists() and (out / "before_after.md").exists()
    assert load(out / "sft").meta["base_model"] == str(hf_dir)


def test_an_offline_demo_that_fails_in_its_first_stage_leaves_nothing_that_blocks_a_rerun(tmp_path):
    out = tmp_path / "demo"
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    for attempt in range(2):  # the retry meets the same error again, not "holds an earlier demo"
        proc = run_cli("demo", "--quick", "--model", "gpt2", "--out", out, "--device", "cpu", env=env)
        assert proc.returncode != 0 and "not in the local Hugging Face cache" in proc.stderr, proc.stderr
        assert "earlier demo" not in proc.stderr and not out.exists()
