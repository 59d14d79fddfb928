"""Domain errors, each mapped to one gRPC status by the error interceptor (disagg/serving.py)."""

from __future__ import annotations

import grpc


class DisaggError(Exception):
    """Base class: an error a client should see with a specific status code and this message."""

    code = grpc.StatusCode.INTERNAL


class InvalidRequest(DisaggError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Overloaded(DisaggError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NoWorkerAvailable(DisaggError):
    code = grpc.StatusCode.UNAVAILABLE


class KvIntegrityError(DisaggError):
    """A KV handoff that cannot be trusted (checksum, layout or model mismatch): never decoded into tokens."""

    code = grpc.StatusCode.DATA_LOSS


class ProtocolError(DisaggError):
    """A peer sent messages out of the expected order."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class UpstreamError(DisaggError):
    """A worker call failed; carries the worker's status so the client sees the real cause."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class DeadlineExceeded(DisaggError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
