"""The DPO objective against TRL's DPOTrainer (first step on the same HF model, data and beta), and its
references (types): a precomputed or adapters-off reference gives the live frozen copy's loss."""
import pytest
import torch

from gpt2ft.checkpoint import load
from gpt2ft.data.preferences import PreferencePair
from gpt2ft.errors import UserError
from gpt2ft.objectives_pref import (AdaptersOff, FrozenCopy, NoReference, OtherModel, Precomputed, PreferenceConfig,
                                    PreferenceOptimization, weights_fingerprint)
from gpt2ft.templates import get_template

ALPACA = get_template("alpaca")
QA = [("Who speaks first in Macbeth?", "First Witch speaks first in Macbeth.", "Duncan speaks first in Macbeth."),
      ("What kind of play is Hamlet?", "Hamlet is a tragedy.", "Hamlet is a comedy, and a long one at that."),
      ("In which play does Puck appear?", "Puck appears in A Midsummer Night's Dream.", "Puck appears in Othello."),
      ("How many acts does Othello have?", "Othello has 5 acts.", "Well, it is hard to say.")]
PAIRS = [PreferencePair([{"role": "user", "content": q}], c, r, f"t:{i}") for i, (q, c, r) in enumerate(QA)]


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    from conftest import hf_tiny
    from gpt2ft.tokenizer import gpt2_tokenizer

    folder = tmp_path_factory.mktemp("ref")
    hf_tiny(seed=1).save_pretrained(folder)
    gpt2_tokenizer().save(folder)
    return folder


def _objective(tok, reference, loss="sigmoid", **kw):
    return PreferenceOptimization(PAIRS, PAIRS[:2], tok, ALPACA, 60, PreferenceConfig(loss, **kw), reference)


def _means(objective, model, pairs=len(PAIRS)):
    loss, metrics = objective.loss(model, objective.train.batch(range(pairs)))
    return float(loss) / pairs, {k: v / pairs for k, v in metrics.items()}


@pytest.mark.parametrize("loss_type,kw", [("sigmoid", {}), ("ipo", {"beta": 0.5}), ("hinge", {}),
                                          ("robust", {"label_smoothing": 0.2})])
def test_first_step_matches_trl_dpo_trainer(hf_dir, ref_dir, tmp_path, loss_type, kw):
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer, GPT2LMHeadModel
    from trl import DPOConfig, DPOTrainer

    from gpt2ft.checkpoint import export, save_model

    policy, tok = load(hf_dir, device="cpu", dtype="float32")
    save_model(tmp_path / "ours", policy, tok, {"objective": "sft"})  # a gpt2ft checkpoint, exported for TRL
    exported = export(str(tmp_path / "ours"), tmp_path / "hf")
    policy, tok = load(tmp_path / "ours", device="cpu", dtype="float32")
    reference = OtherModel(load(ref_dir, device="cpu", dtype="float32").model, str(ref_dir))
    objective = _objective(tok, reference, loss_type, **kw)
    with torch.no_grad():
        ours, metrics = _means(objective, policy)

    rows = [{"prompt": ALPACA.prompt(p.prompt), "chosen": p.chosen, "rejected": p.rejected}
            for p in PAIRS]
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(rows), beta=objective.config.beta,
                     loss_type=[loss_type], label_smoothing=kw.get("label_smoothing", 0.0), use_cpu=True,
                     report_to=[], max_length=None, bf16=False, save_strategy="no")
    trainer = DPOTrainer(model=GPT2LMHeadModel.from_pretrained(exported),
                         ref_model=GPT2LMHeadModel.from_pretrained(ref_dir), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(exported))
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))  # the whole set: the mean does not depend on the order
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, batch))
    trl = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert ours == pytest.approx(trl_loss, abs=1e-5)
    for mine, theirs in [("reward_chosen", "rewards/chosen"), ("reward_rejected", "rewards/rejected"),
                         ("reward_margin", "rewards/margins"), ("reward_accuracy", "rewards/accuracies"),
                         ("logp_chosen", "logps/chosen"), ("logp_rejected", "logps/rejected")]:
        assert metrics[mine] == pytest.approx(trl[theirs], abs=1e-4), mine
    assert 0 < metrics["reward_accuracy"] < 1  # a non-trivial comparison


