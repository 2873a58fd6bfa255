"""runtime: the inference dtype `auto` picks bf16 only where the CPU's flags say it multiplies bf16; the CPU
allocator setting the training loop makes while it trains."""
from __future__ import annotations

import ctypes
import resource

import pytest
import torch

from gpt2ft import runtime
from gpt2ft.errors import UserError
from gpt2ft.runtime import freed_memory_kept

MIB = 2**20


def _proc_flags() -> set[str]:
    """The kernel's own list of this CPU's flags (the oracle; empty where there is no /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        pytest.skip("no /proc/cpuinfo here")


def test_auto_follows_this_cpus_flags():
    flags = _proc_flags()
    fast = bool({"amx_bf16", "avx512_bf16"} & flags)
    assert runtime.cpu_has_fast_bf16() == fast
    dtype, why = runtime.inference_dtype("auto", torch.device("cpu"))
    assert dtype == (torch.bfloat16 if fast else torch.float32)
    assert why.startswith("auto: ") and ("AVX512-BF16" in why or "AMX-BF16" in why or not fast)


@pytest.mark.parametrize("feature, want", [("AMX-BF16", torch.bfloat16), ("AVX512-BF16", torch.bfloat16),
                                           (None, torch.float32)])
def test_auto_on_cpus_with_and_without_bf16(monkeypatch, feature, want):
    monkeypatch.setattr(runtime, "_cpu_bf16_feature", lambda: feature)
    dtype, why = runtime.inference_dtype("auto", torch.device("cpu"))
    assert dtype == want and (feature or "neither") in why


def test_explicit_dtypes_are_kept_and_bad_ones_refused():
    assert runtime.inference_dtype("float32", torch.device("cpu")) == (torch.float32, None)
    assert runtime.inference_dtype("bf16", torch.device("cpu")) == (torch.bfloat16, None)
    with pytest.raises(UserError, match="^dtype must be"):  # the keyword; the CLI says --dtype
        runtime.inference_dtype("float64", torch.device("cpu"))



def test_verbs_say_in_one_line_what_auto_picked(capsys):
    """generate, chat, serve, eval, compare and data pairs resolve --dtype through commands.inference_device."""
    from argparse import Namespace

    from gpt2ft.commands import inference_device

    device, dtype = inference_device(Namespace(device="cpu", dtype="auto"))
    assert (device.type, dtype) == ("cpu", runtime.inference_dtype("auto", device)[0])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dtype: {str(dtype).removeprefix('torch.')} (auto: ")
    assert inference_device(Namespace(device="cpu", dtype="float32"))[1] == torch.float32
    assert capsys.readouterr().err == ""  # an explicit dtype needs no word


def _faults_of_a_fresh_buffer(libc, mib: int) -> int:
    """Page faults of malloc + touching every byte + free of a buffer of `mib` MiB."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = libc.malloc(mib * MIB)
    ctypes.memset(buffer, 1, mib * MIB)
    libc.free(buffer)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_memory_is_kept_while_inside_and_released_after():
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    pages = 64 * MIB // 4096
    with freed_memory_kept() as applied:
        if not applied:
            pytest.skip("not glibc: the allocator is left as it is")
        inside = [_faults_of_a_fresh_buffer(libc, 64) for _ in range(3)]  # the first one grows the heap
    after = [_faults_of_a_fresh_buffer(libc, 64) for _ in range(2)]
    assert max(inside[1:]) < pages // 10, inside  # reused: under a tenth of its 4 KiB pages faulted again
    assert min(after) > pages // 2, after  # mapped afresh again each time (glibc's way above 32 MiB)
