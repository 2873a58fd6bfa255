"""Small C kernels that torch lacks on a CPU, built by the machine's C compiler on first use (as inductor
builds its C++ kernels) for the CPU it runs on (-march=native), and cached per source and CPU in
~/.cache/gpt2ft/native. Where no compiler works, a caller takes torch's own op instead (said once).

int8_linear: the int8 weight-only linear of quantize.Int8Linear (see int8_linear.c).
decode_attention: a decode step's attention over the KV cache (see decode_attention.c).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

_HEADER = Path(__file__).with_name("vectors.h")  # what the kernels share
_LOADED: dict[str, object] = {}  # kernel name -> its ctypes function, or None where it could not be built
_INSTEAD = {"int8_linear": "int8 weights use torch's slower kernel here",
            "decode_attention": "decoding attends with torch's slower kernel here"}


def _cpu_key() -> str:
    """What the machine code depends on: the CPU's feature flags (machines share a home folder)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


def _cache_dir() -> Path:
    root = os.environ.get("GPT2FT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "gpt2ft")
    return Path(root).expanduser() / "native"


def _build(source: Path) -> Path:
    """The shared library of `source`, compiled once per source and CPU; written under a temporary name
    and renamed, so that processes building it together never load half a file."""
    digest = hashlib.sha256(source.read_bytes() + _HEADER.read_bytes() + _cpu_key().encode()).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}-{digest}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        # -fopenmp: the OpenMP runtime torch itself loaded (libgomp.so.1), so the kernel shares its threads
        done = subprocess.run([compiler, "-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC",
                               f"-I{_HEADER.parent}", str(source), "-o", str(built)], capture_output=True, text=True)
        if done.returncode:
            raise OSError(f"{compiler} failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:200]}")
        os.replace(built, target)
    for old in target.parent.glob(f"{source.stem}-*.so"):  # other sources' or CPUs' builds (a loaded one stays
        if old != target:                                   # mapped where it is in use)
            old.unlink(missing_ok=True)
    return target


def _function(name: str, argtypes: list):
    """The C function `name` of native/`name`.c, built on first use; None where it cannot be (said once)."""
    if name not in _LOADED:
        _LOADED[name] = None
        if os.environ.get("GPT2FT_NATIVE", "1") != "0" and sys.platform.startswith("linux"):
            try:
                fn = getattr(ctypes.CDLL(str(_build(Path(__file__).with_name(f"{name}.c")))), name)
            except OSError as e:
                print(f"note: {_INSTEAD[name]} (building gpt2ft's: {e})", file=sys.stderr, flush=True)
            else:
                fn.argtypes, fn.restype = argtypes, None
                _LOADED[name] = fn
    return _LOADED[name]


def _check(ok: bool, what: str) -> None:
    """The C loops read raw memory: a layout other than theirs would be read wrong, not refused."""
    if not ok:
        raise ValueError(what)


_P, _I = ctypes.c_void_p, ctypes.c_int64
DECODE_ATTENTION_DTYPES = (torch.float32, torch.bfloat16)  # what decode_attention.c reads


def int8_linear():
    """The C int8 linear as f(x (M, K) float32, q (N, K) int8, scale (N,) float32, bias (N,) float32 or
    None) -> (M, N) float32, or None where it cannot be built here (GPT2FT_NATIVE=0 also says no)."""
    fn = _function("int8_linear", [_P] * 5 + [_I] * 3 + [ctypes.c_int])
    if fn is None:
        return None

    def call(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # (every linear layer of a decode step calls this: the checks are the few that keep the reads in bounds)
        (M, K), (N, Kq) = x.shape, q.shape
        f32 = torch.float32
        _check(x.dtype == f32 and scale.dtype == f32 and q.dtype == torch.int8 and Kq == K and scale.shape[0] == N
               and scale.dim() == 1 and x.is_contiguous() and q.is_contiguous() and scale.is_contiguous()
               and (bias is None or (bias.dtype == f32 and bias.dim() == 1 and bias.shape[0] == N and bias.is_contiguous()))
               and x.is_cpu and q.is_cpu,
               "int8_linear: x (M, K) float32, q (N, K) int8, scale and bias (N,) float32, contiguous, on the CPU")
        y = torch.empty(M, N)
        fn(x.data_ptr(), q.data_ptr(), scale.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
           M, N, K, torch.get_num_threads())
        return y
    return call


def decode_attention():
    """The C decode attention as f(q (B, nh, T, hs), k, v (B, nh, S, hs), pos (B, T) int64, k_new=None,
    v_new=None) -> (B, T, nh, hs) float32: query (b, h, t) over slots 0 .. pos[b, t] of row b (a position
    outside the S slots gives NaN, never a read outside them). q, k and v float32 or bfloat16, any strides
    but the last. Given k_new and v_new (B, nh, T, hs), in k's dtype and strided alike, it first writes them
    into k and v at slots pos. None where it cannot be built here."""
    fn = _function("decode_attention", [_P, _I, _I, _I, ctypes.c_bool, _P, _P, ctypes.c_bool, _I, _I, _I, _I, _P, _P,
                                        _I, _I, _I, _I, ctypes.c_float, ctypes.c_int, _P, _P, _I, _I, _I])
    if fn is None:
        return None
    floats, bf16 = DECODE_ATTENTION_DTYPES, torch.bfloat16

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, k_new: torch.Tensor | None = None,
             v_new: torch.Tensor | None = None) -> torch.Tensor:
        # (a decode step calls this in every layer: the checks are the few that keep the C loop's reads in bounds)
        B, nh, T, hs = q.shape
        qs, ks = q.stride(), k.stride()
        _check(q.dtype in floats and k.dtype in floats and v.dtype == k.dtype and qs[3] == 1 and ks[3] == 1
               and v.stride() == ks and v.shape == k.shape and k.shape[0] == B and k.shape[1] == nh
               and k.shape[3] == hs and pos.dtype == torch.int64 and pos.shape == (B, T) and pos.is_contiguous()
               and q.is_cpu and k.is_cpu and v.is_cpu and pos.is_cpu,
               "decode_attention: q (B, nh, T, hs), k and v alike (B, nh, S, hs), float32 or bfloat16, the last "
               "dimension contiguous; pos (B, T) int64; on the CPU")
        new = (None, None, 0, 0, 0)
        if k_new is not None:
            ns = k_new.stride()
            _check(k_new.shape == q.shape and v_new.shape == q.shape and k_new.dtype == v_new.dtype == k.dtype
                   and v_new.stride() == ns and ns[3] == 1 and k_new.is_cpu and v_new.is_cpu,
                   "decode_attention: k_new and v_new (B, nh, T, hs) as q, in the cache's dtype, strided alike")
            new = (k_new.data_ptr(), v_new.data_ptr(), ns[0], ns[1], ns[2])
        out = torch.empty(B, T, nh, hs)
        fn(q.data_ptr(), qs[0], qs[1], qs[2], q.dtype == bf16, k.data_ptr(), v.data_ptr(), k.dtype == bf16, ks[0], ks[1],
           ks[2], k.shape[2], pos.data_ptr(), out.data_ptr(), B, nh, T, hs, hs ** -0.5, torch.get_num_threads(), *new)
        return out
    return call
