"""Process-wide settings the command line makes for itself (never the library: a host process
keeps its own)."""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(limit: int = 32 << 20) -> bool:
    """Let glibc reuse freed blocks up to ``limit`` bytes instead of unmapping them.

    numpy's LAPACK wrappers allocate their work copies afresh on every call. Above glibc's
    mmap threshold each one is a new mapping that the kernel faults in page by page and unmaps on
    free: re-ranking the real r=64 adapter (420 QRs) took 103k minor page faults and 0.27 s of
    system time with glibc's defaults, 54k and 0.15 s with blocks up to 32 MiB (glibc's documented
    maximum on 64-bit) served from the heap (``python -m tools.bench.bench_lowrank``). A no-op
    (False) off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 * limit))
