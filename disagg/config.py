"""Each process's configuration: frozen dataclasses whose fields declare every option once, and the flags built
from them.

A field made with `option()` carries its default, help, choices and the commands that take it; its type is its
annotation. `add_flags` turns a dataclass's fields into a command's flags: `--some-name` for field `some_name`, with
an environment fallback `DISAGG_SOME_NAME` (a flag given on the command line wins), booleans as `--x/--no-x`, tuples
comma-separated. docs/configuration.md is generated from the same parsers (scripts/gen_config_docs.py), so a flag's
help and its documentation cannot differ. Nothing is read at import time, and nothing here imports torch: choices
are names, which the heavy modules map to their objects (disagg.model.dtypes, disagg.kv.transports).
"""

from __future__ import annotations

import argparse
import os
import typing
from collections.abc import Collection, Mapping
from dataclasses import Field, dataclass, field, fields, is_dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Options = TypeVar("Options", bound="DataclassInstance")
FlagValue = str | int | float | bool | tuple[str, ...]  # the types of the config fields that are flags
Value = TypeVar("Value", bound=FlagValue)
# The commands that take config options: the three processes, and the tools that start or talk to them.
Role = Literal["prefill", "decode", "gateway", "up", "bench", "generate", "inspect"]
SERVERS: tuple[Role, ...] = ("prefill", "decode", "gateway")

# Choices, by name only (so that these definitions import no torch): disagg.model.dtypes maps MODEL_DTYPES to torch
# dtypes, disagg.kv.codec encodes KV_WIRE_FORMATS, disagg.kv.transports maps KV_TRANSPORTS to worker.proto's
# KvTransport values, disagg.model.lm_head and disagg.model.native implement the screens and the runners.
MODEL_DTYPES = ("float32", "float16", "bfloat16")
LOAD_FORMATS = ("auto", "dummy")  # weights from the model's files, or seeded random ones of the same shapes
KV_WIRE_FORMATS = (*MODEL_DTYPES, "int8")  # a KvLayout's wire_dtype: a model dtype, or int8 with per-channel scales
KV_WIRE_DTYPES = ("auto", *KV_WIRE_FORMATS)  # --kv-wire-dtype: "auto" = the model's own dtype (lossless)
KV_TRANSPORTS = ("relayed", "direct", "shared-memory")
GREEDY_SCREENS = ("auto", "bf16", "off")
MODEL_RUNNERS = ("native", "hf")  # a decode engine's choice: the project's forward pass where it applies, or HF's

# Conditional disaggregation is off by default on every front door (`disagg up`, docker-compose, Kubernetes): each
# prompt goes to a prefill worker and its KV to a decode worker. This is the threshold to turn it on with
# (`--local-prefill-tokens 256`; `disagg bench --local-prefill on` uses it), chosen by the TTFT sweep recorded in
# benchmarks/results/local_prefill_threshold_* (indexed in benchmarks/results/README.md).
LOCAL_PREFILL_TOKENS = 256
# The OpenAI-compatible HTTP API's port where `disagg up` and docker-compose serve it (vLLM's default too).
OPENAI_HTTP_PORT = 8000


@dataclass(frozen=True, eq=False)
class OptionSpec:
    """What a flag needs beyond a field's name, type and default."""

    help: str
    choices: tuple[str, ...] | None
    roles: tuple[Role, ...] | None  # the commands that take it; None: every command that adds its dataclass
    role_defaults: Mapping[Role, FlagValue]  # where a command's default is not the field's

    def default(self, spec_field: Field[Any], role: Role) -> FlagValue:
        return self.role_defaults.get(role, typing.cast(FlagValue, spec_field.default))


def option(
    default: Value,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    roles: tuple[Role, ...] | None = None,
    role_defaults: Mapping[Role, FlagValue] | None = None,
) -> Value:
    """A config field that is also a flag: the one place its default, help, choices and commands are written."""
    spec = OptionSpec(help, choices, roles, MappingProxyType(dict(role_defaults or {})))
    return field(default=default, metadata={"option": spec})


