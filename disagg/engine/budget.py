"""The decode worker's KV memory budget."""

from __future__ import annotations

import threading

from disagg.errors import Overloaded


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
                raise Overloaded(
                    f"decode worker KV budget full: {self.used + nbytes} bytes needed, "
                    f"limit {self.limit} (--kv-budget-mb)"
                )
            self.used += nbytes

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes
