"""LoRA: no-op when fresh, only adapters train, merge equals unmerged, PEFT compatibility, exact resume."""
import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_clean_error, run_cli
from gpt2ft.checkpoint import export, load, run_checkpoints
from gpt2ft.lora import LoRAConfig, apply_lora, disable_adapters, merge_lora
from gpt2ft.errors import UserError

TEXT = ("Tomorrow, and tomorrow, and tomorrow, creeps in this petty pace from day to day. " * 40 + "\n\n") * 3


def _digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_fresh_adapter_is_a_no_op_and_disable_restores_base(hf_dir):
    model, _ = load(hf_dir)
    x = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        before = model(x)
        wrapped = apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("c_attn", "c_proj")))
        assert torch.equal(model(x), before)
        assert sorted(set(n.split(".", 3)[-1] for n in wrapped)) == ["attn.c_attn", "attn.c_proj", "mlp.c_proj"]
        for m in model.modules():
            if hasattr(m, "lora_B"):
                torch.nn.init.normal_(m.lora_B.weight)
        assert not torch.allclose(model(x), before)
        with disable_adapters(model):
            assert torch.equal(model(x), before)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert "transformer.h.0.attn.c_attn.weight" in model.state_dict()  # the base keys are kept


def test_merged_equals_unmerged(hf_dir):
    model, _ = load(hf_dir)
    apply_lora(model, LoRAConfig(r=4, alpha=16, dropout=0.0, targets=("c_attn", "c_proj", "mlp.c_fc")))
    for m in model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    x = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)
        assert not any("lora_" in k for k in model.state_dict())
        assert (model(x) - unmerged).abs().max().item() <= 1e-5


@pytest.fixture(scope="module")
def lora_run(hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    (root / "text.txt").write_text(TEXT)
    base_before = _digests(hf_dir)
    run = root / "run"
    proc = run_cli("finetune", hf_dir, "--data", root / "text.txt", "--out", run, "--lora", "--lora-r", "4",
                   "--lora-alpha", "8", "--lora-dropout", "0.1", "--max-steps", "6", "--batch-size", "2",
                   "--max-length", "32", "--lr", "1e-2", "--warmup-steps", "0", "--eval-every", "3",
                   "--save-every", "3", "--device", "cpu", "--no-progress", check=True)
    assert "trainable parameters" in proc.stdout
    assert _digests(hf_dir) == base_before  # the base files are untouched
    return root, run


def test_lora_checkpoint_holds_only_the_adapter(lora_run, hf_dir):
    root, run = lora_run
    ckpt = run_checkpoints(run)[0]
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "gpt2ft.json"} <= names
    assert "model.safetensors" not in names and "config.json" not in names
    size = (ckpt / "adapter_model.safetensors").stat().st_size
    assert size < 0.05 * (hf_dir / "model.safetensors").stat().st_size
    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.transformer.h.") and ".lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # it trained
    model, _ = load(run)
    base, _ = load(hf_dir)
    trained = dict(model.state_dict())
    for k, v in base.state_dict().items():  # only adapter tensors differ from the base
        assert torch.equal(trained[k], v), k


def test_peft_loads_our_adapter_with_equal_logits(lora_run, hf_model):
    from peft import PeftModel

    root, run = lora_run
    ckpt = run_checkpoints(run)[0]
    ours, _ = load(run)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_model), ckpt).eval()  # PEFT edits it in place
    x = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert (peft_model(x).logits - ours(x)).abs().max().item() <= 1e-5


