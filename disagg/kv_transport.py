"""How a KV cache moves from the prefill worker to the decode worker (`KvTransport` in worker.proto).

- relayed: KvChunk messages in the Prefill stream; the gateway forwards them in its Decode call.
- direct: the prefill worker pushes the same KvChunk messages straight to the decode worker (DecodeService.PushKv);
  the gateway's Decode call names the cache by a handle and the decode worker's KvInbox pairs the two.
- shared memory (co-located workers): the prefill worker writes the tensors' wire bytes into a /dev/shm segment;
  the stream carries one KvSharedMemory message; the decode worker maps it, checks it, and adopts the tensors
  without copying them (removing the segment's name).

A sender takes the cache one layer at a time (as the forward pass computes it, or all at the end) and returns the
messages that belong in the Prefill stream. Chunks, checksums and wire formats are kv_codec's on every path, and
each sender records the `kv.serialize` span.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import re
import time
import uuid
from dataclasses import dataclass, field

import grpc
import torch

from disagg import telemetry
from disagg.config import KV_TRANSPORTS, TlsOptions
from disagg.errors import DisaggError, KvIntegrityError, Overloaded, ProtocolError, UpstreamError
from disagg.kv_codec import KvAssembler, KvLayout, crc32, encode_tensor, wire_bytes
from disagg.pb.disagg.v1 import worker_pb2
from disagg.prefill_batch import KvLayers
from disagg.serving import CallEnded, open_channel, send
from disagg.wire import PushKvStub, chunk_message, event_of, layout_from_pb, layout_to_pb

RELAYED, DIRECT, SHARED_MEMORY = (worker_pb2.KV_TRANSPORT_RELAYED, worker_pb2.KV_TRANSPORT_DIRECT,
                                  worker_pb2.KV_TRANSPORT_SHARED_MEMORY)
TRANSPORT_NAMES = dict(zip(KV_TRANSPORTS, (RELAYED, DIRECT, SHARED_MEMORY), strict=True))
SHM_DIR = "/dev/shm"
SHM_NAME = re.compile(r"disagg-kv-[0-9a-f]{32}")
# Status codes of a failed push that mean "the decode worker is gone": the caller should move the request.
DECODE_GONE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


class DecodeWorkerFailed(DisaggError):
    """The direct push's decode worker failed: ABORTED, so the gateway blames (and avoids) that worker."""

    code = grpc.StatusCode.ABORTED


