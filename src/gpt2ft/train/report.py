"""What a run says besides the progress bar (and with --no-progress): each evaluation's scores and one
sample; one warning line, with the likely cause and the flag to try, when the samples degenerate (empty:
the model ends its reply at once; a loop of a repeated n-gram) or when DPO's chosen answers lose their
likelihood against the reference; at the end a summary (best validation loss and its step, the final
scores, where the checkpoints are) and loss.png. The loop calls RunReport at three points."""
from __future__ import annotations

import re
import time
from pathlib import Path

SCORES = ("exact_match", "bleu", "rougeL", "keyword_rate", "length_ratio")  # SFT's generation scores
QUIET = ("val_ppl", "val_reward_chosen", "val_reward_rejected", "val_logp_chosen", "val_logp_rejected")  # in the files
DRIFT_NATS = 10.0  # DPO: chosen log-prob this far below the reference's (mean per answer) is warned about


def degenerate(text: str) -> str | None:
    """'empty' (nothing but whitespace: the model ended its reply at once), 'loop' (an n-gram of 1-6 words
    repeated 3+ times in a row, 1-6 characters repeated 8+ times in a row as in 'Viiiiiiii', or a long
    text with few distinct word trigrams), or None."""
    words = text.split()
    if not words:
        return "empty"
    if re.search(r"(\S{1,6}?)\1{7,}", text):
        return "loop"
    for n in range(1, 7):
        for i in range(len(words) - 3 * n + 1):
            gram = words[i:i + n]
            if words[i + n:i + 2 * n] == gram and words[i + 2 * n:i + 3 * n] == gram:
                return "loop"
    trigrams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    if len(trigrams) >= 12 and len(set(trigrams)) < 0.4 * len(trigrams):
        return "loop"
    return None


def _clip(text: str, n: int = 90) -> str:
    text = " ".join(str(text).split()) if str(text).strip() else ""
    return repr(text if len(text) <= n else text[:n - 3] + "...")


NO_SCORES = "no validation data"


def scores_text(record: dict) -> str:
    """'val_loss 2.310 (ppl 10.07) · bleu 12.1 · rougeL 0.331 ...' of an evaluation record."""
    parts = []
    if "val_loss" in record:
        ppl = f" (ppl {record['val_ppl']:.4g})" if "val_ppl" in record else ""
        parts.append(f"val_loss {record['val_loss']:.4f}{ppl}")
    for key, value in record.items():
        if key.startswith("val_") and key != "val_loss" and key not in QUIET and isinstance(value, float):
            parts.append(f"{key.removeprefix('val_')} {value:.4g}")
    parts += [f"{k} {record[k]:.4g}" for k in SCORES if isinstance(record.get(k), (int, float))]
    return " · ".join(parts) or NO_SCORES


