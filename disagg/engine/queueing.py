"""The order waiting work is served in, in every queue a request waits in (the engines' queues, the gateway's
admission): lower `priority` value first (vLLM's sense; 0 is the default), first come first served among equals.

No preemption: a running sequence keeps its place; priority decides only who leaves a queue next. A queue holds at
most a worker's --max-queue items, so a sorted list (binary-search insertion) is as fast as a heap here and keeps
the deque-like iteration in service order that the batch builders read.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")


def priority_of(item: Any) -> int:
    """An item's `priority` attribute (0 for items that have none)."""
    return int(getattr(item, "priority", 0))


class PriorityQueue(Generic[Item]):
    """Items in service order: by priority (lower first), then by arrival. Iteration, `popleft` and `len` as a
    deque's, so the engines' batch builders read it as they read their FIFO before."""

    def __init__(self, items: Iterable[Item] = (), key: Callable[[Any], int] = priority_of):
        self._key = key
        self._arrivals = itertools.count()
        self._order: list[tuple[int, int]] = []  # (priority, arrival) of each item, sorted
        self._items: list[Item] = []  # in the same order
        self.extend(items)

    def append(self, item: Item) -> None:
        rank = (self._key(item), next(self._arrivals))
        at = bisect.bisect_right(self._order, rank)
        self._order.insert(at, rank)
        self._items.insert(at, item)

    def extend(self, items: Iterable[Item]) -> None:
        for item in items:
            self.append(item)

    def popleft(self) -> Item:
        if not self._items:
            raise IndexError("pop from an empty queue")
        del self._order[0]
        return self._items.pop(0)

    def __iter__(self) -> Iterator[Item]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __repr__(self) -> str:
        return f"PriorityQueue({self._items!r})"
