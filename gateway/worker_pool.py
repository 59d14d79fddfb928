"""The gateway's view of its workers: one channel each, opened once, and least-loaded selection."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from disagg.errors import NoWorkerAvailable
from disagg.serving import CHANNEL_OPTIONS


@dataclass
class Worker:
    address: str
    channel: grpc.aio.Channel
    stub: object
    in_flight: int = 0
    healthy: bool = True


@dataclass
class WorkerPool:
    kind: str
    workers: list[Worker] = field(default_factory=list)

    @classmethod
    def connect(cls, kind: str, addresses: tuple[str, ...], stub_class: Callable) -> WorkerPool:
        if not addresses:
            raise ValueError(f"no {kind} worker addresses configured")
        workers = []
        for address in addresses:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            workers.append(Worker(address, channel, stub_class(channel)))
        return cls(kind, workers)

    def pick(self, exclude: frozenset[str] = frozenset()) -> Worker:
        """The healthy worker with the fewest requests in flight."""
        candidates = [w for w in self.workers if w.healthy and w.address not in exclude]
        if not candidates:
            raise NoWorkerAvailable(f"no healthy {self.kind} worker available")
        return min(candidates, key=lambda w: w.in_flight)

    async def close(self) -> None:
        for worker in self.workers:
            await worker.channel.close()
