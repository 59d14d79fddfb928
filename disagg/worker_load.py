"""What a worker reports about its load (WorkerLoadService), and the decode worker's KV memory budget."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

from disagg.errors import Overloaded
from disagg.pb.disagg.v1 import worker_pb2, worker_pb2_grpc


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _malloc_trim():
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


class KvBudget:
    """Bytes of KV cache a decode worker has promised to sequences; refuses a sequence that would not fit.

    A sequence reserves its final size (prompt + max_new_tokens) when its handoff starts, so admitted sequences
    can always run to completion, and releases it when it leaves, whatever the reason.
    """

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> None:
        with self._lock:
            if self.limit and self.used + nbytes > self.limit:
                raise Overloaded(f"decode worker KV budget full: {self.used + nbytes} bytes needed, "
                                 f"limit {self.limit} (--kv-budget-mb)")
            self.used += nbytes

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes


class LoadServicer(worker_pb2_grpc.WorkerLoadServiceServicer):
    """Reports the numbers a worker's servicer keeps (active sequences, queue, KV bytes)."""

    def __init__(self, report):
        self._report = report  # () -> dict of GetLoadResponse fields

    async def GetLoad(self, request, context):
        return worker_pb2.GetLoadResponse(rss_bytes=rss_bytes(), **self._report())
