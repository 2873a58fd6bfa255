"""A first run explains itself: the defaults derived from the data and the model (train.defaults), and
the console report (train.report): scores, a sample, degenerate-output and DPO-drift warnings, the summary."""
import math

import pytest

from gpt2ft.train import TrainConfig
from gpt2ft.train.defaults import DEFAULTS, settle, total_steps
from gpt2ft.train.report import RunReport, degenerate, scores_text


# ----- derived defaults -------------------------------------------------------------------------
def test_unset_values_follow_the_data_size_and_the_model_width():
    cfg, lines = settle(TrainConfig(out="r"), "sft", n_train=27, width=256, lora=False)
    # 4000 examples / 27 = 148 passes, capped at 50; 50 x 27 / 8 = 168.75 -> 169 steps
    assert cfg.epochs == 50 and total_steps(cfg, 27) == 169
    assert cfg.lr == pytest.approx(1e-3)  # the quickstart model's width: its rate as stated
    assert settle(TrainConfig(out="r"), "sft", 27, 768, False)[0].lr == pytest.approx(1e-4)  # GPT-2's
    # between and beyond the two widths, log-linear: 1e-4 x (768 / w) ** (log 10 / log 3)
    assert settle(TrainConfig(out="r"), "sft", 27, 384, False)[0].lr == pytest.approx(1e-4 * 2 ** (math.log(10) / math.log(3)))
    assert settle(TrainConfig(out="r"), "sft", 27, 1024, False)[0].lr == pytest.approx(1e-4 * 0.75 ** (math.log(10) / math.log(3)))
    assert cfg.warmup_steps == 8 and cfg.eval_every == 17  # round(0.05 x 169), ceil(169 / 10)
    assert len(lines) == 4 and lines[0].startswith("--epochs 50: 27 training examples")
    big, _ = settle(TrainConfig(out="r"), "sft", n_train=50_000, width=768, lora=True)
    assert big.epochs == 3 and big.lr == pytest.approx(1e-3)  # at least 3 passes; LoRA x 10
    assert big.eval_every == 500  # ceil(18750 / 10) capped
    tiny, _ = settle(TrainConfig(out="r"), "pretrain", n_train=1000, width=16, lora=False)
    assert tiny.lr == 3e-3 and tiny.epochs == 1  # 6e-4 x 48 capped; pretraining makes one pass
    dpo, _ = settle(TrainConfig(out="r", batch_size=4), "dpo", n_train=350, width=256, lora=False)
    assert dpo.epochs == pytest.approx(2.1) and dpo.lr == pytest.approx(1e-4)  # 750 / 350 = 2.14


def test_given_values_are_kept_and_not_reported():
    given = TrainConfig(out="r", epochs=2.0, lr=1e-3, warmup_steps=0, eval_every=0)
    cfg, lines = settle(given, "sft", n_train=27, width=256, lora=False)
    assert (cfg.epochs, cfg.lr, cfg.warmup_steps, cfg.eval_every) == (2.0, 1e-3, 0, 0) and lines == []
    steps, lines = settle(TrainConfig(out="r", max_steps=40), "sft", n_train=27, width=256, lora=False)
    assert steps.warmup_steps == 2 and not any(line.startswith("--epochs") for line in lines)  # 5% of 40


def test_the_cli_defaults_are_the_config_s_and_the_help_quotes_the_table():
    from gpt2ft.cli import build_parser

    verbs = next(a for a in build_parser()._actions if a.dest == "verb").choices
    for verb, row in DEFAULTS.items():
        actions = {a.dest: a for a in verbs[verb]._actions}
        assert all(actions[k].default is None for k in ("epochs", "lr", "warmup_steps", "eval_every"))
        assert f"{row.lr:g} for GPT-2's width 768, {row.lr_quickstart:g} for the quickstart" in actions["lr"].help


