"""The recipe layer: the loss registry drives the CLI; flags a loss does not take are refused before
anything is touched; --out may never be, hold or lie inside an input; sft and dpo pick their template
through the one picker; the run folder is opened once, by the recipe."""
import json
from pathlib import Path

import pytest
import torch

from conftest import assert_clean_error, run_cli, snapshot
from gpt2ft.errors import UserError
from gpt2ft.losses import IMPLEMENTATIONS
from gpt2ft.preference_losses import PREFERENCE_LOSSES, PreferenceLoss
from gpt2ft.objectives_pref import PreferenceConfig
from gpt2ft.recipes import DPOConfig, SFTConfig, Start, dpo, sft
from gpt2ft.templates import TEMPLATES, pick_template
from gpt2ft.train import TrainConfig

CONVERSATION = [{"role": "user", "content": "Who wrote Hamlet?"}, {"role": "assistant", "content": "Shakespeare."},
                {"role": "user", "content": "And Macbeth?"}]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def refused(root: Path, *args, needles=(), out: Path | None = None):
    """A command refused with one clean error line: no file under root changed, none added, no --out left."""
    before, existed = snapshot(root), out is not None and out.exists()
    proc = run_cli(*args)
    assert_clean_error(proc, *needles)
    assert snapshot(root) == before, "a refused command changed files"
    assert out is None or out.exists() == existed, f"a refused command left {out} behind"


def _train_config(out, **kw):
    return TrainConfig(out=str(out), **{"max_steps": 1, "batch_size": 2, "device": "cpu", "progress": False,
                                        "eval_every": 0, "warmup_steps": 0, "dropout": 0.0, **kw})


@pytest.fixture(scope="module")
def world(hf_dir, tmp_path_factory):
    """Multi-turn instruction data, the same conversations as preference pairs, and a finished SFT run
    (tuned with instruction-response, not the chat template the data alone would pick)."""
    root = tmp_path_factory.mktemp("recipes")
    turns = [[*CONVERSATION[:2], {"role": "user", "content": f"And play {i}?"}] for i in range(6)]
    _jsonl(root / "chats.jsonl", [{"messages": [*t, {"role": "assistant", "content": f"Also him ({i})."}]}
                                  for i, t in enumerate(turns)])
    _jsonl(root / "prefs.jsonl", [{"prompt": t, "chosen": [{"role": "assistant", "content": f"Shakespeare ({i})."}],
                                   "rejected": [{"role": "assistant", "content": "Marlowe."}]}
                                  for i, t in enumerate(turns)])
    sft(SFTConfig(_train_config(root / "run"), Start(str(hf_dir)), str(root / "chats.jsonl"),
                  template="instruction-response", val_fraction=0, test_fraction=0)).train()
    return root


# ----- the loss registry ------------------------------------------------------------------------------
def _dpo_loss_action():
    from gpt2ft.cli import build_parser

    verbs = next(a for a in build_parser()._actions if a.dest == "verb")
    return next(a for a in verbs.choices["dpo"]._actions if a.dest == "loss")


def test_cli_loss_choices_and_help_come_from_the_registry(monkeypatch):
    action = _dpo_loss_action()
    assert action.choices == list(PREFERENCE_LOSSES)
    assert all(loss.help in action.help for loss in PREFERENCE_LOSSES.values())
    assert set(IMPLEMENTATIONS) == set(PREFERENCE_LOSSES)  # every declared loss has its function, and no more
    # one declaration and its function are all a new loss needs: the CLI offers it, the config takes it,
    # the objective runs it
    monkeypatch.setitem(PREFERENCE_LOSSES, "toy", PreferenceLoss("toy", True, "a constant, for this test"))
    monkeypatch.setitem(IMPLEMENTATIONS, "toy", lambda p, beta: (p.chosen * 0 + beta, p.chosen.detach(),
                                                                 p.rejected.detach()))
    assert "toy" in _dpo_loss_action().choices
    from gpt2ft.losses import preference_loss

    out = preference_loss("toy", *(torch.zeros(2),) * 2, *(torch.ones(2),) * 2, *(torch.zeros(2),) * 2,
                          beta=PreferenceConfig("toy", beta=0.7).beta)
    assert out["loss"].tolist() == pytest.approx([0.7, 0.7])