class RunReport:
    """The console side of a run: `evaluation()` at each evaluation, `finish()` at the end (main process)."""

    def __init__(self, run, objective, cfg, total: int, log):
        self.run, self.objective, self.cfg, self.total, self.log = run, objective, cfg, total, log
        self.started, self.warned, self.said_no_scores = time.time(), set(), False

    def evaluation(self, step: int, record: dict, samples: list[dict]) -> None:
        scores = scores_text(record)
        if scores == NO_SCORES and not samples and self.said_no_scores:
            return  # said once, not at every evaluation
        self.said_no_scores = self.said_no_scores or scores == NO_SCORES
        self.log.log(f"step {step}/{self.total}: {scores}")
        if samples:
            s = samples[0]
            shown = f"  sample: {_clip(s.get('prompt', ''), 60)} -> {_clip(s.get('output', ''))}"
            if s.get("output", "").strip() == "":
                shown += " (the model ended its reply at once)"
            self.log.log(shown + (f" (reference {_clip(s['reference'], 50)})" if s.get("reference") else ""))
        preference = self.objective.name == "dpo"
        if preference or step == self.total:  # SFT samples are poor early on; DPO's turn bad as it trains
            self._warn_degenerate(samples, preference)
        if preference:
            self._warn_drift(record)

    def _warn_degenerate(self, samples: list[dict], preference: bool) -> None:
        kinds = [degenerate(s.get("output", "")) for s in samples]
        bad = [k for k in kinds if k]
        if not samples or len(bad) * 2 < len(samples):
            return
        kind = max(set(bad), key=bad.count)
        if (kind, preference) in self.warned:
            return
        self.warned.add((kind, preference))
        what = ("are empty (the model ends its reply at once)" if kind == "empty"
                else "repeat a phrase in a loop")
        self.log.log(f"warning: {len(bad)} of {len(samples)} samples {what}: {self._remedy(kind, preference)}")

    def _remedy(self, kind: str, preference: bool) -> str:
        cfg = self.cfg
        if preference:
            return (f"preference tuning is moving the model away from fluent text; try a lower --lr (this run: "
                    f"{cfg.lr:.2g}), --sft-weight 1, or fewer --epochs")
        length = f"--epochs {cfg.epochs:g}" if cfg.epochs is not None else f"--max-steps {cfg.max_steps}"
        if kind == "empty":
            return (f"too little training for this data (this run: {length}, --lr {cfg.lr:.2g}); "
                    "try more --epochs or a higher --lr, and check that the responses are not empty")
        if self.objective.name in ("lm", "pretrain", "finetune"):  # raw text: no answers to end
            return (f"the model has not learned enough of the text yet (this run: {length}, --lr {cfg.lr:.2g}); "
                    "try more training or more text, or generate with --repetition-penalty 1.3")
        return (f"the model has not learned where an answer ends (this run: {length}, --lr "
                f"{cfg.lr:.2g}); try more --epochs or more examples, or generate with --repetition-penalty 1.3")

    def _warn_drift(self, record: dict) -> None:
        drift = record.get("val_logp_chosen_vs_ref", record.get("train_logp_chosen_vs_ref"))
        if drift is None or drift > -DRIFT_NATS or "drift" in self.warned:
            return
        self.warned.add("drift")
        self.log.log(f"warning: the chosen answers' log-probability is {-drift:.0f} nats below the reference's "
                     f"(mean per answer): DPO is unlearning the preferred answers too; try a lower --lr (this "
                     f"run: {self.cfg.lr:.2g}), --sft-weight 1, or fewer --epochs")

    def finish(self, step: int, last_saved: Path | None) -> None:
        """The summary and loss.png."""
        from ..plots import read_metrics

        rows = [r for r in read_metrics(self.run.path) if "val_loss" in r or any(k in r for k in SCORES)]
        key, mode = self.objective.best_metric, self.objective.best_mode
        ranked = [r for r in rows if isinstance(r.get(key), (int, float))]
        minutes = (time.time() - self.started) / 60
        lines = [f"done: {step} steps in {minutes:.1f} min"]
        if ranked:
            best = (max if mode == "max" else min)(ranked, key=lambda r: r[key])
            where = self.run.path / "best"
            lines.append(f"  best {key} {best[key]:.4f} at step {best['step']}"
                         + (f" -> {where}" if where.exists() else ""))
        if rows:
            lines.append(f"  at the end (step {rows[-1]['step']}): {scores_text(rows[-1])}")
        if last_saved is not None:
            lines.append(f"  checkpoints in {self.run.path / 'checkpoints'}; the latest, {Path(last_saved).name}, is "
                         f"what `{self.run.path}` loads as a MODEL")
        plot = self._plot()
        if plot:
            lines.append(f"  loss plot: {plot}")
        self.log.log("\n".join(lines))

    def _plot(self) -> Path | None:
        from ..errors import UserError
        from ..plots import plot_run

        try:
            return plot_run(self.run.path)[0]
        except (UserError, ImportError, OSError, ValueError) as e:  # a plot never fails a finished run
            self.log.log(f"  (no loss plot: {e})")
            return None