@dataclass(frozen=True)
class ModelOptions:
    model: str = option("distilgpt2", "HF model id, local folder, or 'smollm2-135m-instruct' (bundled, real weights)")
    load_format: str = option(
        "auto",
        "'auto' loads weights; 'dummy' builds seeded random weights",
        choices=LOAD_FORMATS,
        role_defaults={"bench": "dummy"},  # a load test measures the serving, not the weights
    )
    dtype: str = option("float32", "model dtype", choices=MODEL_DTYPES)
    device: str = option("cpu", "torch device (cpu, cuda, cuda:1, ...)")
    seed: int = option(0, "seed of dummy weights")
    threads: int = option(
        0, "torch intra-op threads (0 = all cores; `disagg up` and `disagg bench` split them among a role's workers)"
    )


@dataclass(frozen=True)
class BatchPolicy:
    """The "size / wait window" of an experiment record, plus the prefill token budget."""

    max_batch_size: int = option(64, "most sequences in one forward pass", role_defaults={"prefill": 16})
    wait_window_ms: float = option(0.0, "how long an idle worker waits for more requests to batch")
    token_budget: int = option(
        8192,
        "most prompt tokens (padded) in one prefill forward pass; a decode worker with --aggregated or "
        "--local-prefill prefills at most this many in one step, before its decode step",
    )
    max_queue: int = option(256, "waiting requests before new ones are refused (RESOURCE_EXHAUSTED)")


@dataclass(frozen=True)
class TlsOptions:
    """TLS for a component: its own certificate (server side, and client side for mutual TLS) and the CA that
    peers' certificates must chain to. All empty: plaintext (loopback and trusted networks only)."""

    tls_cert: str = option(
        "",
        "PEM certificate of this component: served on its port (enables TLS there) and shown to the servers it "
        "calls (mutual TLS)",
    )
    tls_key: str = option("", "PEM private key of --tls-cert")
    tls_ca: str = option("", "PEM CA that peers' certificates must chain to (given alone: calls use TLS)")
    tls_require_client_cert: bool = option(
        False, "mutual TLS: refuse clients without a certificate signed by --tls-ca", roles=SERVERS
    )
    tls_server_name: str = option(
        "", "the name the certificates of the servers this component calls carry, when it is not their address"
    )

    @property
    def enabled(self) -> bool:
        return bool(self.tls_cert or self.tls_ca)


@dataclass(frozen=True)
class ServerOptions:
    """What every serving process has: where it listens, its metrics, its drain on SIGTERM, its TLS."""

    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(
        50051,
        "port to listen on (0 = any free port; `disagg up`: the gateway's)",
        role_defaults={"prefill": 50061, "decode": 50071},
    )
    metrics_port: int = option(0, "serve Prometheus metrics on this HTTP port, on --host (0 = off)")
    grace_seconds: float = option(10.0, "time to finish in-flight requests on SIGTERM")
    tls: TlsOptions = TlsOptions()


