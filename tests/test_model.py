import pytest
import torch
import torch.nn.functional as F

from gpt2ft.checkpoint import load
from gpt2ft.config import GPTConfig, preset
from gpt2ft.model import GPT


def test_logits_match_transformers_from_safetensors_folder(hf_model, tiny_model):
    model, _ = tiny_model
    x = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x), hf_model(x).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_logits_match_transformers_from_pytorch_model_bin(hf_model, tmp_path):
    # The legacy format: a pickled state dict (transformers 5 no longer writes it, so write it as 4.x did).
    hf_model.config.save_pretrained(tmp_path)
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    model, _ = load(tmp_path)
    x = torch.randint(0, 50257, (2, 17))
    with torch.no_grad():
        assert (model(x) - hf_model(x).logits).abs().max().item() <= 1e-5


def test_logits_at_mask_and_last_equal_full_logits(tiny_model):
    model, _ = tiny_model
    x = torch.randint(0, 50257, (2, 10))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 3], mask[1, 7:] = True, True
    with torch.no_grad():
        full = model(x)
        assert torch.allclose(model(x, logits_at=mask), full[mask], atol=1e-6)
        assert torch.allclose(model(x, logits_at="last"), full[:, -1], atol=1e-6)


def test_left_padding_with_attention_mask_does_not_change_real_positions(tiny_model):
    model, _ = tiny_model
    x = torch.randint(0, 50257, (1, 8))
    padded = torch.cat([torch.full((1, 3), 50256), x], dim=1)
    mask = torch.tensor([[0, 0, 0] + [1] * 8])
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = model(x)
        with_pad = model(padded, attention_mask=mask, position_ids=pos)
    assert (with_pad[:, 3:] - alone).abs().max().item() < 1e-5


def test_presets_and_custom_sizes():
    assert preset("gpt2").num_params() == 124_439_808
    assert preset("openai-community/gpt2-medium") == preset("gpt2-medium")
    assert preset("gpt2-xl").n_embd == 1600
    micro = preset("micro")
    assert (micro.n_layer, micro.n_embd) == (2, 128)
    assert (preset("tiny").n_layer, preset("tiny").n_embd) == (4, 256)
    cfg = preset("micro", n_layer=3, block_size=64, vocab_size=300)
    model = GPT(cfg)
    assert model.num_params() == cfg.num_params()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=100)
    a, b = GPT(cfg), GPT(cfg)
    b.load_state_dict(a.state_dict())
    b.gradient_checkpointing = True
    x = torch.randint(0, 100, (2, 16))
    for m in (a, b):
        m.train()
        m(x).logsumexp(-1).mean().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n


def test_gpt2_init_scheme():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=64, vocab_size=1000))
    std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * 8) ** 0.5) < 0.001
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.001
    assert model.transformer.h[0].attn.c_attn.bias.abs().max() == 0


def test_explicit_causal_attention_equals_sdpa():
    """The CPU bf16 path (explicit products, mask added in the first) against SDPA's causal kernel: equal in
    float64; in bf16 within bf16 rounding of the float64 result; and a bf16 training forward takes it."""
    import torch.nn.functional as F

    import gpt2ft.model as model_module

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, dtype=torch.float64) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(model_module._explicit_causal_attention(q, k, v, 0.0), ref, atol=1e-12)
    low = model_module._explicit_causal_attention(*(t.bfloat16() for t in (q, k, v)), 0.0)
    assert low.dtype == torch.bfloat16 and (low.double() - ref).abs().max() < 0.05
    assert model_module._explicit_is_faster(q.bfloat16()) and not model_module._explicit_is_faster(q.float())


