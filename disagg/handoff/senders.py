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
import time

import grpc
import torch

from disagg import telemetry
from disagg.config import TlsOptions
from disagg.errors import DisaggError, ProtocolError, UpstreamError
from disagg.handoff.shared_memory import SharedMemorySegments
from disagg.kv.codec import KvLayout, crc32, encode_tensor, wire_bytes
from disagg.kv.framing import chunk_message
from disagg.kv.transports import DIRECT, SHARED_MEMORY
from disagg.pb.disagg.v1 import worker_pb2
from disagg.rpc.channel import CallEnded, open_channel, send
from disagg.rpc.convert import layout_to_pb
from disagg.rpc.services import PushKvStub

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
            chunks = [
                chunk
                for index, tensor in ((2 * layer, keys), (2 * layer + 1, values))
                for chunk in encode_tensor(index, tensor, self.chunk_bytes, self.layout.wire_dtype or None)
            ]
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
    async def send_layer(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> list:
        return self.encode(layer, keys, values)


class PushClients:
    """The prefill worker's channels to decode workers for direct pushes, one per address, opened on first use."""

    def __init__(self, tls: TlsOptions | None = None):
        self.tls = tls
        self._stubs: dict[str, PushKvStub] = {}

    def stub(self, address: str) -> PushKvStub:
        if address not in self._stubs:
            self._stubs[address] = PushKvStub(open_channel(address, self.tls))
        return self._stubs[address]


class DirectSender(KvSender):
    """Streams the chunks to the decode worker the gateway chose; the Prefill stream ends when it has them all."""

    name = "direct"

    def __init__(
        self, layout: KvLayout, chunk_bytes: int, stub: PushKvStub, handle: str, request_id: str, timeout: float | None
    ):
        super().__init__(layout, chunk_bytes)
        self.call = stub.PushKv(timeout=timeout, metadata=telemetry.call_metadata(request_id))
        self.header = worker_pb2.KvPushHeader(
            handle=handle, request_id=request_id, kv_layout=layout_to_pb(layout, kv_included=True)
        )
        self.sent_header = False

    async def _write(self, message: worker_pb2.PushKvRequest | bytes | None) -> None:
        try:
            await send(self.call, message)
        except CallEnded as ended:
            raise _push_failure(ended.code, ended.details) from ended

    async def send_layer(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> list:
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


class SharedMemorySender(KvSender):
    """Writes each tensor's wire bytes at its place in one segment; the stream then names the segment."""

    name = "shared-memory"

    def __init__(
        self, layout: KvLayout, chunk_bytes: int, segments: SharedMemorySegments, deadline_seconds: float | None = None
    ):
        """`deadline_seconds`: the request's time left; a segment nobody took by then is removed (the decode worker
        unlinks the one it takes, so this only ever removes a segment whose message was lost, e.g. a partition)."""
        super().__init__(layout, chunk_bytes)
        self.segments = segments
        # Counted from now (arrival), not from finish: a prefill queued or computed for seconds must not stretch it.
        self.expires_at = time.monotonic() + (deadline_seconds or segments.ttl)
        self.segment = segments.create(layout.total_bytes)
        self.crcs = [0] * (2 * layout.num_layers)

    async def send_layer(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> list:
        with self.serialize.encoding() as encoded:
            for index, tensor in ((2 * layer, keys), (2 * layer + 1, values)):
                raw = wire_bytes(tensor, self.layout.wire)
                offset = index * self.layout.tensor_bytes
                self.segment.memory[offset : offset + len(raw)] = raw
                self.crcs[index] = crc32(raw)
                encoded.add(len(raw), 1)
        return []

    async def finish(self) -> list:
        self.segment.memory.close()
        asyncio.get_running_loop().call_later(
            max(0.0, self.expires_at - time.monotonic()), self.segments.remove, self.segment.name
        )
        message = worker_pb2.KvSharedMemory(
            name=self.segment.name, size=self.layout.total_bytes, tensor_crc32=self.crcs
        )
        return [*await super().finish(), worker_pb2.PrefillResponse(shared_memory=message)]

    def abort(self) -> None:
        if not self.segment.memory.closed:
            self.segment.memory.close()
        self.segments.remove(self.segment.name)


def make_sender(
    destination: worker_pb2.KvDestination,
    layout: KvLayout,
    chunk_bytes: int,
    request_id: str,
    clients: PushClients,
    segments: SharedMemorySegments,
    timeout: float | None,
) -> KvSender:
    if destination.transport == DIRECT:
        if not destination.decode_address or not destination.handle:
            raise ProtocolError("kv_destination: the direct transport needs decode_address and handle")
        return DirectSender(
            layout, chunk_bytes, clients.stub(destination.decode_address), destination.handle, request_id, timeout
        )
    if destination.transport == SHARED_MEMORY:
        return SharedMemorySender(layout, chunk_bytes, segments, timeout)
    return RelayedSender(layout, chunk_bytes)
