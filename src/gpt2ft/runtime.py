"""Device, dtype and seeding choices shared by every verb."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from .errors import OptionError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """auto: cuda > mps > cpu; an explicit device that is not there is a user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError("device", lambda n: f"{n('device')} {name}: no CUDA GPU is visible; use cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise OptionError("device", lambda n: f"{n('device')} mps: Apple MPS is not available here; use cpu or auto")
    if name != "cpu" and not name.startswith(("cuda", "mps")):
        raise OptionError("device", lambda n: f"{n('device')} must be auto, cpu, cuda or mps, not {name!r}")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on a GPU that supports it, else float32 (float16 only when asked)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise OptionError("dtype", lambda n: f"{n('dtype')} must be auto, float32, bfloat16 or float16, not {name!r}")
    return DTYPES[name]


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16), where bf16 is
    several times faster than fp32; other CPUs emulate it, slower than fp32. Read from the CPU's
    feature flags (torch's cpuinfo, else /proc/cpuinfo), never assumed."""
    return bool(_cpu_bf16_feature())


def _cpu_bf16_feature() -> str | None:
    """The CPU feature that multiplies bf16 in hardware: "AMX-BF16", "AVX512-BF16", or None."""
    try:
        caps = torch.cpu.get_capabilities()
        flags = [name for name, on in caps.items() if on is True]
    except (AttributeError, RuntimeError):  # an older torch: the kernel's own list
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        except OSError:
            return None
    return "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None


def inference_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str | None]:
    """--dtype of the verbs that run a model without training it (generate, chat, serve, eval, compare,
    data pairs). auto: bfloat16 where bf16 matrix products run in hardware (a CUDA GPU that has them; a
    CPU with AMX-BF16 or AVX512-BF16), float32 elsewhere. Returns the dtype and, for auto, why it was
    picked (one line for the user); float32 stays the way to compare bit for bit."""
    if name != "auto":
        return resolve_dtype(name, device), None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: this GPU multiplies bfloat16 in hardware"
        return torch.float32, "auto: this GPU has no bfloat16"
    if device.type == "cpu":
        feature = _cpu_bf16_feature()
        if feature:
            return torch.bfloat16, f"auto: this CPU multiplies bfloat16 in hardware ({feature})"
        return torch.float32, "auto: this CPU has neither AMX-BF16 nor AVX512-BF16"
    return torch.float32, f"auto: float32 on {device.type}"


def check_compiler(device: torch.device) -> None:
    """--compile needs inductor's toolchain: a C++ compiler on a CPU, Triton on a GPU."""
    if device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            raise OptionError("compile", lambda n: f"{n('compile')} on a GPU needs Triton (pip install triton), or "
                                                   f"drop {n('compile')}")
    elif device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as e:  # noqa: BLE001 - inductor raises its own kinds
            why = ' '.join(str(e).split())[:200]
            raise OptionError("compile", lambda n: f"{n('compile')} needs a C++ compiler on this CPU (torch's "
                                                   f"inductor: {why}); install g++ or drop {n('compile')}") from None
    else:
        raise OptionError("compile", lambda n: f"{n('compile')} runs on a CPU or a CUDA GPU, not {device.type}; "
                                               f"drop {n('compile')}")


_ONE_ROW_AS_SEVERAL: dict[tuple, bool] = {}


@torch.inference_mode()
def one_row_rounds_as_several(model: torch.nn.Module) -> bool:
    """Whether each of the model's linear layers gives a row alone bitwise what it gives that row among
    others. Not so on some CPUs in bf16 (oneDNN takes another kernel for one row). Detected once per set of
    layer shapes and dtypes, on random rows and weights of those shapes (a sharded model's own weights are
    not whole outside its forward): the kernel is chosen by shape, so layers that agree here agree always."""
    layers = [model.lm_head] + ([*model.transformer.h[0].modules()] if len(model.transformer.h) else [])
    layers = [m for m in layers if isinstance(m, torch.nn.Linear) or hasattr(m, "weight_int8")]
    key = tuple((type(m).__name__, m.in_features, m.out_features, m.weight.dtype, m.weight.device) for m in layers)
    if key not in _ONE_ROW_AS_SEVERAL:
        gen = torch.Generator().manual_seed(0)
        agree = True
        for m in layers:
            dtype, device, shape = m.weight.dtype, m.weight.device, (m.out_features, m.in_features)
            if hasattr(m, "weight_int8"):  # int8 weights (quantize.Int8Linear)
                q = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
                layer = type(m)(q.to(device), torch.rand(shape[0], generator=gen).to(device) / 64, None, dtype)
            else:
                weight = torch.randn(shape, generator=gen).to(device, dtype)
                layer = lambda x, weight=weight: torch.nn.functional.linear(x, weight)
            x = torch.randn(2, shape[1], generator=gen).to(device, dtype)
            agree = agree and torch.equal(layer(x[:1]), layer(x)[:1])
        _ONE_ROW_AS_SEVERAL[key] = agree
    return _ONE_ROW_AS_SEVERAL[key]


def _mallopt():
    """glibc's mallopt, or None where the C library has none (macOS, musl)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError, TypeError):
        return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc's malloc.h


@contextlib.contextmanager
def freed_memory_kept(enabled: bool = True):
    """While inside (on glibc): serve every allocation from the heap, no per-buffer mmap, and keep what is
    freed for reuse. A training step on a CPU frees and reallocates the same large buffers every step
    (logits chunks, gradients, weight casts); by default each one over 32 MiB is mapped afresh and each
    of its 4 KiB pages faulted in and zeroed again: over 2 x 10^5 page faults a step for GPT-2 124M at
    4 x 256 tokens, about 15% of the step's CPU time on the AVX512-BF16 box. Measured there: no faults
    after the first steps, the heap flat over 150 steps of varying lengths, peak RSS within 3%. On exit,
    glibc's usual large-buffer settings come back and the heap's free memory is returned
    (malloc_trim), so later work in the process neither keeps nor fragments it. Yields whether it applied."""
    mallopt = _mallopt() if enabled else None
    applied = mallopt is not None and bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    try:
        yield applied
    finally:
        if applied:  # glibc's defaults once its dynamic threshold has grown: mmap above 32 MiB, trim above 64
            mallopt(_M_MMAP_MAX, 65536)
            mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
            mallopt(_M_TRIM_THRESHOLD, 64 * 2**20)
            import ctypes

            ctypes.CDLL(None).malloc_trim(0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def progress_bar(**options):
    """A tqdm bar, built with Ctrl-C held back until it is whole: a tqdm() cut short by KeyboardInterrupt
    leaves a half-made object whose destructor prints a traceback on the way out."""
    import signal
    import threading

    from tqdm import tqdm

    if threading.current_thread() is not threading.main_thread():
        return tqdm(**options)
    held = []
    previous = signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        return tqdm(**options)
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            signal.raise_signal(signal.SIGINT)  # now, to whoever handled it before
