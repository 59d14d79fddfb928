"""KV chunk messages, encoded and read by hand in the protobuf wire format, and the handoff's message kinds.

PrefillResponse, DecodeRequest and PushKvRequest all carry KvChunk as field 2 of their `event` oneof, so one
serialized chunk message is all three (tests/test_kv_formats.py checks the field numbers and byte equality with
protobuf). Through upb a megabyte of KV is copied out of the tensor, into the message and again to serialize it;
on the decode side again to parse it and on each read of `data`. Here it is copied once into the message, and the
decode side reads a view of what gRPC received.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.message import Message

from disagg.kv.codec import Chunk
from disagg.pb.disagg.v1 import worker_pb2

KV_CHUNK_FIELD = 2
KV_CHUNK_TAG = bytes([KV_CHUNK_FIELD << 3 | 2])
_UINT32, _UINT64 = (1 << 32) - 1, (1 << 64) - 1
HANDOFF_MESSAGES = (worker_pb2.PrefillResponse, worker_pb2.DecodeRequest, worker_pb2.PushKvRequest)  # (tested)
# A handoff message as `handoff_deserializer` makes it: a Chunk, or the protobuf message of another event. Any, as
# the code tells them apart by `event_of` (the oneof's name), which no type checker follows.
HandoffMessage = Any


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 70:
        byte = raw[pos]  # IndexError past the end: malformed
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ValueError("varint too long")


def is_chunk_message(raw: bytes) -> bool:
    """Whether a serialized handoff message carries a KvChunk (its first byte is that field's tag)."""
    return raw[:1] == KV_CHUNK_TAG


def chunk_message(chunk: Chunk) -> bytes:
    """A serialized PrefillResponse / DecodeRequest / PushKvRequest carrying `chunk` (what upb would write)."""
    inner = b"".join(
        (
            b"\x08" + _varint(chunk.tensor_index) if chunk.tensor_index else b"",
            b"\x10" + _varint(chunk.offset) if chunk.offset else b"",
            b"\x1a" + _varint(len(chunk.data)) if len(chunk.data) else b"",
        )
    )
    crc = b"\x20" + _varint(chunk.crc32) if chunk.crc32 else b""
    size = len(inner) + len(chunk.data) + len(crc)
    return b"".join((KV_CHUNK_TAG, _varint(size), inner, chunk.data, crc))


def chunk_from_message(raw: bytes) -> Chunk | None:
    """The chunk of a serialized handoff message, its data a view of `raw` (no copy); None when `raw` is another
    event, or anything this reader does not expect (protobuf then parses it, or says what is wrong with it)."""
    if not is_chunk_message(raw):
        return None
    try:
        size, pos = _read_varint(raw, 1)
        if pos + size != len(raw):  # more fields after the chunk: leave it to protobuf
            return None
        fields, data = {1: 0, 2: 0, 4: 0}, memoryview(b"")
        while pos < len(raw):
            key, pos = _read_varint(raw, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 2 and number == 3:
                length, pos = _read_varint(raw, pos)
                if pos + length > len(raw):
                    return None
                data, pos = memoryview(raw)[pos : pos + length], pos + length
            elif wire_type == 0 and number in fields:
                fields[number], pos = _read_varint(raw, pos)
            else:
                return None
    except (IndexError, ValueError):
        return None
    return Chunk(tensor_index=fields[1] & _UINT32, offset=fields[2] & _UINT64, data=data, crc32=fields[4] & _UINT32)


def serialize(message: Message | bytes) -> bytes:
    """A response or request serializer that also passes `chunk_message` bytes through."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def handoff_deserializer(message_type: type[Message]) -> Callable[[bytes], HandoffMessage]:
    """DecodeRequest / PushKvRequest deserializer: a KV chunk becomes a `Chunk` over the received bytes, any other
    event its protobuf message."""

    def deserialize(raw: bytes) -> HandoffMessage:
        return chunk_from_message(raw) or message_type.FromString(raw)

    return deserialize


def event_of(message: HandoffMessage) -> str:
    """The oneof event of a handoff message as `handoff_deserializer` made it ("kv_chunk" for a Chunk)."""
    return "kv_chunk" if isinstance(message, Chunk) else message.WhichOneof("event")
