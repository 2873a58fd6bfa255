"""runtime: the CPU allocator setting the training loop makes while it trains."""
import ctypes
import resource

import pytest

from gpt2ft.runtime import freed_memory_kept

MIB = 2**20


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