@dataclass(frozen=True)
class WorkerConfig(ServerOptions):
    """A prefill or decode worker (`disagg prefill`, `disagg decode`)."""

    model: ModelOptions = ModelOptions()
    batch: BatchPolicy = BatchPolicy()
    kv_cache: bool = option(True, "hand over and use the KV cache (--no-kv-cache recomputes every step)")
    kv_chunk_bytes: int = option(1 << 20, "bytes of KV per streamed chunk")
    kv_wire_dtype: str = option(
        "auto",
        "KV cache format on the wire: 'auto' (the model's dtype, lossless) or lossy float16, bfloat16, int8 "
        "(per-channel scaled)",
        choices=KV_WIRE_DTYPES,
        roles=("prefill",),
    )
    kv_layerwise: bool = option(
        False,
        "stream each layer's KV as soon as the forward pass has computed it, overlapping the handoff with the later "
        "layers (worth it where the forward pass does not need the CPU cores the encoding uses: on an accelerator, "
        "or with idle cores)",
        roles=("prefill",),
    )
    kv_budget_mb: int = option(
        0,
        "KV cache memory this worker admits (prompt + max_new_tokens per sequence); 0 = unlimited",
        roles=("decode",),
    )
    aggregated: bool = option(
        False,
        "also serve AggregatedService: prefill requests here and decode them in the same continuous batch (the "
        "non-disaggregated baseline; the gateway's --aggregated sends requests to such workers)",
        roles=("decode",),
    )
    local_prefill: bool = option(
        False,
        "conditional disaggregation: serve AggregatedService next to DecodeService, so that the gateway "
        "(--local-prefill-tokens) can send a prompt with few uncached tokens here to be prefilled in the decode "
        "batch's engine instead of on a prefill worker",
        roles=("decode",),
    )
    greedy_screen: str = option(
        "auto",
        "how greedy tokens are picked (each decode step's, and a prefill's first token): 'bf16' screens the "
        "vocabulary with a bfloat16 matmul and scores only the tokens within its proven error bound in float32 "
        "(the same token as float32 logits, at a fraction of the cost); 'auto' = bf16 where the CPU has "
        "AVX512-BF16 or AMX, float32 elsewhere (on a GPU, 'bf16' turns it on); 'off' = float32 logits for every "
        "row. Float32 models only",
        choices=GREEDY_SCREENS,
    )
    model_runner: str = option(
        "native",
        "the forward pass: 'native' runs GPT-2 and Llama models with the project's own (matmuls with prepacked "
        "weights, fused projections, RoPE tables; a prefill is one unpadded pass, a decode step reads "
        "grouped-query attention straight from a paged KV pool; other architectures keep HF's), 'hf' runs HF's "
        "modules (a left-padded prefill, a decode step over a left-padded KV slab)",
        choices=MODEL_RUNNERS,
        roles=("prefill", "decode"),
    )
    prefix_cache_mb: int = option(
        256,
        "memory for the prefix cache: the KV of computed prompt blocks, reused by later prompts that start with "
        "the same tokens (LRU; 0 = off); decode workers have one with --aggregated or --local-prefill, and also "
        "keep there each finished sequence's prompt + generated tokens (a conversation's next turn); it is not "
        "part of --kv-budget-mb",
    )
    prefix_block_tokens: int = option(16, "tokens per prefix-cache block")


@dataclass(frozen=True)
class StreamInterval:
    """The gateway's stream interval (gateway.stream_interval): tokens of a sequence per message."""

    tokens: int = 1  # send once this many tokens of a sequence are held
    milliseconds: float = 0.0  # or once its oldest held token is this old (0 = tokens only)

    @property
    def enabled(self) -> bool:
        return self.tokens > 1 or self.milliseconds > 0


