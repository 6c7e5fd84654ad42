"""Keep freed host memory inside the process (glibc) so CPU training stops paying the kernel for it every step.

glibc serves each allocation above its mmap threshold (at most 32 MiB) with a fresh `mmap` and unmaps it on free.
A training step allocates its activations and gradients anew (Trainer sets gradients to None after each step), so
on CPU every step page-faults and zeroes GiBs again: upcycled SmolLM2-135M, 8 experts top-2, 2 x 256 tokens, one
step went from 7.7 s to 5.2 s with this (dense: 3.1 s to 2.7 s); see benchmarks/README.md. tcmalloc or jemalloc
(LD_PRELOAD) do the same for a whole process; this needs nothing installed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_MAX = -4
OPT_OUT = "LLAMA_MOE_SYSTEM_MALLOC"  # set to 1 to leave the allocator as it is


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and never trim it, so freed buffers are reused without page faults.

    The resident set stays at the run's peak instead of shrinking between steps (a training run reaches that peak
    every step anyway). Returns whether the setting was applied: only on Linux with glibc, and not when
    LLAMA_MOE_SYSTEM_MALLOC=1."""
    if os.environ.get(OPT_OUT, "0") not in ("", "0") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and others accept mallopt but ignore it
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
