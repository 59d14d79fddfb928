"""The gateway's view of its workers: one channel each, opened once, health-checked, least-loaded selection.

Addresses may be DNS names that resolve to several workers (a headless service, a docker-compose service scaled
to N); they are re-resolved on every health pass, so workers that appear later are picked up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from disagg.config import TlsOptions
from disagg.errors import NoWorkerAvailable
from disagg.rpc.channel import open_channel

log = logging.getLogger(__name__)
Stub = TypeVar("Stub")  # the stub class a pool's workers are called through (RelayPrefillStub, RelayDecodeStub)


@dataclass
class Worker(Generic[Stub]):
    kind: str
    address: str
    channel: grpc.aio.Channel
    stub: Stub
    health: health_pb2_grpc.HealthStub
    in_flight: int = 0
    healthy: bool = True


def resolve(address: str) -> list[str]:
    """`host:port` to one `ip:port` per address the name resolves to (an IP resolves to itself)."""
    host, _, port = address.rpartition(":")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError):
        return [address]
    ips = sorted({cast(str, info[4][0]) for info in infos})  # (an AF_INET or AF_INET6 address: its host is a str)
    return [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips] or [address]


class WorkerPool(Generic[Stub]):
    def __init__(
        self,
        kind: str,
        addresses: tuple[str, ...],
        stub_class: Callable[[grpc.aio.Channel], Stub],
        tls: TlsOptions | None = None,
    ):
        if not addresses:
            raise ValueError(f"no {kind} worker addresses configured")
        self.kind, self._addresses, self._stub_class, self._tls = kind, addresses, stub_class, tls
        self.workers: dict[str, Worker[Stub]] = {}
        self._refresh_addresses()

    def _refresh_addresses(self) -> None:
        for address in (a for name in self._addresses for a in resolve(name)):
            if address not in self.workers:
                channel = open_channel(address, self._tls)
                self.workers[address] = Worker(
                    self.kind, address, channel, self._stub_class(channel), health_pb2_grpc.HealthStub(channel)
                )

    def pick(self, exclude: frozenset[str] = frozenset()) -> Worker[Stub]:
        """The healthy worker with the fewest requests in flight."""
        candidates = [w for w in self.workers.values() if w.healthy and w.address not in exclude]
        if not candidates:
            states = ", ".join(f"{w.address} {'healthy' if w.healthy else 'down'}" for w in self.workers.values())
            raise NoWorkerAvailable(f"no healthy {self.kind} worker available ({states})")
        return min(candidates, key=lambda w: w.in_flight)

    def mark_failed(self, worker: Worker[Stub]) -> None:
        """Take a worker out of rotation at once; the health loop puts it back when it answers SERVING."""
        if worker.healthy:
            log.warning("%s worker %s marked down", self.kind, worker.address)
        worker.healthy = False

    async def check(self) -> None:
        """One health pass over every worker (re-resolving names first)."""
        self._refresh_addresses()

        async def one(worker: Worker[Stub]) -> None:
            try:
                reply = await worker.health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                up = reply.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.aio.AioRpcError:
                up = False
            if up != worker.healthy:
                log.warning("%s worker %s is %s", self.kind, worker.address, "up" if up else "down")
            worker.healthy = up

        await asyncio.gather(*(one(w) for w in list(self.workers.values())))

    async def monitor(self, interval: float) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.check()
            await asyncio.sleep(interval)

    async def close(self) -> None:
        for worker in self.workers.values():
            await worker.channel.close()
