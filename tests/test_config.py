"""Model presets: GPT-2's released sizes and the GPT-3 paper's Table 2.1 sizes."""
import pytest
import torch

from gpt2ft.config import PRESETS, preset, preset_help

# Brown et al. 2020, Table 2.1: parameters, layers, width, context
GPT3_TABLE = {"gpt3-small": (125e6, 12, 768), "gpt3-medium": (350e6, 24, 1024), "gpt3-large": (760e6, 24, 1536),
              "gpt3-xl": (1.3e9, 24, 2048), "gpt3-2.7b": (2.7e9, 32, 2560)}


@pytest.mark.parametrize("name", GPT3_TABLE)
def test_gpt3_presets_match_the_paper(name):
    params, layers, width = GPT3_TABLE[name]
    cfg = PRESETS[name]
    assert (cfg.n_layer, cfg.n_embd, cfg.block_size) == (layers, width, 2048)
    assert abs(cfg.num_params() - params) / params < 0.03
    assert name in preset_help()


def test_num_params_counts_the_model():
    from gpt2ft.model import GPT

    cfg = preset("gpt3-small", n_layer=1)
    with torch.device("meta"):
        model = GPT(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


def test_pretrain_help_lists_every_preset_with_its_size():
    from gpt2ft.cli import build_parser

    verbs = next(a for a in build_parser()._actions if a.dest == "verb")
    text = " ".join(verbs.choices["pretrain"].format_help().split())
    assert "gpt3-2.7b (2.7B)" in text and "gpt3-small (125M)" in text and "micro (" in text
