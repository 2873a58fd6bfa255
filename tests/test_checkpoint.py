import json
import os
import pickle
import struct
import shutil

import pytest
import torch

from conftest import assert_clean_error, run_cli
from gpt2ft.checkpoint import export, load, save_model, verify_checkpoint
from gpt2ft.errors import UserError


def test_export_loads_in_transformers_with_identical_logits(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = tiny_model
    out = export(str(tiny_model.source), tmp_path / "exported")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 50257, (2, 30))
    with torch.no_grad():
        assert torch.equal(hf(x).logits, model(x)) or (hf(x).logits - model(x)).abs().max() <= 1e-6


def test_hf_to_ours_to_hf_is_exact(hf_model, tiny_model, tmp_path):
    model, tok = tiny_model
    save_model(tmp_path / "ckpt", model, tok)
    from transformers import GPT2LMHeadModel

    back = GPT2LMHeadModel.from_pretrained(tmp_path / "ckpt")
    theirs = hf_model.state_dict()
    for key, value in back.state_dict().items():
        if key in theirs:
            assert torch.equal(value, theirs[key]), key


def test_export_bfloat16_and_transformers_tokenizer(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    model, tok = tiny_model
    out = export(str(tiny_model.source), tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok("Hello world")["input_ids"] == [15496, 995]


def test_saved_checkpoint_has_marker_and_verifies(tiny_model, tmp_path):
    model, tok = tiny_model
    folder = save_model(tmp_path / "c", model, tok, meta={"step": 3})
    assert verify_checkpoint(folder) is None
    with open(folder / "model.safetensors", "r+b") as f:  # flip one byte
        f.seek(200)
        b = f.read(1)
        f.seek(200)
        f.write(bytes([b[0] ^ 1]))
    assert "hash" in verify_checkpoint(folder)
    assert not list(tmp_path.glob(".tmp-*"))


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARKER']}",))


def test_malicious_pickle_is_refused_and_runs_nothing(hf_dir, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": _Evil()}, f)
    with pytest.raises(UserError, match="refused"):
        load(tmp_path)
    assert not marker.exists()
    proc = run_cli("info", tmp_path, env={"EVIL_MARKER": str(marker)})
    assert_clean_error(proc, "refused", "pytorch_model.bin")
    assert not marker.exists()


def test_malformed_safetensors_fail_fast(hf_dir, tmp_path):
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(UserError, match="malformed safetensors header"):
        load(tmp_path)
    data = (hf_dir / "model.safetensors").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        load(tmp_path)
    assert_clean_error(run_cli("info", tmp_path), "truncated", "model.safetensors")


def test_missing_unexpected_and_mismatched_keys_are_named(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(hf_dir / "model.safetensors")
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    del state["transformer.h.1.mlp.c_fc.bias"]
    state["transformer.h.0.attn.c_proj.weight"] = torch.zeros(5, 5)
    state["transformer.extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(UserError) as e:
        load(tmp_path)
    msg = str(e.value)
    assert "transformer.h.1.mlp.c_fc.bias" in msg and "transformer.extra.weight" in msg
    assert "transformer.h.0.attn.c_proj.weight: shape (5, 5)" in msg


def test_gpt2model_checkpoint_without_prefix_and_old_buffers(hf_model, tmp_path):
    """The original openai-community/gpt2 files hold GPT2Model keys (no 'transformer.') and attn.bias buffers."""
    from safetensors.torch import save_file

    hf_model.config.save_pretrained(tmp_path)
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in hf_model.state_dict().items()
             if k != "lm_head.weight"}
    state["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    save_file(state, tmp_path / "model.safetensors")
    model, _ = load(tmp_path)
    x = torch.randint(0, 50257, (1, 12))
    with torch.no_grad():
        assert (model(x) - hf_model(x).logits).abs().max() <= 1e-5


def test_hub_id_offline_not_cached_gives_clear_message(tmp_path):
    proc = run_cli("info", "openai-community/gpt2", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert_clean_error(proc, "openai-community/gpt2", "cache", "local folder")


def test_hub_id_loads_from_the_hf_cache_offline(hf_dir, tmp_path):
    """Lay the folder out as huggingface_hub caches a download; load it by id with HF_HUB_OFFLINE=1."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-gpt2"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in hf_dir.iterdir():
        shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    proc = run_cli("info", "someone/tiny-gpt2", "--json", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)},
                   check=True)
    info = json.loads(proc.stdout)
    assert info["config"]["n_layer"] == 2 and info["source"] == str(snap)


def test_run_folder_resolves_to_newest_complete_checkpoint(tiny_model, tmp_path):
    from gpt2ft.checkpoint import resolve

    model, tok = tiny_model
    run = tmp_path / "run"
    save_model(run / "checkpoints" / "step-00000002", model, tok)
    save_model(run / "checkpoints" / "step-00000005", model, tok)
    (run / "checkpoints" / "step-00000009").mkdir()  # interrupted: no marker
    assert resolve(run).name == "step-00000005"
    with pytest.raises(UserError, match="no such model folder"):
        resolve(tmp_path / "nope")


def test_write_error_during_save_names_the_path_and_keeps_older_checkpoints(tiny_model, tmp_path, monkeypatch):
    import errno

    model, tok = tiny_model
    good = save_model(tmp_path / "good", model, tok)
    before = (good / "model.safetensors").read_bytes()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(UserError, match="could not write .*No space left on device"):
        save_model(tmp_path / "next", model, tok)
    monkeypatch.undo()
    assert not (tmp_path / "next").exists() and not list(tmp_path.glob(".tmp-*"))
    assert (good / "model.safetensors").read_bytes() == before and verify_checkpoint(good) is None


@pytest.mark.parametrize("change, key", [
    ({"scale_attn_weights": False}, "scale_attn_weights"),  # loaded with scaled attention before: wrong logits
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"activation_function": "relu"}, "activation_function"),
    ({"n_inner": 100}, "n_inner"),
    ({"tie_word_embeddings": False}, "untied"),
    ({"model_type": "gpt_neo"}, "model_type"),
])
def test_a_gpt2_variant_this_model_does_not_implement_is_refused(change, key):
    from gpt2ft.config import GPTConfig

    with pytest.raises(UserError, match=key):
        GPTConfig.from_hf({"model_type": "gpt2", "n_embd": 32, **change}, source="x/config.json")


def test_a_path_that_is_no_model_folder_says_what_it_is(tmp_path):
    """A trailing slash makes a missing path local (not a Hub id); a file is not a model folder; a dtype a
    model does not compute in is refused in words, not by torch."""
    from gpt2ft.checkpoint import resolve

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    for ref, needle in ((f"{tmp_path.name}_missing/", "no such model folder"), (tmp_path / "m.gguf", "is a file")):
        with pytest.raises(UserError, match=needle):
            resolve(ref)
    with pytest.raises(UserError, match="float32, bfloat16 or float16"):
        load(tmp_path, dtype=torch.int8)
