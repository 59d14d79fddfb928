"""The KV transports' names (`--kv-transport`, disagg.config.KV_TRANSPORTS) as worker.proto's KvTransport values."""

from __future__ import annotations

from disagg.config import KV_TRANSPORTS
from disagg.pb.disagg.v1 import worker_pb2

RELAYED = worker_pb2.KV_TRANSPORT_RELAYED
DIRECT = worker_pb2.KV_TRANSPORT_DIRECT
SHARED_MEMORY = worker_pb2.KV_TRANSPORT_SHARED_MEMORY


def _enum_name(flag_name: str) -> str:
    return "KV_TRANSPORT_" + flag_name.upper().replace("-", "_")


# "relayed" -> KV_TRANSPORT_RELAYED, ...: a name the enum lacks fails here, at import; tests/test_config.py checks
# that every value but UNSPECIFIED (which means relayed on the wire) has a name.
TRANSPORT_VALUES: dict[str, worker_pb2.KvTransport] = {
    name: worker_pb2.KvTransport.Value(_enum_name(name)) for name in KV_TRANSPORTS
}
TRANSPORT_NAMES: dict[int, str] = {value: name for name, value in TRANSPORT_VALUES.items()}


def transport_name(value: int) -> str:
    """The flag name of a KvTransport value; unset (0) is the default, relayed."""
    return TRANSPORT_NAMES.get(value or RELAYED, "relayed")
