"""The gateway's admission: at most --max-inflight requests in the pipeline at once; with --admission-queue N, up to
N more wait for a place and get one in priority order (lower value first, FIFO among equals:
disagg.engine.queueing), and only past that is a request refused (RESOURCE_EXHAUSTED). With N = 0 (the default)
a request that finds every place taken is refused at once, whatever its priority.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from disagg.engine.queueing import PriorityQueue
from disagg.errors import Overloaded
from disagg.telemetry.metrics import GatewayMetrics, current, priority_label


@dataclass
class _Waiter:
    priority: int
    place: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class AdmissionGate:
    """Places for requests in flight, handed out in priority order when they are scarce. One event loop's."""

    def __init__(self, max_inflight: int, max_waiting: int = 0):
        self.max_inflight, self.max_waiting = max_inflight, max_waiting
        self.in_flight = 0
        self._waiting: PriorityQueue[_Waiter] = PriorityQueue()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @contextlib.asynccontextmanager
    async def admitted(self, priority: int = 0) -> AsyncIterator[None]:
        """A place for the body of the `async with`; Overloaded when there is none and no room to wait for one."""
        started = time.perf_counter()
        if self.in_flight < self.max_inflight and not self._waiting:
            self.in_flight += 1
        elif len(self._waiting) < self.max_waiting:
            waiter = _Waiter(priority)
            self._waiting.append(waiter)
            try:
                await waiter.place  # the place is handed over by a leaving request (in_flight unchanged)
            except BaseException:
                if waiter.place.done() and not waiter.place.cancelled():  # given a place as it was cancelled
                    self._leave()
                else:
                    self._waiting = PriorityQueue(w for w in self._waiting if w is not waiter)
                raise
        else:
            raise Overloaded(
                f"gateway has {self.in_flight} requests in flight (--max-inflight) and {len(self._waiting)} waiting "
                "(--admission-queue); retry later"
            )
        if (m := current(GatewayMetrics)) is not None:
            m.admission_wait.labels(priority_label(priority)).observe(time.perf_counter() - started)
        try:
            yield
        finally:
            self._leave()

    def _leave(self) -> None:
        """A place is free: the first waiter in priority order takes it, else it is given back."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.place.done():
                waiter.place.set_result(None)
                return
        self.in_flight -= 1
