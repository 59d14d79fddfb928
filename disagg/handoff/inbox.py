"""The decode worker's inbox for KV caches pushed by prefill workers (the direct transport)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from disagg.errors import DisaggError, KvIntegrityError, Overloaded, ProtocolError
from disagg.kv.budget import KvBudget, Reservation
from disagg.kv.codec import KvAssembler, KvLayout
from disagg.kv.framing import HandoffMessage, event_of
from disagg.model.kv_layers import KvLayers
from disagg.rpc.convert import layout_from_pb


@dataclass
class _Pending:
    future: asyncio.Future[KvLayers]
    created: float = field(default_factory=time.monotonic)
    layout: KvLayout | None = None
    reservation: Reservation | None = None  # made by whichever of push and Decode call came first


class KvInbox:
    """Caches pushed by prefill workers (direct transport), held until the Decode call naming their handle claims
    them. Push and claim may come in either order; what nobody claims within `ttl_seconds` is dropped, and a push
    for a Decode call that already ended is refused.

    Pushed bytes count against the worker's KV budget: a push reserves its cache from its header before anything
    is allocated (or finds the reservation its Decode call already made), and the Decode call grows it to the
    sequence's final size; a cache dropped unclaimed releases it."""

    def __init__(
        self, fingerprint: str, budget: KvBudget | None = None, ttl_seconds: float = 60.0, max_pending: int = 1024
    ):
        self.fingerprint, self.ttl, self.max_pending = fingerprint, ttl_seconds, max_pending
        self.budget = budget if budget is not None else KvBudget(0)
        self._pending: dict[str, _Pending] = {}
        self._abandoned: dict[str, float] = {}  # handles whose Decode call ended unclaimed, and when

    @property
    def bytes_held(self) -> int:
        """Bytes of caches being pushed or waiting for their claim (a failed push holds none)."""
        return sum(
            p.layout.total_bytes
            for p in self._pending.values()
            if p.layout is not None and not (p.future.done() and p.future.exception() is not None)
        )

    def _entry(self, handle: str) -> _Pending:
        """The pending handoff of `handle`, created by whichever of push and claim comes first."""
        now = time.monotonic()
        for stale in [h for h, p in self._pending.items() if p.layout is not None and now - p.created > self.ttl]:
            self._drop(stale, KvIntegrityError(f"KV cache {stale} was never claimed"))
        for stale in [h for h, at in self._abandoned.items() if now - at > self.ttl]:
            del self._abandoned[stale]
        if handle in self._abandoned:
            raise ProtocolError(f"the Decode call of KV cache {handle} has ended; nobody will claim it")
        if handle not in self._pending:
            if len(self._pending) >= self.max_pending:
                raise Overloaded(f"{len(self._pending)} pushed KV caches waiting to be claimed; retry later")
            self._pending[handle] = _Pending(asyncio.get_running_loop().create_future())
        return self._pending[handle]

    async def receive(self, requests: AsyncIterator[HandoffMessage]) -> int:
        """A PushKv stream: header, then chunks; returns the bytes received."""
        message = await anext(aiter(requests), None)
        if message is None or event_of(message) != "header" or not message.header.handle:
            raise ProtocolError("PushKv must start with a KvPushHeader naming a handle")
        header = message.header
        pending = self._entry(header.handle)
        if pending.layout is not None:
            raise ProtocolError(f"KV cache {header.handle} pushed twice")
        try:
            layout = layout_from_pb(header.kv_layout)
            if pending.reservation is None:  # before the assembler allocates anything
                pending.reservation = self.budget.reserve(layout.cache_bytes, f"pushed KV cache {header.handle}")
            assembler = KvAssembler(layout, expected_fingerprint=self.fingerprint)
            pending.layout = layout
            async for message in requests:
                if event_of(message) != "kv_chunk":
                    raise ProtocolError("PushKv: only KvChunk messages may follow the header")
                assembler.add(message)
            layers = assembler.layers()  # raises when incomplete
        except BaseException as error:
            self._fail_push(header.handle, error)
            raise
        if not pending.future.done():
            pending.future.set_result(layers)
        return assembler.received

    def _fail_push(self, handle: str, error: BaseException) -> None:
        pending = self._pending.get(handle)
        if pending is not None:
            if not isinstance(error, DisaggError):
                error = KvIntegrityError(f"the push of KV cache {handle} ended early ({type(error).__name__})")
            _fail(pending.future, error)
            if pending.reservation is not None:  # the claim fails too: nothing will be held
                pending.reservation.release()

    def reserve(self, handle: str, nbytes: int, label: str) -> Reservation:
        """The Decode call's reservation for the cache pushed under `handle`: the push's, grown to `nbytes`, or a
        new one the push will find (Overloaded when it does not fit)."""
        pending = self._entry(handle)
        if pending.reservation is None:
            pending.reservation = self.budget.reserve(nbytes, label)
        else:
            pending.reservation.resize(nbytes)
        return pending.reservation

    def _drop(self, handle: str, error: BaseException) -> None:
        pending = self._pending.pop(handle, None)
        if pending is not None:
            _fail(pending.future, error)
            if pending.reservation is not None:
                pending.reservation.release()

    async def claim(self, handle: str, layout: KvLayout, timeout: float) -> KvLayers:
        """The pushed cache of `handle` once complete; its layout must be the one the Decode call announced."""
        pending = self._entry(handle)
        try:
            layers = await asyncio.wait_for(asyncio.shield(pending.future), timeout)
        except TimeoutError:
            raise KvIntegrityError(f"KV cache {handle} was not pushed within {timeout:.0f} s") from None
        finally:
            if not pending.future.done():  # the Decode call ended first: refuse the push when it comes
                self.abandon(handle)
            elif self._pending.get(handle) is pending:
                del self._pending[handle]
        if pending.layout != layout:
            raise KvIntegrityError(f"pushed KV cache {handle} has layout {pending.layout}, the sequence {layout}")
        return layers

    def abandon(self, handle: str) -> None:
        """The Decode call naming `handle` ended before it claimed the cache: drop it, and refuse it if it is
        still to come."""
        self._drop(handle, ProtocolError(f"the Decode call of KV cache {handle} has ended"))
        self._abandoned[handle] = time.monotonic()


def _fail(future: asyncio.Future[KvLayers], error: BaseException) -> None:
    """Settle with an error that a claim may or may not be waiting for (no "exception never retrieved")."""
    if not future.done():
        future.set_exception(error)
        future.exception()