@pytest.mark.parametrize("loss", [name for name, loss in PREFERENCE_LOSSES.items() if not loss.needs_reference])
def test_a_reference_free_loss_refuses_reference_flags(loss, world):
    for flags in ({"reference": str(world / "run")}, {"reference": "copy"}, {"precompute_reference": True}):
        with pytest.raises(UserError, match=f"does not apply to --loss {loss}.*reference-free"):
            DPOConfig(_train_config(world / "new"), Start("m"), "d", PreferenceConfig(loss), **flags)
    assert not PreferenceConfig(loss).definition.needs_reference


@pytest.mark.parametrize("flags,needles", [
    (["--loss", "simpo", "--precompute-reference"], ("--precompute-reference", "simpo", "reference-free")),
    (["--loss", "orpo", "--reference", "MODEL"], ("--reference", "orpo", "reference-free")),
    (["--loss", "orpo", "--beta", "0.2"], ("--beta", "orpo")),
    (["--loss", "sigmoid", "--gamma", "1"], ("--gamma", "only to simpo")),
    (["--loss", "ipo", "--label-smoothing", "0.1"], ("--label-smoothing", "only to sigmoid, robust")),
    (["--lambda", "0.3"], ("--lambda", "sigmoid", "only to orpo")),
    (["--device", "tpu"], ("--device",)),
])
def test_a_flag_the_loss_does_not_take_is_refused_before_anything_is_touched(world, tmp_path, flags, needles):
    model = world / "run"
    flags = [str(model) if f == "MODEL" else f for f in flags]
    refused(world, "dpo", model, "--data", world / "prefs.jsonl", "--out", tmp_path / "out", *flags,
            needles=needles, out=tmp_path / "out")


# ----- --out is never an input ------------------------------------------------------------------------
def test_overwrite_onto_the_reference_leaves_it_byte_identical(world, hf_dir):
    run = world / "run"
    assert (run / "latest" / "COMPLETE").exists()  # a finished run
    refused(world, "dpo", hf_dir, "--data", world / "prefs.jsonl", "--reference", run, "--out", run, "--overwrite",
            "--device", "cpu", needles=("--out", "--reference", "never overwritten"))


@pytest.mark.parametrize("case", ["model", "inside model", "data folder", "lora"])
def test_every_training_verb_refuses_an_out_that_is_holds_or_lies_inside_an_input(world, hf_dir, case):
    run, chats = world / "run", world / "chats.jsonl"
    args = {"model": ["sft", run, "--data", chats, "--out", run, "--overwrite"],
            "inside model": ["finetune", run, "--data", chats, "--out", run / "again"],
            "data folder": ["pretrain", "--data", world, "--out", world / "pre", "--overwrite"],
            "lora": ["sft", hf_dir, "--data", chats, "--lora", run, "--out", world]}[case]
    refused(world, *args, "--device", "cpu", needles=("is, holds or lies inside",))


# ----- one template picker, one run folder --------------------------------------------------------------
def test_sft_and_dpo_pick_the_same_template_through_the_one_picker(world, hf_dir, tmp_path, monkeypatch):
    conversations = [json.loads(line)["messages"] for line in (world / "chats.jsonl").read_text().splitlines()]
    untuned = pick_template(None, None, conversations)
    tuned = world / "run"  # its saved template wins over the data's
    for model, expected in ((hf_dir, untuned), (tuned, TEMPLATES["instruction-response"])):
        plans = [sft(SFTConfig(_train_config(tmp_path / f"sft-{model.name}"), Start(str(model)),
                               str(world / "chats.jsonl"), val_fraction=0, test_fraction=0)),
                 dpo(DPOConfig(_train_config(tmp_path / f"dpo-{model.name}"), Start(str(model)),
                               str(world / "prefs.jsonl"), PreferenceConfig(), val_fraction=0, test_fraction=0))]
        assert [p.template for p in plans] == [expected, expected]
        assert [p.meta["template"] for p in plans] == [expected.to_dict()] * 2
    assert untuned.name == "chat"
    # the recipe opened the run folder; the loop trains in it without opening it again
    monkeypatch.setattr("gpt2ft.train.loop.open_run", lambda *a, **k: pytest.fail("train() opened the run again"))
    assert plans[1].train() is not None
    meta = json.loads((tmp_path / f"dpo-{tuned.name}" / "latest" / "gpt2ft.json").read_text())
    assert meta["template"]["name"] == "instruction-response" and meta["reference"] == "copy"