def test_bf16_inference_on_a_cpu_multiplies_a_packed_weight_bitwise_as_f_linear():
    """model.Linear's packed path (one oneDNN packing of the weight, kept while it is unchanged) gives
    F.linear's exact logits at decode's row counts, and past them each row what it gets alone; grad-enabled calls take F.linear; a weight
    changed in place (an optimizer step, load_state_dict) is packed again."""
    import gpt2ft.model as model_module

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=12, n_embd=768, block_size=64)).to(torch.bfloat16).eval()
    ids = torch.randint(0, 50257, (8, 20))

    def logits(packing: bool, x):
        saved = model_module._PACKING[0]
        model_module._PACKING[0] = packing
        try:
            with torch.inference_mode():
                return model(x)
        finally:
            model_module._PACKING[0] = saved

    if not model_module._PACKING[0]:
        pytest.skip("no oneDNN, or no bf16 matmul in hardware here (Linear takes F.linear)")
    for x in (ids[:, :1], ids[:1, :1], ids[:3, :5], ids[:4, :8]):  # decode's row counts (up to 32)
        assert torch.equal(logits(True, x), logits(False, x))
    # more rows (a verify of a batch, a prefill): where F.linear's kernel changes with the row count (AMX past
    # 32 rows), the packed product keeps each row's result as computed alone, and is as close to F.linear
    many = logits(True, ids[:8, :5])
    assert all(torch.equal(many[b:b + 1], logits(True, ids[b:b + 1, :5])) for b in range(8))
    assert torch.allclose(logits(True, ids).float(), logits(False, ids).float(), atol=0.05, rtol=0.02)
    fc = model.transformer.h[0].mlp.c_fc
    assert fc in model_module._PACKED
    with torch.no_grad():
        fc.weight.mul_(2)  # in place: the next call packs the new weight
    assert torch.equal(logits(True, ids[:4, :8]), logits(False, ids[:4, :8]))
    del model_module._PACKED[fc]
    model(ids).float().sum().backward()  # training: F.linear, nothing packed
    assert fc not in model_module._PACKED and fc.weight.grad is not None
    import copy

    assert torch.equal(copy.deepcopy(model).eval()(ids[:1]), model(ids[:1]))  # the packed copies stay behind


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_kernel_matches_float64_and_each_query_is_computed_alone(dtype):
    """native/decode_attention.c: each query over its own row's slots up to its position, against float64
    SDPA; bitwise the same alone, among other rows and queries, over a longer cache, with one thread; given
    the step's new keys and values, it writes them into the cache first, as torch's indexed write does."""
    from gpt2ft.native import decode_attention

    kernel = decode_attention()
    if kernel is None:
        pytest.skip("no C compiler here")
    gen = torch.Generator().manual_seed(0)
    B, nh, T, hs, S = 3, 4, 3, 24, 40  # hs: a 16-wide chunk and a tail
    q = torch.randn(B, T, nh, hs, generator=gen).to(dtype).transpose(1, 2)  # as the model's: a strided view
    k, v = (torch.randn(B, nh, S + 8, hs, generator=gen).to(dtype)[:, :, :S] for _ in range(2))  # strided views
    pos = torch.tensor([[4, 5, 6], [0, 1, 2], [37, 38, 39]])
    out = kernel(q, k, v, pos).transpose(1, 2)  # (B, T, nh, hs) -> (B, nh, T, hs)
    for b in range(B):
        for t in range(T):
            n = int(pos[b, t]) + 1
            ref = F.scaled_dot_product_attention(q[b, :, t:t + 1].double(), k[b, :, :n].double(), v[b, :, :n].double())
            assert torch.allclose(out[b, :, t:t + 1].double(), ref, atol=1e-6)
            alone = kernel(q[b:b + 1, :, t:t + 1].contiguous(), k[b:b + 1, :, :n], v[b:b + 1, :, :n], pos[b:b + 1, t:t + 1])
            assert torch.equal(alone.transpose(1, 2), out[b:b + 1, :, t:t + 1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(kernel(q, k, v, pos).transpose(1, 2), out)
    finally:
        torch.set_num_threads(threads)
    outside = kernel(q, k, v, torch.tensor([[4, 5, 40], [0, -1, 2], [37, 38, 39]]))  # never read past the slots
    assert outside[0, 2].isnan().all() and outside[1, 1].isnan().all() and not outside[2].isnan().any()
    with pytest.raises(ValueError, match="float32"):
        kernel(q.to(torch.float16), k, v, pos)
    # given the step's new keys and values, it writes them at their slots first: torch's indexed write
    # then the kernel, bitwise; a verify's later query sees the earlier ones' keys; a slot outside, no write
    qkv = torch.randn(B, T, 3, nh, hs, generator=gen).to(dtype)  # as split from c_attn: strided views
    k_new, v_new = qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
    for where in (pos, torch.tensor([[4, 5, 40], [0, 1, 2], [37, 38, 39]])):
        keys, values = k.clone(), v.clone()
        fused = kernel(q, keys, values, where, k_new, v_new)
        ref_k, ref_v = k.clone(), v.clone()
        inside = where < S
        b, t = inside.nonzero(as_tuple=True)
        ref_k[b, :, where[b, t]], ref_v[b, :, where[b, t]] = k_new.transpose(1, 2)[b, t], v_new.transpose(1, 2)[b, t]
        assert torch.equal(keys, ref_k) and torch.equal(values, ref_v)
        expected = kernel(q, ref_k, ref_v, where)
        assert torch.equal(fused.nan_to_num(), expected.nan_to_num()) and fused[~inside].isnan().all()
    with pytest.raises(ValueError, match="k_new"):
        kernel(q, k.clone(), v.clone(), pos, k_new.float() if dtype == torch.bfloat16 else k_new.bfloat16(), v_new)


def test_a_float16_model_decodes_with_a_cache_on_a_cpu():
    """The decode attention kernel reads float32 and bf16 only: a float16 model's cached steps take torch's
    attention (they used to reach the kernel and fail) and give the logits of the whole sequence."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)).to(torch.float16).eval()
    ids = torch.randint(0, 64, (2, 6))
    caches = model.new_cache(2, 16)
    with torch.inference_mode():
        whole = model(ids).float()
        model(ids[:, :5], input_pos=torch.arange(5), kv_caches=caches)
        last = model(ids[:, 5:], input_pos=torch.tensor([5]), kv_caches=caches).float()
    assert torch.allclose(last[:, 0], whole[:, 5], atol=1e-2)