@dataclass(frozen=True)
class GatewayConfig(ServerOptions):
    """The gateway (`disagg gateway`); `disagg up`, `disagg bench` and `disagg generate` take a few of its options."""

    prefill: tuple[str, ...] = option(("127.0.0.1:50061",), "prefill worker addresses")
    decode: tuple[str, ...] = option(("127.0.0.1:50071",), "decode worker addresses")
    aggregated: tuple[str, ...] = option(
        (),
        "aggregated worker addresses (disagg decode --aggregated); when given, each request is prefilled and "
        "decoded on one of them and --prefill/--decode are not used",
    )
    default_max_new_tokens: int = option(64, "max_new_tokens when a request gives 0")
    max_prompt_chars: int = option(200_000, "longest prompt accepted, in characters")
    max_stop_strings: int = option(16, "most stop strings one request may give")
    request_timeout_seconds: float = option(600.0, "server-side limit on one request")
    max_inflight: int = option(1024, "concurrent requests before RESOURCE_EXHAUSTED")
    admission_queue: int = option(
        0,
        "requests that may wait for one of the --max-inflight places, served in priority order (lower first, FIFO "
        "among equals) as places free; 0: a request that finds no place is refused at once",
    )
    max_attempts: int = option(3, "worker failures one request survives (retry, migration)")
    kv_transport: str = option(
        "relayed",
        "how the KV cache reaches the decode worker: 'relayed' through the gateway, 'direct' (prefill pushes it to "
        "the decode worker the gateway chose), or 'shared-memory' (co-located workers sharing /dev/shm; the default "
        "of `disagg up` and `disagg bench`, whose processes share one host: one copy in, one out, where relayed "
        "costs the gateway CPU)",
        choices=KV_TRANSPORTS,
        role_defaults={"up": "shared-memory", "bench": "shared-memory"},
    )
    health_interval_seconds: float = option(
        1.0, "how often worker health and load are checked (a load reading counts for two intervals)"
    )
    load_kv_weight: float = option(
        4.0,
        "in the choice of worker, how many sequences a worker's full KV budget weighs (score = active + queued + "
        "started since its load report + this x kv_bytes / kv_budget_bytes)",
    )
    prefix_routing: bool = option(
        True,
        "KV-aware routing: send a prompt to the prefill worker that holds its prefix (by the workers' cache events, "
        "or an index of this gateway's own decisions; only matters with more than one prefill worker)",
    )
    prefix_routing_weight: float = option(
        4.0, "KV-aware routing cost = this x uncached share of the prompt + the worker's load score (sequences)"
    )
    prefix_balance_abs: float = option(
        8.0, "KV-aware routing falls back to least-loaded when max - min load exceeds this and --prefix-balance-rel"
    )
    prefix_balance_rel: float = option(1.5, "... and max load exceeds this x min load")
    prefix_routing_events: bool = option(
        True,
        "KV-aware routing by the exact index: subscribe to each prefill worker's cache events (WatchKvEvents) and "
        "tokenize prompts here to look their blocks up; workers that do not report use the approximate index",
    )
    prefix_routing_tokenizer: str = option(
        "",
        "the tokenizer the exact index tokenizes with: a model name or folder as --model takes it (empty: the "
        "model the prefill workers report)",
    )
    local_prefill_tokens: int = option(
        0,
        "conditional disaggregation: offer each prompt to a decode worker first (they must run --local-prefill), "
        "which prefills it in its own engine when at most this many of its tokens are missing from its prefix "
        "cache (a short prompt, or a conversation's next turn on the worker that decoded the last one) and "
        "declines otherwise; 0 = every prompt goes to a prefill worker. `disagg up` gives its decode workers "
        "--local-prefill when this is above 0; `disagg bench` uses it for its --local-prefill runs. "
        f"{LOCAL_PREFILL_TOKENS} is the measured choice: benchmarks/results/local_prefill_threshold_*",
        role_defaults={"bench": LOCAL_PREFILL_TOKENS},
    )
    local_prefill_min_cached: float = option(
        0.0,
        "with --local-prefill-tokens: a decode worker prefills a prompt only if it holds at least this share of "
        "its tokens (e.g. 0.5: a conversation's next turn, not a cold prompt, whose first token comes sooner from "
        "an idle prefill worker than from inside a busy decode loop); 0 = by uncached tokens alone, the faster "
        "choice where the workers share the cores (benchmarks/results/local_prefill_threshold_*, bench_c32, "
        "bench_c64)",
    )
    handoff_held_prefix: bool = option(
        True,
        "with --local-prefill-tokens: a prompt a decode worker declined, whose first blocks it holds, is handed to "
        "that worker with only the KV after them (the prefill worker sends the rest; the worker checks the blocks' "
        "keys, and a block evicted meanwhile means the handoff is made again, whole)",
    )
    auth_token: str = option(
        "", "bearer token: the gateway requires 'authorization: Bearer TOKEN' on both fronts, a client sends it"
    )
    http_port: int = option(
        0,
        "serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions) on this port (0 = off)",
        role_defaults={"up": OPENAI_HTTP_PORT},
    )
    served_model_name: str = option("", "model name of the HTTP API (empty: accept any)")
    max_body_bytes: int = option(1 << 20, "largest HTTP request body accepted")
    stream_interval_tokens: int = option(
        1, "send a sequence's tokens in one message per this many (both fronts; the first token goes at once)"
    )
    stream_interval_ms: float = option(0.0, "or once the oldest held token is this old (0 = off)")

    @property
    def stream_interval(self) -> StreamInterval:
        return StreamInterval(self.stream_interval_tokens, self.stream_interval_ms)