class KvSender:
    """Encodes layers into kv_codec chunks and keeps the numbers of the `kv.serialize` span."""

    name = "relayed"

    def __init__(self, layout: KvLayout, chunk_bytes: int):
        self.layout, self.chunk_bytes = layout, chunk_bytes
        self.serialize = telemetry.KvSerialize(self.name)

    def encode(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> list[bytes]:
        """This layer's K and V as serialized chunk messages (any of the three that carry KvChunk)."""
        with self.serialize.encoding() as encoded:
            chunks = [chunk for index, tensor in ((2 * layer, keys), (2 * layer + 1, values))
                      for chunk in encode_tensor(index, tensor, self.chunk_bytes, self.layout.wire_dtype or None)]
            encoded.add(sum(len(chunk.data) for chunk in chunks), len(chunks))
            return [chunk_message(chunk) for chunk in chunks]

    async def send_layer(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> list:
        """This layer's messages for the Prefill stream (none when they go elsewhere)."""
        raise NotImplementedError

    async def finish(self) -> list:
        """The last messages for the Prefill stream, once every layer was sent."""
        self.serialize.end()
        return []

    def abort(self) -> None:
        """The request ended early: release what the transfer holds."""


class RelayedSender(KvSender):
    async def send_layer(self, layer, keys, values) -> list:
        return self.encode(layer, keys, values)


class PushClients:
    """The prefill worker's channels to decode workers for direct pushes, one per address, opened on first use."""

    def __init__(self, tls: TlsOptions | None = None):
        self.tls, self._stubs = tls, {}

    def stub(self, address: str) -> PushKvStub:
        if address not in self._stubs:
            self._stubs[address] = PushKvStub(open_channel(address, self.tls))
        return self._stubs[address]


class DirectSender(KvSender):
    """Streams the chunks to the decode worker the gateway chose; the Prefill stream ends when it has them all."""

    name = "direct"

    def __init__(self, layout: KvLayout, chunk_bytes: int, stub, handle: str, request_id: str,
                 timeout: float | None):
        super().__init__(layout, chunk_bytes)
        self.call = stub.PushKv(timeout=timeout, metadata=(("x-request-id", request_id), *telemetry.trace_metadata()))
        self.header = worker_pb2.KvPushHeader(handle=handle, request_id=request_id,
                                              kv_layout=layout_to_pb(layout, kv_included=True))
        self.sent_header = False

    async def _write(self, message: worker_pb2.PushKvRequest | bytes | None) -> None:
        try:
            await send(self.call, message)
        except CallEnded as ended:
            raise _push_failure(ended.code, ended.details) from ended

    async def send_layer(self, layer, keys, values) -> list:
        if not self.sent_header:
            await self._write(worker_pb2.PushKvRequest(header=self.header))
            self.sent_header = True
        for message in self.encode(layer, keys, values):
            await self._write(message)
        return []

    async def finish(self) -> list:
        await self._write(None)
        try:
            await self.call
        except grpc.aio.AioRpcError as error:
            raise _push_failure(error.code(), error.details()) from error
        return await super().finish()

    def abort(self) -> None:
        self.call.cancel()


def _push_failure(code: grpc.StatusCode, details: str) -> DisaggError:
    if code in DECODE_GONE:
        return DecodeWorkerFailed(f"pushing the KV cache to the decode worker: {code.name}: {details}")
    return UpstreamError(code, f"decode worker refused the pushed KV cache: {details}")


@dataclass
class _Segment:
    name: str
    memory: mmap.mmap


class SharedMemorySegments:
    """The prefill worker's /dev/shm segments: created per handoff, removed by the decode worker that reads them,
    or here after `ttl_seconds` (a handoff nobody took) and at shutdown."""

    def __init__(self, ttl_seconds: float = 120.0, directory: str = SHM_DIR):
        self.ttl, self.directory = ttl_seconds, directory
        self._created: dict[str, float] = {}

    def create(self, size: int) -> _Segment:
        self.sweep()
        name = f"disagg-kv-{uuid.uuid4().hex}"
        fd = os.open(os.path.join(self.directory, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            memory = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)  # pages up front, in bulk
        finally:
            os.close(fd)
        self._created[name] = time.monotonic()
        return _Segment(name, memory)

    def remove(self, name: str) -> None:
        self._created.pop(name, None)
        with contextlib.suppress(FileNotFoundError):  # the decode worker took it
            os.unlink(os.path.join(self.directory, name))

    def sweep(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for name in [n for n, created in self._created.items() if now - created > self.ttl]:
            self.remove(name)

    def remove_all(self) -> None:
        for name in list(self._created):
            self.remove(name)

    def remove_orphans(self) -> int:
        """At start: remove segments older than the TTL that a killed prefill worker (any, on this host) left."""
        removed, cutoff = 0, time.time() - self.ttl
        for entry in os.scandir(self.directory):
            if SHM_NAME.fullmatch(entry.name) and entry.stat().st_mtime < cutoff:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
        return removed


class SharedMemorySender(KvSender):
    """Writes each tensor's wire bytes at its place in one segment; the stream then names the segment."""

    name = "shared-memory"

    def __init__(self, layout: KvLayout, chunk_bytes: int, segments: SharedMemorySegments):
        super().__init__(layout, chunk_bytes)
        self.segments = segments
        self.segment = segments.create(layout.total_bytes)
        self.crcs = [0] * (2 * layout.num_layers)

    async def send_layer(self, layer, keys, values) -> list:
        with self.serialize.encoding() as encoded:
            for index, tensor in ((2 * layer, keys), (2 * layer + 1, values)):
                raw = wire_bytes(tensor, self.layout.wire)
                offset = index * self.layout.tensor_bytes
                self.segment.memory[offset:offset + len(raw)] = raw
                self.crcs[index] = crc32(raw)
                encoded.add(len(raw), 1)
        return []

    async def finish(self) -> list:
        self.segment.memory.close()
        message = worker_pb2.KvSharedMemory(name=self.segment.name, size=self.layout.total_bytes,
                                            tensor_crc32=self.crcs)
        return [*await super().finish(), worker_pb2.PrefillResponse(shared_memory=message)]

    def abort(self) -> None:
        if not self.segment.memory.closed:
            self.segment.memory.close()
        self.segments.remove(self.segment.name)


def adopt_shared_memory(message: worker_pb2.KvSharedMemory, assembler: KvAssembler,
                        directory: str = SHM_DIR) -> None:
    """Give the assembler the segment's tensors without copying them (checksums checked), and remove its name.

    The name comes from the network: only the project's own segment names are opened, and the size must match.
    The mapping is private (copy-on-write) and lives as long as the tensors viewing it.
    """
    layout = assembler.layout
    if not SHM_NAME.fullmatch(message.name):
        raise ProtocolError(f"shared-memory KV segment name {message.name!r} is not one of ours")
    if message.size != layout.total_bytes or len(message.tensor_crc32) != 2 * layout.num_layers:
        raise KvIntegrityError(f"shared-memory KV segment of {message.size} bytes, {len(message.tensor_crc32)} "
                               f"checksums does not match its layout ({layout.total_bytes} bytes)")
    path = os.path.join(directory, message.name)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise KvIntegrityError(f"shared-memory KV segment {message.name} does not exist on this host (are prefill "
                               "and decode co-located, sharing /dev/shm?)") from None
    try:
        os.unlink(path)  # the mapping outlives the name; nobody else needs it
        if os.fstat(fd).st_size != message.size:
            raise KvIntegrityError(f"shared-memory KV segment {message.name} is not {message.size} bytes")
        memory = mmap.mmap(fd, message.size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    data = torch.frombuffer(memory, dtype=torch.uint8)
    size = layout.tensor_bytes
    for index, crc in enumerate(message.tensor_crc32):
        assembler.adopt(index, data[index * size:(index + 1) * size], crc)


def make_sender(destination: worker_pb2.KvDestination, layout: KvLayout, chunk_bytes: int, request_id: str,
                clients: PushClients, segments: SharedMemorySegments, timeout: float | None) -> KvSender:
    if destination.transport == DIRECT:
        if not destination.decode_address or not destination.handle:
            raise ProtocolError("kv_destination: the direct transport needs decode_address and handle")
        return DirectSender(layout, chunk_bytes, clients.stub(destination.decode_address), destination.handle,
                            request_id, timeout)
    if destination.transport == SHARED_MEMORY:
        return SharedMemorySender(layout, chunk_bytes, segments)
    return RelayedSender(layout, chunk_bytes)


@dataclass
class _Pending:
    future: asyncio.Future
    created: float = field(default_factory=time.monotonic)
    layout: KvLayout | None = None


class KvInbox:
    """Caches pushed by prefill workers (direct transport), held until the Decode call naming their handle claims
    them. Push and claim may come in either order; what nobody claims within `ttl_seconds` is dropped, and a push
    for a Decode call that already ended is refused."""

    def __init__(self, fingerprint: str, ttl_seconds: float = 60.0, max_pending: int = 1024, max_bytes: int = 0):
        self.fingerprint, self.ttl, self.max_pending, self.max_bytes = fingerprint, ttl_seconds, max_pending, max_bytes
        self._pending: dict[str, _Pending] = {}
        self._abandoned: dict[str, float] = {}  # handles whose Decode call ended unclaimed, and when

    @property
    def bytes_held(self) -> int:
        """Bytes of caches being pushed or waiting for their claim (a failed push holds none)."""
        return sum(p.layout.total_bytes for p in self._pending.values()
                   if p.layout is not None and not (p.future.done() and p.future.exception() is not None))

    def _entry(self, handle: str) -> _Pending:
        """The pending handoff of `handle`, created by whichever of push and claim comes first."""
        now = time.monotonic()
        for stale in [h for h, p in self._pending.items() if p.layout is not None and now - p.created > self.ttl]:
            _fail(self._pending.pop(stale).future, KvIntegrityError(f"KV cache {stale} was never claimed"))
        for stale in [h for h, at in self._abandoned.items() if now - at > self.ttl]:
            del self._abandoned[stale]
        if handle in self._abandoned:
            raise ProtocolError(f"the Decode call of KV cache {handle} has ended; nobody will claim it")
        if handle not in self._pending:
            if len(self._pending) >= self.max_pending:
                raise Overloaded(f"{len(self._pending)} pushed KV caches waiting to be claimed; retry later")
            self._pending[handle] = _Pending(asyncio.get_running_loop().create_future())
        return self._pending[handle]

    async def receive(self, requests) -> int:
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
            if self.max_bytes and self.bytes_held + layout.total_bytes > self.max_bytes:
                raise Overloaded(f"pushed KV caches would hold {self.bytes_held + layout.total_bytes} bytes, over "
                                 f"this worker's KV budget of {self.max_bytes}")
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
        pending = self._pending.pop(handle, None)
        if pending is not None:
            _fail(pending.future, ProtocolError(f"the Decode call of KV cache {handle} has ended"))
        self._abandoned[handle] = time.monotonic()


def _fail(future: asyncio.Future, error: BaseException) -> None:
    """Settle with an error that a claim may or may not be waiting for (no "exception never retrieved")."""
    if not future.done():
        future.set_exception(error)
        future.exception()
