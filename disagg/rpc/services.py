"""Registration of the worker services with the project's own (de)serializers, and the stubs that use them.

KV chunk messages are framed by hand (disagg.kv.framing): the prefill worker's responses may be pre-serialized
bytes, the decode worker reads chunks as views of the received bytes, and the gateway relays them unparsed.
"""

from __future__ import annotations

import grpc

from disagg.kv.framing import handoff_deserializer, serialize
from disagg.pb.disagg.v1 import worker_pb2, worker_pb2_grpc


def _add_handlers(server: grpc.aio.Server, service: str, handlers: dict) -> None:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def add_prefill_service(servicer: worker_pb2_grpc.PrefillServiceServicer, server: grpc.aio.Server) -> None:
    """PrefillService as generated, except that its responses may be `chunk_message` bytes."""
    _add_handlers(
        server,
        "disagg.v1.PrefillService",
        {
            "Prefill": grpc.unary_stream_rpc_method_handler(
                servicer.Prefill,
                request_deserializer=worker_pb2.PrefillRequest.FromString,
                response_serializer=serialize,
            ),
            "WatchKvEvents": grpc.unary_stream_rpc_method_handler(
                servicer.WatchKvEvents,
                request_deserializer=worker_pb2.WatchKvEventsRequest.FromString,
                response_serializer=worker_pb2.WatchKvEventsResponse.SerializeToString,
            ),
        },
    )


def add_decode_service(servicer: worker_pb2_grpc.DecodeServiceServicer, server: grpc.aio.Server) -> None:
    """DecodeService as generated, except that KV chunks arrive as `Chunk`s (see `handoff_deserializer`)."""
    _add_handlers(
        server,
        "disagg.v1.DecodeService",
        {
            "Decode": grpc.stream_stream_rpc_method_handler(
                servicer.Decode,
                request_deserializer=handoff_deserializer(worker_pb2.DecodeRequest),
                response_serializer=worker_pb2.DecodeResponse.SerializeToString,
            ),
            "PushKv": grpc.stream_unary_rpc_method_handler(
                servicer.PushKv,
                request_deserializer=handoff_deserializer(worker_pb2.PushKvRequest),
                response_serializer=worker_pb2.PushKvResponse.SerializeToString,
            ),
        },
    )


class PushKvStub:
    """DecodeService/PushKv as the prefill worker calls it: requests may be `chunk_message` bytes."""

    def __init__(self, channel: grpc.aio.Channel):
        self.PushKv = channel.stream_unary(
            "/disagg.v1.DecodeService/PushKv",
            request_serializer=serialize,
            response_deserializer=worker_pb2.PushKvResponse.FromString,
        )


class RelayPrefillStub:
    """PrefillService as the gateway calls it: Prefill's responses stay serialized, to go on to decode byte for
    byte; WatchKvEvents as generated (the router's exact index)."""

    def __init__(self, channel: grpc.aio.Channel):
        self.Prefill = channel.unary_stream(
            "/disagg.v1.PrefillService/Prefill", request_serializer=worker_pb2.PrefillRequest.SerializeToString
        )
        self.WatchKvEvents = channel.unary_stream(
            "/disagg.v1.PrefillService/WatchKvEvents",
            request_serializer=worker_pb2.WatchKvEventsRequest.SerializeToString,
            response_deserializer=worker_pb2.WatchKvEventsResponse.FromString,
        )


class RelayDecodeStub:
    """DecodeService as the gateway calls it: requests are the prefill worker's serialized messages, relayed
    unchanged (PrefillResponse and DecodeRequest are wire-identical), so a KV chunk is never parsed into a new
    message and serialized again."""

    def __init__(self, channel: grpc.aio.Channel):
        self.Decode = channel.stream_stream(
            "/disagg.v1.DecodeService/Decode", response_deserializer=worker_pb2.DecodeResponse.FromString
        )