# ----- degenerate outputs -----------------------------------------------------------------------
@pytest.mark.parametrize("text,kind", [
    ("", "empty"), ("  \n", "empty"), ("The the the the", "loop"), ("TheInsteadThe kept in the the the in the dry.", "loop"),
    ("Kears in Mears in Kears in Mears in Kears in Mears in", "loop"),
    ("a b c d " * 6, "loop"), ("King Henry Viiiiiiiiiiiiiiiiiiii", "loop"),
    ("Macbeth is a tragedy.", None), ("Othello has 5 acts, and each of them is in verse and prose.", None),
])
def test_degenerate_outputs_are_named(text, kind):
    assert degenerate(text) == kind


class Lines:
    def __init__(self):
        self.lines = []

    def log(self, msg):
        self.lines.append(msg)


class FakeObjective:
    def __init__(self, name):
        self.name, self.best_metric, self.best_mode = name, "val_loss", "min"


def _report(verb, **cfg):
    log = Lines()
    return RunReport(None, FakeObjective(verb), TrainConfig(out="r", epochs=3.0, lr=1e-4, **cfg), 100, log), log


def test_each_evaluation_shows_scores_and_a_sample_and_sft_warns_only_at_the_end():
    report, log = _report("sft")
    record = {"val_loss": 2.0, "val_ppl": math.exp(2.0), "bleu": 12.5, "rougeL": 0.25}
    empty = [{"prompt": "Who?", "output": "", "reference": "Him."}] * 3
    report.evaluation(50, record, empty)
    assert log.lines[0] == "step 50/100: val_loss 2.0000 (ppl 7.389) · bleu 12.5 · rougeL 0.25"
    assert log.lines[1] == "  sample: 'Who?' -> '' (the model ended its reply at once) (reference 'Him.')"
    assert len(log.lines) == 2  # mid-run: no warning yet
    report.evaluation(100, record, empty)
    warning = log.lines[-1]
    assert warning.startswith("warning: 3 of 3 samples are empty") and "--epochs 3" in warning and "--lr" in warning
    report.evaluation(100, record, empty)
    assert log.lines.count(warning) == 1  # said once


def test_dpo_warns_during_the_run_about_drift_and_loops_with_the_remedy():
    report, log = _report("dpo")
    fluent = [{"prompt": "Q", "output": "Macbeth is a tragedy."}]
    report.evaluation(10, {"val_loss": 0.6, "val_logp_chosen_vs_ref": -2.0}, fluent)
    assert not any(line.startswith("warning") for line in log.lines)
    report.evaluation(20, {"val_loss": 0.1, "val_logp_chosen_vs_ref": -50.0},
                      [{"prompt": "Q", "output": "TheInsteadThe kept in the the the in the dry."}])
    warnings = [line for line in log.lines if line.startswith("warning")]
    assert len(warnings) == 2
    assert "50 nats below the reference" in warnings[1] and "--sft-weight" in warnings[1] and "lower --lr" in warnings[1]
    assert "repeat a phrase" in warnings[0] and "fewer --epochs" in warnings[0]


def test_pair_metrics_measure_the_chosen_drift_from_the_reference():
    import torch

    from gpt2ft.losses import PairLogps, preference_loss
    from gpt2ft.objectives_pref import PAIRS

    p = PairLogps(torch.tensor([-30.0, -5.0]), torch.tensor([-8.0, -9.0]), torch.tensor([3, 3]), torch.tensor([3, 3]),
                  torch.tensor([-10.0, -6.0]), torch.tensor([-7.0, -7.0]))
    out = preference_loss("sigmoid", *p, beta=0.1)
    assert PAIRS.metrics(p, out)["logp_chosen_vs_ref"].tolist() == [-20.0, 1.0]
    free = PairLogps(*p[:4])
    assert "logp_chosen_vs_ref" not in PAIRS.metrics(free, preference_loss("simpo", *free))


def test_scores_text_without_validation_data():
    assert scores_text({}) == "no validation data"
