"""glibc malloc settings for torch on the CPU: reuse freed tensor memory instead of returning it.

A training step on a batch of 64 MP crystals (PaiNN 64, 8 A) allocates dozens of tensors of
10-20 MB (edge features, gathers, their gradients) and frees them again. With glibc's defaults
such a block is either mapped fresh from the kernel (above the mmap threshold, which starts at
128 kB and rises only as large blocks are freed) or handed back when the top of the heap has more
than twice that free; either way the next step touches new pages, and the kernel zeroes each one.
Raising the mmap threshold to glibc's 64-bit limit (32 MB) and the trim threshold to 2 GB keeps
the freed blocks in the heap for the next step. Measured by ``bench/bench_allocator.py``
(``bench/results/allocator.md``, width-64 encoders, one thread, the same batches in alternating
processes): PaiNN 1.11x (MP, 8 A) and 1.14x (QM9) the graphs/s of glibc's defaults, SchNet 1.03-1.04x,
the MPNN unchanged (its edge tensors are smaller); peak resident memory unchanged.

The cost is memory: the process keeps its peak heap (up to 2 GB above what it uses) until it
exits, which suits a training or prediction process. Users who set ``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` themselves are left alone, as are other platforms and C libraries.
"""
from __future__ import annotations

import ctypes
import os
import sys

#: mallopt parameters of glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest mmap threshold on 64-bit systems (4 * 1024 * 1024 * sizeof(long)); larger values are refused.
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory (bytes) the heap keeps at its top before returning it (mallopt takes a C int).
TRIM_THRESHOLD = 2**31 - 1
#: Environment variables with which a user chooses glibc's settings.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (see the module docstring) for this process.

    Affects the allocations made after the call; call it once, early.

    Returns:
        True if both were set; False on other platforms or C libraries, or when the user set one
        of :data:`USER_SETTINGS`.
    """
    if not sys.platform.startswith("linux") or any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it: musl's mallopt does nothing)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
