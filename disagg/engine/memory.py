"""The worker process's memory as the OS sees it: resident size, and handing freed memory back."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to call
        return None


_MALLOC_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Hand memory that the process freed but the C allocator kept back to the OS (glibc's malloc_trim).

    glibc keeps freed tensors' pages in its arenas: a decode worker that served a batch of 32 stays at that batch's
    high-water mark, and where that mark lands depends on fragmentation, so RSS after a burst says little. Trimmed
    when idle, RSS comes back to what is actually held (weights + live caches).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