def _perturbed(model, seed=5, scale=0.02, only_lora=False):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not only_lora or "lora_" in name:
                p.add_(torch.randn_like(p) * scale)
    return model


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_precomputed_reference_gives_the_live_copys_loss_and_gradients(hf_dir, tmp_path, loss_type):
    model, tok = load(hf_dir, device="cpu", dtype="float32")
    live = _objective(tok, FrozenCopy(model), loss_type)
    pre = _objective(tok, Precomputed(FrozenCopy(model, shared=True)), loss_type)  # the policy before any step
    logs = []
    pre.precompute_reference(model, tmp_path / "ref.pt", torch.device("cpu"), torch.float32, 3, logs.append)
    assert pre.reference.source is None and pre.train.reference.shape == (len(PAIRS), 2)
    _perturbed(model)  # training has moved the policy away from the reference
    grads = []
    for objective in (live, pre):
        model.zero_grad()
        loss, metrics = objective.loss(model, objective.train.batch([2, 0, 3]))
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if objective is live:
            expected = (float(loss.detach()), metrics)
    # equal up to float32 rounding of sums over other batch compositions (padding differs)
    assert float(loss) == pytest.approx(expected[0], rel=1e-6, abs=1e-5)
    assert {k: pytest.approx(v, abs=1e-4) for k, v in expected[1].items()} == metrics  # differences of ~75-nat sums
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    # the cache is reused for the same data and reference, recomputed when the reference changes
    again = _objective(tok, Precomputed(live.reference), loss_type)  # the starting weights, as a frozen copy
    again.precompute_reference(model, tmp_path / "ref.pt", torch.device("cpu"), torch.float32, 3, logs.append)
    assert "reusing" in logs[-1] and torch.equal(again.train.reference, pre.train.reference)
    other = _objective(tok, Precomputed(FrozenCopy(model, shared=True)), loss_type)  # the moved policy
    other.precompute_reference(model, tmp_path / "ref.pt", torch.device("cpu"), torch.float32, 3, logs.append)
    assert "computing" in logs[-1] and not torch.equal(other.train.reference, pre.train.reference)
    with pytest.raises(RuntimeError, match="precompute_reference"):  # a Precomputed reference not filled yet
        fresh = _objective(tok, Precomputed(FrozenCopy(model)), loss_type)
        fresh.loss(model, fresh.train.batch([0]))


def test_adapters_off_reference_is_the_base_model_and_never_changes(hf_dir):
    from gpt2ft.lora import LoRAConfig, apply_lora

    model, tok = load(hf_dir, device="cpu", dtype="float32")
    base = FrozenCopy(model)
    apply_lora(model, LoRAConfig(4, 8.0, 0.0, ("c_attn", "c_proj")))
    before = weights_fingerprint(model, adapters_off=True)
    off, live = _objective(tok, AdaptersOff()), _objective(tok, base)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(3):  # train the adapters a little, through the adapters-off objective
        optimizer.zero_grad()
        loss, _ = off.loss(model, off.train.batch([step, 3]))
        loss.backward()
        optimizer.step()
    assert weights_fingerprint(model, adapters_off=True) == before  # the reference's weights never changed
    with torch.no_grad():
        a, ma = _means(off, model)
        b, mb = _means(live, model)
    assert a == pytest.approx(b, abs=1e-5) and ma["reward_margin"] == pytest.approx(mb["reward_margin"], abs=1e-5)
    assert ma["reward_margin"] != 0  # the adapters did move the policy


def test_reference_free_losses_use_no_reference(hf_dir):
    model, tok = load(hf_dir, device="cpu", dtype="float32")
    for kind in ("simpo", "orpo"):
        objective = _objective(tok, None, kind)
        assert isinstance(objective.reference, NoReference)
        with torch.no_grad():
            loss, metrics = _means(objective, model)
        assert loss > 0 and metrics["logp_chosen"] < 0
        with pytest.raises(UserError, match="reference-free"):
            _objective(tok, FrozenCopy(model), kind)
    with pytest.raises(UserError, match="needs a reference"):
        _objective(tok, None, "sigmoid")
