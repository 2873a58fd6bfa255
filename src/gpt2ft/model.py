"""GPT-2 in one file, with Hugging Face's parameter names and a preallocated KV cache.

Ordered bottom-up: KV cache -> attention -> MLP -> block -> model. Module names are exactly those
of transformers' GPT2LMHeadModel (transformer.wte, transformer.h.N.attn.c_attn, ...), so loading
HF weights is one loop that transposes the Conv1D weights (see checkpoint.py).
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import GPTConfig
from .losses import linear_cross_entropy_per_sequence, linear_cross_entropy_sum, supervised_mask
from .native import DECODE_ATTENTION_DTYPES, decode_attention


class Linear(nn.Linear):
    """nn.Linear whose bf16 inference on a CPU multiplies a copy of the weight packed once for oneDNN's kernel:
    F.linear packs it anew at every call, which at decode's few rows costs about as much as the product
    (bitwise the same result at decode's row counts; past 32 rows, where AMX's kernels round F.linear's
    products another way, the packed one keeps a row's result whatever the row count, which seeded rows
    and speculative verifies rely on: tests/test_model.py checks both). Training (grad enabled), other dtypes and
    devices take F.linear; a compiled graph calls the same packed product as an op (gpt2ft::linear). The
    packed copy is kept while the weight is unchanged (same storage, same version): one more copy of the
    weights in memory."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype != torch.bfloat16 or w.device.type != "cpu" or torch.is_grad_enabled() or not _PACKING[0]:
            return F.linear(x, w, self.bias)
        if torch.compiler.is_compiling():  # the same packed product, as an op the compiled graph calls
            return torch.ops.gpt2ft.linear(x, w, self.bias)
        if w.is_inference():  # (no version counter to key the copy on)
            return F.linear(x, w, self.bias)
        return self._packed_product(x)

    def _packed_product(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version)
        cached = _PACKED.get(self)
        if cached is None or cached[0] != key:
            try:
                with torch.inference_mode(False):  # a plain tensor, usable outside inference mode too
                    cached = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1))
                y = torch.ops.mkldnn._linear_pointwise(x.contiguous(), cached[1], self.bias, "none", [], "")
            except (RuntimeError, AttributeError):  # a torch without oneDNN's bf16 linear: F.linear from now on
                _PACKING[0] = False
                return F.linear(x, w, self.bias)
            _PACKED[self] = cached
            _OWNERS[w.data_ptr()] = self
            return y
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), cached[1], self.bias, "none", [], "")