def env_var(name: str) -> str:
    """The environment variable of option `name` (a field name or a flag): DISAGG_SOME_NAME."""
    return "DISAGG_" + name.lstrip("-").upper().replace("-", "_")


def comma_separated(text: str) -> tuple[str, ...]:
    """A tuple option's value, from a flag or the environment: 'a:1,b:2' -> ('a:1', 'b:2')."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


def option_fields(cls: type[DataclassInstance]) -> list[tuple[Field[Any], type, OptionSpec]]:
    """Every option of `cls`, those of its nested option dataclasses in place: (field, type, spec)."""
    hints = typing.get_type_hints(cls)
    found: list[tuple[Field[Any], type, OptionSpec]] = []
    for f in fields(cls):
        kind = hints[f.name]
        if is_dataclass(kind):
            found += option_fields(typing.cast("type[DataclassInstance]", kind))
        else:
            found.append((f, typing.get_origin(kind) or kind, f.metadata["option"]))
    return found


def option_default(cls: type[DataclassInstance], name: str, role: Role) -> FlagValue:
    """The default `role`'s flag for option `name` of `cls` has (the environment aside)."""
    for f, _, spec in option_fields(cls):
        if f.name == name:
            return spec.default(f, role)
    raise KeyError(f"{cls.__name__} has no option {name!r}")


def role_defaults(cls: type[Options], role: Role) -> Options:
    """`cls` as `role` has it when no flag or variable is given (a prefill worker's BatchPolicy batches 16)."""
    parser = argparse.ArgumentParser()
    add_flags(parser, cls, role=role, environ={})
    return from_args(cls, parser.parse_args([]))


def _from_env(name: str, kind: type, default: FlagValue, environ: Mapping[str, str]) -> FlagValue:
    value = environ.get(env_var(name))
    if value is None:
        return default
    if kind is bool:
        return value.lower() in ("1", "true", "yes", "on")
    if kind is tuple:
        return comma_separated(value)
    return typing.cast(FlagValue, kind(value))


def add_flags(
    parser: argparse._ActionsContainer,
    cls: type[DataclassInstance],
    *,
    role: Role,
    only: Collection[str] = (),
    exclude: Collection[str] = (),
    environ: Mapping[str, str] = os.environ,
) -> None:
    """Add the flags of `cls`'s options that `role` takes (all of them, or `only` these, less `exclude`), each with
    the default `role` has for it, or the one its environment variable gives."""
    options = option_fields(cls)
    unknown = sorted({*only, *exclude} - {f.name for f, _, _ in options})
    if unknown:
        raise ValueError(f"{cls.__name__} has no options {unknown}")
    for f, kind, spec in options:
        if (only and f.name not in only) or f.name in exclude or (spec.roles is not None and role not in spec.roles):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = _from_env(f.name, kind, spec.default(f, role), environ)
        if kind is bool:
            action = parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=spec.help)
        elif kind is tuple:
            action = parser.add_argument(
                flag, default=default, type=comma_separated, help=spec.help + " (comma-separated)"
            )
        else:
            action = parser.add_argument(flag, default=default, type=kind, choices=spec.choices, help=spec.help)
        setattr(action, _ENV_ATTRIBUTE, env_var(f.name))


_ENV_ATTRIBUTE = "disagg_env_var"


def flag_env_var(action: argparse.Action) -> str | None:
    """The environment variable of a flag `add_flags` made; None for any other flag."""
    return getattr(action, _ENV_ATTRIBUTE, None)


def from_args(cls: type[Options], args: argparse.Namespace, **overrides: object) -> Options:
    """`cls` from parsed flags: each option from its flag where the command has one, else its field's default;
    nested option dataclasses likewise."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in fields(cls):
        kind = hints[f.name]
        if is_dataclass(kind):
            values[f.name] = from_args(typing.cast("type[DataclassInstance]", kind), args)
        elif hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return cls(**{**values, **overrides})


def model_options(args: argparse.Namespace) -> ModelOptions:
    return from_args(ModelOptions, args)


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    return from_args(WorkerConfig, args)


def gateway_config(args: argparse.Namespace) -> GatewayConfig:
    return from_args(GatewayConfig, args)
