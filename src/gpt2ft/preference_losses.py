"""The preference losses as declarations: name (--loss), reference or not, help, options, default beta,
batch layout. Torch-free, so `gpt2ft dpo --help` builds from it without loading torch; each loss's pure
function lives in gpt2ft.losses under the same name (`@implements("sigmoid")`)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PreferenceLoss:
    """One preference loss: its name (--loss), whether it compares against a reference model, its default
    beta, the options its pure function takes besides the log-probs, and the batch layout it needs
    (objectives_pref.LAYOUTS: "pairs" is B chosen rows then the same B prompts with their rejected answers)."""
    name: str
    needs_reference: bool
    help: str
    params: tuple[str, ...] = ("beta",)
    default_beta: float = 0.1
    layout: str = "pairs"


OPTION_DEFAULTS = {"label_smoothing": 0.0, "gamma": 0.5, "lam": 0.1}  # beta's default is per loss
PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {loss.name: loss for loss in (
    PreferenceLoss("sigmoid", True, "DPO; with --label-smoothing, cDPO", ("beta", "label_smoothing")),
    PreferenceLoss("robust", True, "robust DPO, unbiased under --label-smoothing noise", ("beta", "label_smoothing")),
    PreferenceLoss("ipo", True, "IPO, on per-token log-ratios"),
    PreferenceLoss("hinge", True, "SLiC-HF hinge"),
    # SimPO's rewards are per-token averages: a larger scale (Meng et al. use 2-2.5)
    PreferenceLoss("simpo", False, "SimPO: reference-free, length-normalised, margin --gamma", ("beta", "gamma"),
                   default_beta=2.0),
    PreferenceLoss("orpo", False, "ORPO: reference-free, NLL + --lambda x odds ratio", ("lam",)),
)}


def losses_using(option: str) -> list[str]:
    """The registered losses that take `option` (beta, label_smoothing, gamma, lam)."""
    return [loss.name for loss in PREFERENCE_LOSSES.values() if option in loss.params]