@torch.library.custom_op("gpt2ft::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Linear's packed product for a compiled graph (inductor would repack the weight at every call): the
    layer that owns this weight multiplies it, or F.linear, bitwise the same, where none is known."""
    owner = _OWNERS.get(weight.data_ptr())
    if owner is None or owner.weight.data_ptr() != weight.data_ptr() or weight.is_inference() or not _PACKING[0]:
        return F.linear(x, weight, bias)
    return owner._packed_product(x)


@_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("gpt2ft::block_output", mutates_args=())
def _block_output(x: torch.Tensor) -> torch.Tensor:
    """A copy that a compiled graph cannot see through: what one block hands the next is stored in its
    dtype (rounded as eager rounds it), while the whole step stays one graph (one CUDA graph on a GPU)."""
    return x.clone()


@_block_output.register_fake
def _(x):
    return torch.empty_like(x)


def _packing_pays() -> bool:
    """Where oneDNN multiplies bf16 in hardware (AMX or AVX512-BF16, the CPUs `--dtype auto` picks bf16 on);
    elsewhere a bf16 model takes F.linear, as it always did."""
    from .runtime import cpu_has_fast_bf16

    return torch.backends.mkldnn.is_available() and cpu_has_fast_bf16()


_PACKING = [_packing_pays()]  # Linear's packed path; off once it fails
# each Linear's (weight key, packed weight), beside the module so that deepcopy and pickling never meet oneDNN's
# opaque tensor
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_OWNERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # a packed weight's data_ptr -> its Linear


_ROW_NUMBERS: dict = {}


def _row_numbers(n: int, device) -> torch.Tensor:
    """arange(n)[:, None], made once per size and device (each layer of each decode step indexes with it)."""
    if torch.compiler.is_compiling():  # n may be symbolic there: a lookup by it would specialise the graph
        return torch.arange(n, device=device)[:, None]
    key = (n, str(device))
    if key not in _ROW_NUMBERS:
        with torch.inference_mode(False):  # a plain tensor, usable outside inference mode too
            _ROW_NUMBERS[key] = torch.arange(n, device=device)[:, None]
    return _ROW_NUMBERS[key]


class KVCache(nn.Module):
    """Preallocated keys and values of one layer: (B, nh, max_len, hs) each."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int | None,
               rows: slice | torch.Tensor | None = None):
        """Write k, v (B, nh, T, hs) at cache slots input_pos; return the keys/values to attend over.

        input_pos is (T,) (every row writes the same slots) or (B, T) (each row its own slots).
        rows: which of the cache's rows these B rows are: all (None), a slice (views, no copy), or
        a (B,) index tensor (e.g. several new rows prefilled together; the keys returned are then a
        copy). length=None returns the whole buffer (static shapes for torch.compile; the mask
        hides the unwritten slots), otherwise the first `length` slots.
        """
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if isinstance(rows, torch.Tensor):
            pos = input_pos if input_pos.dim() == 2 else input_pos.expand(len(rows), -1)
            self.k[rows[:, None], :, pos] = k.transpose(1, 2)  # (B, T, nh, hs) into row b, slot pos[b, t]
            self.v[rows[:, None], :, pos] = v.transpose(1, 2)
            end = self.k.shape[2] if length is None else length
            return self.k[rows, :, :end], self.v[rows, :, :end]
        keys, values = (self.k, self.v) if rows is None else (self.k[rows], self.v[rows])  # views
        if input_pos.dim() == 1:
            keys.index_copy_(2, input_pos, k)
            values.index_copy_(2, input_pos, v)
        else:  # row b's token t into slot input_pos[b, t] (index_put: scatter_ is slow for bf16 on CPUs)
            b = _row_numbers(k.shape[0], k.device)  # (B, 1)
            keys[b, :, input_pos] = k.transpose(1, 2)  # (B, T, nh, hs)
            values[b, :, input_pos] = v.transpose(1, 2)
        if length is None:
            return keys, values
        return keys[:, :, :length], values[:, :, :length]


def _explicit_is_faster(q: torch.Tensor) -> bool:
    """Causal attention as explicit batched products beats SDPA's flash kernel on a CPU in bf16 while the
    (B, nh, T, T) scores kept for backward stay small (<= 2^25 of them, 64 MiB a layer): forward and
    backward of one GPT-2 124M layer on one AVX512-BF16 core took 18 vs 41 ms at 4 x 256 tokens,
    34 vs 69 at 2 x 512, 55 vs 94 at 1 x 1024. In float32, and on GPUs, the fused kernel is as fast or faster."""
    B, nh, T, _ = q.shape
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and B * nh * T * T <= 2**25