def test_merge_lora_export_loads_in_transformers(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    root, run = lora_run
    ours, _ = load(run)
    out = export(str(run), tmp_path / "merged", merge_lora=True)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= 1e-5
    proc = run_cli("export", run, "--out", tmp_path / "unmerged")
    assert proc.returncode != 0 and "--merge-lora" in proc.stderr


def test_adapter_on_top_of_base_in_generate(lora_run, hf_dir):
    root, run = lora_run
    ckpt = run_checkpoints(run)[0]
    args = ["--prompt", "Tomorrow", "--temperature", "0", "--max-new-tokens", "8"]
    via_run = run_cli("generate", run, *args, check=True).stdout
    via_flag = run_cli("generate", hf_dir, "--lora", ckpt, *args, check=True).stdout
    plain = run_cli("generate", hf_dir, *args, check=True).stdout
    assert via_run == via_flag and via_run != plain


def test_lora_resume_is_exact(lora_run, hf_dir, tmp_path):
    root, _ = lora_run
    common = ["finetune", hf_dir, "--data", root / "run" / "data", "--lora", "--lora-r", "4", "--batch-size", "2",
              "--max-length", "32", "--lr", "1e-2", "--warmup-steps", "0", "--eval-every", "0", "--dropout", "0.1",
              "--lora-dropout", "0.1", "--device", "cpu", "--no-progress", "--max-steps", "6"]
    run_cli(*common, "--out", tmp_path / "full", check=True)
    run_cli(*common, "--out", tmp_path / "half", "--save-every", "3", check=True)
    # drop the end, keep step 3, and resume from it
    import shutil

    for ckpt in run_checkpoints(tmp_path / "half"):
        if ckpt.name != "step-00000003":
            shutil.rmtree(ckpt)
    resume = [*common, "--out", tmp_path / "half", "--resume", "auto"]
    changed = run_cli(*resume, "--lora-alpha", "64")  # another adapter scale: not the run it continues
    assert_clean_error(changed, "the run changed since its checkpoint", "'alpha': 16.0", "'alpha': 64.0")
    lora_flags = {i for i, a in enumerate(resume) if a in ("--lora-r", "--lora-dropout")}
    without = [a for i, a in enumerate(resume) if a != "--lora" and i not in lora_flags and i - 1 not in lora_flags]
    assert_clean_error(run_cli(*without), "lora: {", "-> None")  # a LoRA run resumed as a full one
    proc = run_cli(*common, "--out", tmp_path / "half", "--resume", "auto", check=True)
    assert "resumed from" in proc.stderr and "step 3" in proc.stderr
    a = load_file(run_checkpoints(tmp_path / "full")[0] / "adapter_model.safetensors")
    b = load_file(run_checkpoints(tmp_path / "half")[0] / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_on_a_model_that_already_has_adapters_names_the_real_reason(lora_run, tmp_path):
    root, run = lora_run
    prefs = tmp_path / "p.jsonl"
    prefs.write_text(json.dumps({"prompt": "Tomorrow?", "chosen": "And tomorrow.", "rejected": "Today."}) + "\n")
    for verb, data in (("dpo", prefs), ("finetune", root / "text.txt")):
        proc = run_cli(verb, run, "--data", data, "--lora", "--out", tmp_path / verb, "--device", "cpu")
        assert_clean_error(proc, "already carries a LoRA adapter", "drop --lora", f"gpt2ft export {run} --merge-lora")
        assert "--lora-targets" not in proc.stderr and not (tmp_path / verb).exists()
    proc = run_cli("generate", run, "--lora", run, "--prompt", "Tomorrow?", "--device", "cpu")  # a second adapter
    assert_clean_error(proc, f"--lora {run}: ", "already carries a LoRA adapter", "--merge-lora")
    assert "--lora-targets" not in proc.stderr
    with pytest.raises(UserError, match=f"^lora {run}: .* already carries"):  # the API names its keyword
        load(run, lora=str(run))


def test_sft_with_lora(hf_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}", "output": w}) + "\n"
                            for w in ["yes", "no", "maybe", "later", "never", "always"] * 3))
    run = tmp_path / "run"
    run_cli("sft", hf_dir, "--data", data, "--out", run, "--lora", "--lora-targets", "c_attn,mlp.c_fc",
            "--max-steps", "3", "--eval-every", "0", "--device", "cpu", "--no-progress", check=True)
    cfg = json.loads((run / "latest" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["c_attn", "mlp.c_fc"] and cfg["peft_type"] == "LORA"
    assert json.loads((run / "latest" / "gpt2ft.json").read_text())["template"]["name"] == "alpaca"
    assert load(run).meta["lora"]["r"] == 8


def test_lora_with_activation_checkpointing_gives_the_same_gradients(hf_dir):
    grads = []
    for checkpointing in (False, True):
        model, _ = load(hf_dir)
        torch.manual_seed(0)
        apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
        for m in model.modules():
            if hasattr(m, "lora_B"):
                torch.nn.init.normal_(m.lora_B.weight, std=0.02)
        model.train()
        model.gradient_checkpointing = checkpointing
        x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
        model(x).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6), k


def test_eval_with_an_adapter_records_it(lora_run, hf_dir, tmp_path):
    """summary.json names the --lora adapter it was evaluated with, not just the base model."""
    root, run = lora_run
    adapter = run_checkpoints(run)[0]
    run_cli("eval", hf_dir, "--lora", adapter, "--data", root / "text.txt", "--out", tmp_path / "e", check=True)
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["adapter"] == str(adapter) and "perplexity" in summary
