"""A prefix cache's changes for one asyncio watcher (the prefill worker's WatchKvEvents stream): batched, coalesced,
bounded, and never in the engine thread's way.

The cache calls the watcher's observer with its lock held, on the engine thread, after each change. The observer
only merges the keys into a pending map (key -> stored or removed: a key's latest change wins, which is all a
set of held keys needs) and, if the watcher is not already due to wake, schedules its wake-up on the event loop.
The watcher takes everything pending at once, so the changes made while it was sending arrive as one batch.

A watcher that does not keep up (its peer reads slowly) cannot make the worker hold an unbounded backlog: past
`max_pending` distinct keys the backlog is dropped and the watch is over (WatcherOverflow); the stream ends and
the peer subscribes again, from a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import TypeVar

from disagg.errors import Overloaded
from disagg.kv.prefix_cache import PrefixCache

DEFAULT_MAX_PENDING = 65_536  # distinct keys a watcher may fall behind by (~1 MB of keys) before it is dropped
MAX_KEYS_PER_MESSAGE = 4096  # ~80 KB of keys per message: far under the message limits
T = TypeVar("T")


class WatcherOverflow(Overloaded):
    """The watcher fell more than `max_pending` keys behind; it must subscribe again (RESOURCE_EXHAUSTED)."""


def batched(items: Sequence[T], size: int = MAX_KEYS_PER_MESSAGE) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def event_messages(
    stored: Sequence[bytes], removed: Sequence[bytes], size: int = MAX_KEYS_PER_MESSAGE
) -> Iterator[tuple[list[bytes], list[bytes]]]:
    """One batch of changes as (stored, removed) messages of at most `size` keys in all (the lists are disjoint,
    so their order across messages does not matter)."""
    changes = [(key, True) for key in stored] + [(key, False) for key in removed]
    for part in batched(changes, size):
        yield [key for key, kept in part if kept], [key for key, kept in part if not kept]


class CacheWatch:
    """The snapshot a watcher starts from (`snapshot`), then its batches of changes (`next_batch`)."""

    def __init__(self, cache: PrefixCache, max_pending: int = DEFAULT_MAX_PENDING):
        self.max_pending = max_pending
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()  # the observer runs on the engine thread
        self._pending: dict[bytes, bool] = {}  # key -> True stored, False removed (its latest change)
        self._due = False  # a wake-up is scheduled and not yet taken
        self._wake = asyncio.Event()
        self.overflowed = self.closed = False
        self._cache = cache
        self.snapshot = cache.watch(self._observe)

    def _observe(self, stored: list[bytes], removed: list[bytes]) -> None:
        """The engine thread, under the cache's lock: merge and maybe schedule a wake-up; never waits."""
        with self._lock:
            if self.overflowed:
                return
            for key in removed:
                self._pending[key] = False
            for key in stored:
                self._pending[key] = True
            if len(self._pending) > self.max_pending:
                self.overflowed = True
                self._pending = {}
            if self._due:
                return
            self._due = True
        with contextlib.suppress(RuntimeError):  # (the loop is closed: the process is stopping)
            self._loop.call_soon_threadsafe(self._wake.set)

    async def next_batch(self) -> tuple[list[bytes], list[bytes]] | None:
        """The keys stored and removed since the last batch (never both empty); None once closed."""
        while True:
            await self._wake.wait()
            with self._lock:
                self._wake.clear()
                self._due = False
                if self.overflowed:
                    raise WatcherOverflow(
                        f"KV event watcher fell more than {self.max_pending} keys behind; subscribe again"
                    )
                pending, self._pending = self._pending, {}
            if self.closed:
                return None
            if pending:
                return [k for k, s in pending.items() if s], [k for k, s in pending.items() if not s]

    def close(self) -> None:
        """Stop watching (idempotent); a waiting next_batch returns None."""
        if not self.closed:
            self.closed = True
            self._cache.unwatch(self._observe)
            self._wake.set()