def _explicit_causal_attention(q, k, v, dropout_p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) + causal mask) v as batched matrix products in q's dtype (the mask added
    inside the first product). (B, nh, T, hs) in and out."""
    B, nh, T, hs = q.shape
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    bias = torch.zeros(T, T, dtype=q.dtype, device=q.device).masked_fill_(causal, float("-inf"))
    q, k, v = (t.reshape(B * nh, T, hs) for t in (q, k, v))  # (B * nh, T, hs)
    att = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=1.0 / math.sqrt(hs)).softmax(dim=-1)  # (B * nh, T, T)
    if dropout_p:
        att = F.dropout(att, dropout_p)
    return (att @ v).view(B, nh, T, hs)


def _attend_rows_apart(q, k, v, lengths: list[list[int]]) -> torch.Tensor:
    """Each query (row b, position j) over the first lengths[b][j] cache slots of row b, in a call of its
    own: the call that token makes when it is decoded alone, one a step. Over a shared key count with a
    mask, SDPA sums in another order (it changes with the key count): in bf16 a seeded row then sampled
    other tokens than alone, and a speculative verify kept other tokens than the target alone."""
    return torch.cat([torch.cat([F.scaled_dot_product_attention(q[b:b + 1, :, j:j + 1], k[b:b + 1, :, :n],
                                                                v[b:b + 1, :, :n]) for j, n in enumerate(row)], dim=2)
                      for b, row in enumerate(lengths)])


DECODE_QUERIES = 16  # queries a row up to which a CPU attends over the cache with gpt2ft's kernel


def _cached_attention(q, k, v, cache, input_pos, query_pos, length, rows):
    """native/decode_attention.c: the step's k, v written into the cache, then each query (b, h, t) over
    cache slots 0 .. query_pos[b, t] of row b, in float32 from q's and the cache's dtypes, as (B, T, nh, hs).
    The kernel writes the cache itself where the rows are the cache's own (not gathered) and need no cast;
    under torch.compile the attention is an op the graph keeps whole, so compiled and eager steps agree."""
    compiling = torch.compiler.is_compiling()
    if compiling or isinstance(rows, torch.Tensor) or k.dtype != cache.k.dtype:  # torch writes the cache
        keys, values = cache.update(input_pos, k, v, length, rows)
        attend = torch.ops.gpt2ft.decode_attention if compiling else decode_attention()
        return attend(q, keys, values, query_pos)
    keys, values = (cache.k, cache.v) if rows is None else (cache.k[rows], cache.v[rows])  # views
    end = keys.shape[2] if length is None else length
    if end > keys.shape[2]:  # (torch's indexed write would refuse it too; the kernel would skip it)
        raise IndexError(f"cache position {end - 1} is past the cache's {keys.shape[2]} slots")
    return decode_attention()(q, keys[:, :, :end], values[:, :, :end], query_pos, k, v)


@torch.library.custom_op("gpt2ft::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return decode_attention()(q, k, v, pos)


@_decode_attention_op.register_fake
def _(q, k, v, pos):
    B, nh, T, hs = q.shape
    return q.new_empty(B, T, nh, hs, dtype=torch.float32)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask=None, kv_cache=None, input_pos=None, cache_len=None, cache_rows=None,
                query_pos=None):
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        lengths = cache_len if isinstance(cache_len, list) else None  # each query's own key count (rows_apart)
        if kv_cache is not None:
            longest = max(map(max, lengths)) if lengths else cache_len
            if query_pos is not None:  # a decode step on a CPU (see GPT._decode_positions)
                y = _cached_attention(q, k, v, kv_cache, input_pos, query_pos, longest, cache_rows)  # (B, T, nh, hs)
                return self.resid_dropout(self.c_proj(y.to(x.dtype).view(B, T, C)))
            k, v = kv_cache.update(input_pos, k, v, longest, cache_rows)  # (B, nh, S, hs)
            if q.device.type == "cpu":  # many queries: torch's kernel, in float32 (a CPU's bf16 one is slower)
                q, k, v = q.float(), k.float(), v.float()
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is not None and attn_mask.dtype not in (torch.bool, q.dtype):  # an additive mask: q's dtype
            attn_mask = attn_mask.to(q.dtype)
        if lengths is not None:
            y = _attend_rows_apart(q, k, v, lengths)
        elif attn_mask is None and kv_cache is None and _explicit_is_faster(q):
            y = _explicit_causal_attention(q, k, v, dropout_p)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=attn_mask is None and kv_cache is None,
            )  # (B, nh, T, hs)
        y = y.to(x.dtype).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's gelu_new


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, kv_cache=None, input_pos=None, cache_len=None, cache_rows=None,
                query_pos=None):
        x = x + self.attn(self.ln_1(x), attn_mask, kv_cache, input_pos, cache_len, cache_rows, query_pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.gradient_checkpointing = False
        self.lora_config = None  # a lora.LoRAConfig once apply_lora() wrapped layers
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ----- KV cache -----------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int, dtype=None, device=None) -> list[KVCache]:
        """A KV cache (one KVCache per layer) for `batch` rows of up to `max_len` tokens, to pass as
        forward(kv_caches=...): a completion engine owns its own cache, apart from the model. Its dtype:
        the model's, but float32 on a CPU without gpt2ft's decode attention kernel (torch's is faster there)."""
        if max_len > self.config.block_size:
            raise ValueError(f"cache length {max_len} exceeds the context {self.config.block_size}")
        p = self.lm_head.weight
        device = device or p.device
        cpu = torch.device(device).type == "cpu"
        dtype = dtype or (torch.float32 if cpu and decode_attention() is None else p.dtype)
        hs = self.config.n_embd // self.config.n_head
        return [KVCache(batch, self.config.n_head, max_len, hs, dtype, device) for _ in range(self.config.n_layer)]

    # ----- forward ------------------------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        static_cache: bool = False,
        logits_at: torch.Tensor | str | None = None,
        hidden_only: bool = False,
        kv_caches: list[KVCache] | None = None,
        cache_rows: slice | torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        reduction: str = "sum",
        rows_apart: bool = False,
    ) -> torch.Tensor:
        """Token ids (B, T) -> logits.

        position_ids (B, T): positions for wpe (default 0..T-1, or input_pos when caching).
        attention_mask (B, S): 1 for real tokens, 0 for padding, over every key the rows attend to
            (S = T without cache; S = cache slots used so far, or the whole cache when static);
            or, without cache, a bool (B, T, T) mask of which keys each query may see.
        input_pos: cache slots of these tokens, (T,) shared by every row or (B, T) per row (each row
            then attends to its own slots up to its own position); it needs kv_caches.
        kv_caches: the cache (from new_cache) that these tokens' keys and values go into.
        cache_rows: which rows of the cache these B rows are: a slice, e.g. slice(3, 4), or a (B,)
            tensor of row indices (default: all of them, in order).
        static_cache: attend over the whole preallocated cache (fixed shapes for torch.compile).
        logits_at: None -> (B, T, V); "last" -> (B, V); a bool mask (B, T) -> (N, V) at the True
            positions only, which skips the vocabulary projection everywhere else.
        hidden_only: return the final hidden states at those positions instead of logits (for a
            loss that applies lm_head itself, chunk by chunk).
        targets (B, T): each position's next-token label (-100: not trained). Returns the cross-entropy
            summed over the trained positions instead of logits: a scalar (reduction="sum") or one sum per
            row (reduction="per_sequence", (B,)), chunked, never forming the logits whole. It runs here,
            inside forward, so a wrapper that shards the weights (FSDP) holds lm_head while it is used.
        rows_apart: with per-row positions, each new token attends over its own row's cache slots up to
            its position, in a call of its own, so that its logits are bitwise what it gets decoded alone,
            one token a step (slower).
        """
        B, T = idx.shape
        use_cache = input_pos is not None
        if use_cache and kv_caches is None:
            raise RuntimeError("pass kv_caches= (from new_cache) to use input_pos")
        if position_ids is None:
            if use_cache:
                position_ids = input_pos if input_pos.dim() == 2 else input_pos.unsqueeze(0)
            else:
                position_ids = torch.arange(T, device=idx.device).unsqueeze(0)
        if not use_cache and T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the context {self.config.block_size}")

        max_len = kv_caches[0].k.shape[2] if use_cache else None
        query_pos = self._decode_positions(B, T, attention_mask, input_pos, idx.device, self.lm_head.weight.dtype)
        if query_pos is not None:  # the kernel's positions stand for the mask (and attend rows apart)
            attn_mask, cache_len = None, None if static_cache else int(query_pos.max()) + 1
        else:
            attn_mask, cache_len = self._attention_mask(T, attention_mask, input_pos, static_cache, max_len,
                                                        idx.device, rows_apart)
        if use_cache and attn_mask is not None:  # additive, once: SDPA would convert a bool mask in every layer
            attn_mask = torch.zeros(attn_mask.shape, dtype=kv_caches[0].k.dtype, device=idx.device) \
                .masked_fill_(~attn_mask, float("-inf"))
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(position_ids))
        for i, block in enumerate(self.transformer.h):
            if static_cache and i:
                # The compiled decode step (the only caller with static_cache) keeps each block's output
                # a tensor of the model's dtype: inductor fusing one block's residual add into the next
                # block's norm skips a bf16 rounding that eager does, and greedy tokens must be eager's.
                x = torch.ops.gpt2ft.block_output(x)
            cache = kv_caches[i] if use_cache else None
            if self.gradient_checkpointing and self.training and not use_cache:
                x = checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask, cache, input_pos, cache_len, cache_rows, query_pos)
        x = self.transformer.ln_f(x)
        if targets is not None:
            return self._loss(x, targets, reduction)
        if isinstance(logits_at, str):
            if logits_at != "last":
                raise ValueError(f"logits_at must be None, 'last' or a bool mask, not {logits_at!r}")
            x = x[:, -1]
        elif logits_at is not None:
            x = x[logits_at]
        return x if hidden_only else self.lm_head(x)

    def _loss(self, x: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        """Summed cross-entropy of the final hidden states x (B, T, C) against targets (B, T), only the
        trained positions reaching lm_head."""
        mask = supervised_mask(targets)
        hidden, labels = x[mask], targets[mask]  # (N, C), (N,) in row-major order
        if reduction == "sum":
            return linear_cross_entropy_sum(hidden, self.lm_head.weight, labels)
        if reduction == "per_sequence":
            rows = mask.nonzero()[:, 0]  # the row each trained position belongs to
            return linear_cross_entropy_per_sequence(hidden, self.lm_head.weight, labels, rows, len(targets))
        raise ValueError(f"reduction must be 'sum' or 'per_sequence', not {reduction!r}")

    @staticmethod
    def _decode_positions(B, T, attention_mask, input_pos, device, dtype) -> torch.Tensor | None:
        """(B, T) cache positions of the queries when a CPU attends over the cache with gpt2ft's kernel (each
        query over the slots up to its own; a decode step or a verify: few queries, no padding mask; a float32
        or bf16 model: the kernel's dtypes), else None."""
        if input_pos is None or attention_mask is not None or T > DECODE_QUERIES or device.type != "cpu" \
                or dtype not in DECODE_ATTENTION_DTYPES or decode_attention() is None:
            return None
        return (input_pos if input_pos.dim() == 2 else input_pos[None]).expand(B, T).contiguous()

    @staticmethod
    def _attention_mask(T, attention_mask, input_pos, static_cache, max_len, device, rows_apart=False):
        """The bool mask (B|1, 1, T, S) for SDPA, or None where is_causal / attend-to-all suffices;
        with a cache also S, the number of cache slots to attend over (None: all of them; (B, T) nested
        lists: each token's own, for rows_apart)."""
        if input_pos is None:
            if attention_mask is None:
                return None, None
            if attention_mask.dim() == 3:  # a full (B, T, S) mask, e.g. block-diagonal for packed rows
                return attention_mask.bool()[:, None], None
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
            return mask | torch.eye(T, dtype=torch.bool, device=device), None  # pad rows see themselves
        if rows_apart and attention_mask is None and input_pos.dim() == 2 and not static_cache:
            return None, (input_pos + 1).tolist()  # each token over its own row's slots (_attend_rows_apart)
        per_row = input_pos.dim() == 2
        if per_row and input_pos.shape[0] == 1:  # one row: the shared-positions mask is the same
            input_pos, per_row = input_pos[0], False
        if static_cache:
            S, cache_len = max_len, None
        else:
            S = int(input_pos.max()) + 1
            cache_len = S
            if attention_mask is None and T == 1 and not per_row:
                return None, cache_len  # one new token attends to every cached one
        pos = (input_pos if per_row else input_pos[None])[:, None, :, None]  # (B|1, 1, T, 1)
        slots = torch.arange(S, device=device)
        mask = slots <= pos  # (B|1, 1, T, S): each query sees the slots up to its own
        if attention_mask is not None:
            mask = mask & attention_mask[:, :S].bool()[:, None, None, :]
            mask = mask | (slots == pos)  # padding queries see themselves
        return mask, cache_len
