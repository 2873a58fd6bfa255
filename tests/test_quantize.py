"""Int8 weight-only quantization: logits close to bf16, the same greedy text, half the memory."""
from __future__ import annotations

import copy

import pytest
import torch

from gpt2ft.errors import UserError
from gpt2ft.generation import generate
from gpt2ft.quantize import quantize_model, quantize_rows, weight_bytes


def test_quantize_rows_is_per_channel_absmax():
    w = torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.0, -0.5]])
    q, scale = quantize_rows(w)
    assert torch.allclose(scale, torch.tensor([1 / 127, 2 / 127]))
    assert q.dtype == torch.int8 and q[0].tolist() == [64, -127, 32] and q[1].tolist() == [127, 0, -32]
    assert (q.float() * scale[:, None] - w).abs().max() <= scale.max() / 2 + 1e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_logits_follow_the_unquantized_model(tiny_model, dtype):
    model, tok = tiny_model
    base = copy.deepcopy(model).to(dtype).eval()
    quant = quantize_model(copy.deepcopy(base))
    ids = torch.tensor([tok.encode("The king of Scotland is a tragic figure, and his wife is worse.")])
    with torch.no_grad():
        ref, got = base(ids).float(), quant(ids).float()
    rel = (got - ref).norm() / ref.norm()
    assert rel < 0.05, rel
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree >= 0.9, agree
    scales = sum(m.scale.numel() * m.scale.element_size() for m in quant.modules() if hasattr(m, "weight_int8"))
    assert weight_bytes(quant) - scales <= 0.51 * weight_bytes(copy.deepcopy(base).to(torch.bfloat16))
    text = generate(quant, tok, "Hello", max_new_tokens=8, temperature=0.0)
    assert isinstance(text, str)


def test_quantize_refuses_unknown_methods_and_unmerged_lora(tiny_model):
    from gpt2ft.lora import LoRAConfig, apply_lora

    model, _ = tiny_model
    with pytest.raises(UserError, match="int8"):
        quantize_model(copy.deepcopy(model), "int4")
    lora = copy.deepcopy(model)
    apply_lora(lora, LoRAConfig(4, 8, 0.0, ("c_attn",)))
    with pytest.raises(UserError, match="merge"):
        quantize_model(lora)


def _kernel_or_skip():
    from gpt2ft.native import int8_linear

    kernel = int8_linear()
    if kernel is None:
        pytest.skip("no C compiler here: int8 weights take torch's kernel")
    return kernel


@pytest.mark.parametrize("K", [64, 70, 5])  # whole 32-wide chunks, chunks and a tail, a tail alone
def test_c_int8_kernel_matches_float64_and_gives_each_row_what_it_gets_alone(K):
    kernel = _kernel_or_skip()
    gen = torch.Generator().manual_seed(K)
    N = 37  # odd: the last weight row goes alone
    x = torch.randn(9, K, generator=gen)
    q = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
    scale, bias = torch.rand(N, generator=gen) / 64, torch.randn(N, generator=gen)
    oracle = x.double() @ (q.double() * scale.double()[:, None]).T + bias.double()
    for M in range(1, 10):  # the 4-row tiles, their remainders, and both weight-row pairings
        y = kernel(x[:M], q, scale, bias)
        assert torch.allclose(y.double(), oracle[:M], rtol=1e-5, atol=1e-5)
        for i in range(M):
            assert torch.equal(kernel(x[i:i + 1], q, scale, bias)[0], y[i])
    assert torch.allclose(kernel(x, q, scale, None).double(), oracle - bias.double(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="float32"):
        kernel(x.to(torch.bfloat16), q, scale, bias)


def test_int8_layer_is_the_same_through_torch_compile_and_close_to_torchs_kernel(tiny_model, monkeypatch):
    _kernel_or_skip()
    import gpt2ft.quantize as quantize

    model, tok = tiny_model
    quant = quantize_model(copy.deepcopy(model).to(torch.bfloat16))
    layer = quant.transformer.h[0].mlp.c_fc
    x = torch.randn(3, 5, layer.in_features).to(torch.bfloat16)
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)  # the op traced as one node
        monkeypatch.setattr(quantize, "int8_linear", lambda: None)  # torch's _weight_int8pack_mm instead
        torchs = layer(x)
        monkeypatch.undo()
    assert torch.equal(compiled, eager)
    assert (torchs.float() - eager.float()).abs().max() <= 0.02 * eager.float().abs().max()
    many = torch.randn(quantize.KERNEL_ROWS + 1, layer.in_features).to(torch.bfloat16)  # a prompt: dequantized
    with torch.no_grad():
        prompt, rows = layer(many), torch.cat([layer(many[:8]), layer(many[8:])])  # the C kernel
    assert (prompt.float() - rows.float()).abs().max() <= 0.02 * rows.float().abs().max()


def test_an_int8_target_with_drafts_gives_its_own_greedy_tokens(tiny_model):
    """The verify forward multiplies several rows of a row's drafted tokens: the C kernel gives each what it
    gets alone, so speculative greedy output is the int8 model's own."""
    from gpt2ft.generation import complete_batch
    from gpt2ft.sampling import SamplingConfig
    from gpt2ft.speculative import speculative_complete

    model, tok = tiny_model
    quant = quantize_model(copy.deepcopy(model).to(torch.bfloat16))
    prompt = tok.encode("to be or not to be, that is the question: to be or not to be")
    cfg = SamplingConfig(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    alone = complete_batch(quant, tok, [prompt], cfg)[0].token_ids
    for draft in ("ngram", quant):
        spec, stats = speculative_complete(quant, tok, prompt, cfg, draft)
        assert spec.token_ids == alone
    assert stats.acceptance == 1.0  # the model drafting for itself: every token taken


def test_without_a_working_compiler_int8_says_so_once_and_takes_torchs_kernel(tmp_path, monkeypatch, capsys):
    import gpt2ft.native as native

    monkeypatch.setattr(native, "_LOADED", {})
    monkeypatch.setenv("GPT2FT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    assert native.int8_linear() is None and native.int8_linear() is None
    err = capsys.readouterr().err
    assert err.count("note: int8 weights use torch's slower kernel here") == 1 and "false failed" in err
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left to load later
