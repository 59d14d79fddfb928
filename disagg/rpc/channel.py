"""Client side of the project's gRPC: channels with its limits and TLS, and writes to client-streaming calls."""

from __future__ import annotations

import asyncio
import pathlib

import grpc
from google.protobuf.message import Message

from disagg.config import TlsOptions

# Deliberate limits: KV travels in ~1 MiB chunks, so no message needs more than a few MiB.
MAX_MESSAGE_BYTES = 8 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Start each stream with a 16 MiB flow-control window instead of growing one from 64 KiB: a KV handoff is
    # tens of MiB in ~1 MiB messages (see benchmarks/results/handoff.md).
    ("grpc.http2.lookahead_bytes", 16 << 20),
]


def read_file(path: str) -> bytes | None:
    return pathlib.Path(path).read_bytes() if path else None


def open_channel(address: str, tls: TlsOptions | None = None) -> grpc.aio.Channel:
    """A channel with the project's limits; TLS (and a client certificate, for mutual TLS) when configured."""
    if tls is None or not tls.enabled:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read_file(tls.tls_ca),
        private_key=read_file(tls.tls_key),
        certificate_chain=read_file(tls.tls_cert),
    )
    options: list[tuple[str, int | str]] = [*CHANNEL_OPTIONS]
    if tls.tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls.tls_server_name))
    return grpc.aio.secure_channel(address, credentials, options=options)


class CallEnded(Exception):
    """A write to a client-streaming call failed because the call had ended; carries the peer's status."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


async def send(
    call: grpc.aio.StreamUnaryCall | grpc.aio.StreamStreamCall, message: Message | bytes | None = None
) -> None:
    """Write one message (None: half-close) to a client-streaming call.

    A write that fails because the peer already ended the call raises CallEnded with the peer's own status (for
    example DATA_LOSS for a KV cache it refused), not the local write error. A write that gRPC's core could not
    send at all (the connection broke: a network partition, a dead peer's host) is UNAVAILABLE, as a read would
    report it, not the INTERNAL that grpc.aio stamps on the call (which made callers treat a lost peer as a bug).
    """
    try:
        await (call.done_writing() if message is None else call.write(message))
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:  # InvalidStateError: the call had ended
        code, details = await call.code(), await call.details()
        if code == grpc.StatusCode.OK:
            code, details = (
                (error.code(), error.details())
                if isinstance(error, grpc.aio.AioRpcError)
                else (grpc.StatusCode.UNAVAILABLE, "call ended before the message was sent")
            )
        if _unsent(error):
            code, details = grpc.StatusCode.UNAVAILABLE, f"connection to the peer lost while sending ({details})"
        raise CallEnded(code, details) from error


def _unsent(error: BaseException) -> bool:
    """grpc.aio's local status for a message its core failed to send: INTERNAL 'Internal error from Core' with a
    failed execute_batch, set on the call in place of a peer status that never arrived."""
    return (
        isinstance(error, grpc.aio.AioRpcError)
        and error.code() == grpc.StatusCode.INTERNAL
        and "execute_batch" in (error.debug_error_string() or "")
    )
