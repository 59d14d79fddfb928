"""Each process's configuration: a frozen dataclass built in one place from flags, with environment fallbacks.

Every flag `--some-name` also reads `DISAGG_SOME_NAME`; a flag given on the command line wins. Nothing is read at
import time.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar

from disagg.kv.codec import WIRE_DTYPE_CHOICES
from disagg.kv.transports import KV_TRANSPORTS
from disagg.model.dtypes import DTYPES
from disagg.model.lm_head import GREEDY_SCREENS
from disagg.model.native import MODEL_RUNNERS

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Options = TypeVar("Options", bound="DataclassInstance")
FlagValue = str | int | float | bool | tuple[str, ...]  # the types of the config fields that are flags


@dataclass(frozen=True)
class ModelOptions:
    model: str = "distilgpt2"
    load_format: str = "auto"
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = all cores


@dataclass(frozen=True)
class BatchPolicy:
    """The "size / wait window" of an experiment record, plus the prefill token budget."""

    max_batch_size: int = 64
    wait_window_ms: float = 0.0
    token_budget: int = 8192  # prefill, and aggregated decode: prompt tokens per forward pass
    max_queue: int = 256  # waiting requests before RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class TlsOptions:
    """TLS for a component: its own certificate (server side, and client side for mutual TLS) and the CA that
    peers' certificates must chain to. All empty: plaintext (loopback and trusted networks only)."""

    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_require_client_cert: bool = False
    tls_server_name: str = ""  # expected name in the workers' certificates, when it differs from the address

    @property
    def enabled(self) -> bool:
        return bool(self.tls_cert or self.tls_ca)


@dataclass(frozen=True)
class WorkerConfig:
    host: str = "127.0.0.1"
    port: int = 50061
    model: ModelOptions = ModelOptions()
    batch: BatchPolicy = BatchPolicy()
    kv_cache: bool = True
    kv_chunk_bytes: int = 1 << 20
    kv_wire_dtype: str = "auto"  # prefill only: KV format on the wire ("auto" = the model's dtype, lossless)
    kv_layerwise: bool = False  # prefill only: stream each layer's K/V while later layers compute
    kv_budget_mb: int = 0  # decode only: KV memory admitted at once (0 = unlimited)
    aggregated: bool = False  # decode only: also prefill (AggregatedService), one engine for both phases
    local_prefill: bool = False  # decode only: DecodeService and AggregatedService (conditional disaggregation)
    greedy_screen: str = "auto"  # greedy tokens from an exact bf16 screen of the vocabulary (model/lm_head.py)
    model_runner: str = "native"  # decode only: the project's forward pass over a paged KV pool, or "hf"
    # KV of computed prompt blocks kept for reuse (0 = off); a decode worker's (--aggregated, --local-prefill) also
    # keeps finished sequences' prompt + generated tokens
    prefix_cache_mb: int = 256
    prefix_block_tokens: int = 16  # tokens per prefix-cache block
    grace_seconds: float = 10.0
    tls: TlsOptions = TlsOptions()
    metrics_port: int = 0  # Prometheus /metrics over HTTP on --host; 0 = off


@dataclass(frozen=True)
class StreamInterval:
    """The gateway's stream interval (gateway.stream_interval): tokens of a sequence per message."""

    tokens: int = 1  # send once this many tokens of a sequence are held
    milliseconds: float = 0.0  # or once its oldest held token is this old (0 = tokens only)

    @property
    def enabled(self) -> bool:
        return self.tokens > 1 or self.milliseconds > 0


# Conditional disaggregation is off by default on every front door (`disagg up`, docker-compose, Kubernetes): each
# prompt goes to a prefill worker and its KV to a decode worker. This is the threshold to turn it on with
# (`--local-prefill-tokens 256`; `disagg bench --local-prefill` uses it): uncached prompt tokens a decode worker
# prefills itself. From the TTFT sweep in benchmarks/results/local_prefill_threshold_*; on a 2-core host it bought ~5%
# throughput at concurrency 32 (259 vs 247 tokens/s, vLLM's bench client).
LOCAL_PREFILL_TOKENS = 256
# The OpenAI-compatible HTTP API's port where `disagg up` and docker-compose serve it (vLLM's default too).
OPENAI_HTTP_PORT = 8000


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    prefill: tuple[str, ...] = ("127.0.0.1:50061",)
    decode: tuple[str, ...] = ("127.0.0.1:50071",)
    aggregated: tuple[str, ...] = ()  # aggregated workers: when set, requests go there (prefill, decode unused)
    default_max_new_tokens: int = 64
    max_prompt_chars: int = 200_000
    max_stop_strings: int = 16
    request_timeout_seconds: float = 600.0
    grace_seconds: float = 10.0
    max_inflight: int = 1024  # concurrent requests before RESOURCE_EXHAUSTED
    max_attempts: int = 3  # worker failures survived by one request (retry / migration)
    kv_transport: str = "relayed"  # how KV reaches decode: relayed (through here), direct, shared-memory
    health_interval_seconds: float = 1.0
    load_kv_weight: float = 4.0  # how many sequences a full KV budget weighs in the choice of worker
    # KV-aware routing (gateway.prefix_routing): a prompt goes to the prefill worker that served its prefix
    prefix_routing: bool = True
    prefix_routing_weight: float = 4.0  # sequences of load a fully uncached prompt weighs
    prefix_balance_abs: float = 8.0  # ignore the cache when max - min load > this ...
    prefix_balance_rel: float = 1.5  # ... and max load > this x min load
    prefix_routing_events: bool = True  # the exact index: subscribe to the prefill workers' cache events
    prefix_routing_tokenizer: str = ""  # its tokenizer (a model name or folder); "" = the model the workers report
    # Conditional disaggregation: offer a prompt to a decode worker (--local-prefill) first, to prefill there when at
    # most this many of its tokens are not in that worker's prefix cache (0 = always a prefill worker)
    local_prefill_tokens: int = 0
    # ... and at least this share of them is in that worker's cache (0: by uncached tokens alone, which on a host
    # whose workers share the cores is the faster choice: benchmarks/results/local_prefill_threshold_*, bench_c32/c64)
    local_prefill_min_cached: float = 0.0
    # ... and a prompt it declines goes back to it, handed over without the blocks it holds (disagg/kv/held_prefix.py)
    handoff_held_prefix: bool = True
    auth_token: str = ""
    tls: TlsOptions = TlsOptions()
    metrics_port: int = 0  # Prometheus /metrics over HTTP on --host; 0 = off
    # OpenAI-compatible HTTP front (gateway.openai_api) in the same process; 0 = off
    http_port: int = 0
    served_model_name: str = ""  # the `model` HTTP clients name; empty: any name, /v1/models lists the served one
    max_body_bytes: int = 1 << 20  # HTTP request bodies larger than this are refused (413)
    # Stream interval: one message per this many tokens of a sequence, or per this many ms (0 = tokens only)
    stream_interval_tokens: int = 1
    stream_interval_ms: float = 0.0

    @property
    def stream_interval(self) -> StreamInterval:
        return StreamInterval(self.stream_interval_tokens, self.stream_interval_ms)


def _env_default(flag: str, default: FlagValue) -> FlagValue:
    value = os.environ.get("DISAGG_" + flag.lstrip("-").upper().replace("-", "_"))
    if value is None:
        return default
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(default, tuple):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return type(default)(value)


def _flag(parser: argparse.ArgumentParser, name: str, default: FlagValue, help_text: str, **kwargs: Any) -> None:
    default = _env_default(name, default)
    if isinstance(default, bool):
        parser.add_argument(name, default=default, action=argparse.BooleanOptionalAction, help=help_text)
    elif isinstance(default, tuple):
        parser.add_argument(
            name,
            default=default,
            type=lambda s: tuple(v for v in s.split(",") if v),
            help=help_text + " (comma-separated)",
        )
    else:
        parser.add_argument(name, default=default, type=type(default), help=help_text, **kwargs)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    d = ModelOptions()
    _flag(parser, "--model", d.model, "HF model id, local folder, or 'smollm2-135m-instruct' (bundled, real weights)")
    _flag(
        parser,
        "--load-format",
        d.load_format,
        "'auto' loads weights; 'dummy' builds seeded random weights",
        choices=["auto", "dummy"],
    )
    _flag(parser, "--dtype", d.dtype, "model dtype", choices=list(DTYPES))
    _flag(parser, "--device", d.device, "torch device (cpu, cuda, cuda:1, ...)")
    _flag(parser, "--seed", d.seed, "seed of dummy weights")
    _flag(parser, "--threads", d.threads, "torch intra-op threads (0 = all cores)")


def add_batch_flags(parser: argparse.ArgumentParser, *, prefill: bool) -> None:
    d = BatchPolicy(max_batch_size=16 if prefill else 64)
    _flag(parser, "--max-batch-size", d.max_batch_size, "most sequences in one forward pass")
    _flag(parser, "--wait-window-ms", d.wait_window_ms, "how long an idle worker waits for more requests to batch")
    if prefill:
        _flag(parser, "--token-budget", d.token_budget, "most prompt tokens (padded) in one prefill forward pass")
    else:
        _flag(
            parser,
            "--token-budget",
            d.token_budget,
            "--aggregated: most prompt tokens (padded) prefilled in one step, before its decode step",
        )
    _flag(parser, "--max-queue", d.max_queue, "waiting requests before new ones are refused (RESOURCE_EXHAUSTED)")


def add_tls_flags(parser: argparse.ArgumentParser) -> None:
    d = TlsOptions()
    _flag(parser, "--tls-cert", d.tls_cert, "PEM certificate of this component (enables TLS on its port)")
    _flag(parser, "--tls-key", d.tls_key, "PEM private key of --tls-cert")
    _flag(parser, "--tls-ca", d.tls_ca, "PEM CA that peers' certificates must chain to")
    _flag(
        parser,
        "--tls-require-client-cert",
        d.tls_require_client_cert,
        "mutual TLS: refuse clients without a certificate signed by --tls-ca",
    )
    _flag(parser, "--tls-server-name", d.tls_server_name, "name the workers' certificates carry (gateway)")


def add_worker_flags(parser: argparse.ArgumentParser, *, prefill: bool) -> None:
    d = WorkerConfig(port=50061 if prefill else 50071)
    _flag(parser, "--host", d.host, "address to listen on")
    _flag(parser, "--port", d.port, "port to listen on (0 = any free port)")
    _flag(parser, "--metrics-port", d.metrics_port, "serve Prometheus metrics on this HTTP port (0 = off)")
    add_model_flags(parser)
    add_batch_flags(parser, prefill=prefill)
    _flag(parser, "--kv-cache", d.kv_cache, "hand over and use the KV cache (--no-kv-cache recomputes every step)")
    _flag(parser, "--kv-chunk-bytes", d.kv_chunk_bytes, "bytes of KV per streamed chunk")
    if prefill:
        _flag(
            parser,
            "--kv-wire-dtype",
            d.kv_wire_dtype,
            "KV cache format on the wire: 'auto' (the model's dtype, "
            "lossless) or lossy float16, bfloat16, int8 (per-channel scaled)",
            choices=WIRE_DTYPE_CHOICES,
        )
        _flag(
            parser,
            "--kv-layerwise",
            d.kv_layerwise,
            "stream each layer's KV as soon as the forward pass has "
            "computed it, overlapping the handoff with the later layers (worth it where the forward pass does not "
            "need the CPU cores the encoding uses: on an accelerator, or with idle cores)",
        )
    _flag(
        parser,
        "--prefix-cache-mb",
        d.prefix_cache_mb,
        "memory for the prefix cache: the KV of computed prompt blocks, reused by later prompts that start with the "
        "same tokens (LRU; 0 = off)"
        + (
            ""
            if prefill
            else "; decode workers have one with --aggregated or --local-prefill, and also keep there "
            "each finished sequence's prompt + generated tokens (a conversation's next turn); it is not part of "
            "--kv-budget-mb"
        ),
    )
    _flag(parser, "--prefix-block-tokens", d.prefix_block_tokens, "tokens per prefix-cache block")
    if not prefill:
        _flag(
            parser,
            "--local-prefill",
            d.local_prefill,
            "conditional disaggregation: serve AggregatedService next to DecodeService, so that the gateway "
            "(--local-prefill-tokens) can send a prompt with few uncached tokens here to be prefilled in the decode "
            "batch's engine instead of on a prefill worker",
        )
        _flag(
            parser,
            "--kv-budget-mb",
            d.kv_budget_mb,
            "KV cache memory this worker admits (prompt + max_new_tokens per sequence); 0 = unlimited",
        )
        _flag(
            parser,
            "--model-runner",
            d.model_runner,
            "the decode step's forward pass: 'native' runs GPT-2 and Llama models with the project's own (fused "
            "projections, RoPE tables, grouped-query attention read straight from a paged KV pool; other "
            "architectures keep HF's), 'hf' runs HF's modules over a left-padded KV slab",
            choices=list(MODEL_RUNNERS),
        )
        _flag(
            parser,
            "--aggregated",
            d.aggregated,
            "also serve AggregatedService: prefill requests here and decode them in the same continuous batch "
            "(the non-disaggregated baseline; the gateway's --aggregated sends requests to such workers)",
        )
    _flag(
        parser,
        "--greedy-screen",
        d.greedy_screen,
        "how greedy tokens are picked (each decode step's, and a prefill's first token): 'bf16' screens the "
        "vocabulary with a bfloat16 matmul and scores only the tokens within its proven error bound in float32 "
        "(the same token as float32 logits, at a fraction of the cost); 'auto' = bf16 where the CPU has "
        "AVX512-BF16 or AMX, float32 elsewhere (on a GPU, 'bf16' turns it on); 'off' = float32 logits for every "
        "row. Float32 models only",
        choices=list(GREEDY_SCREENS),
    )
    _flag(parser, "--grace-seconds", d.grace_seconds, "time to finish in-flight work on SIGTERM")
    add_tls_flags(parser)


def add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    d = GatewayConfig()
    _flag(parser, "--host", d.host, "address to listen on")
    _flag(parser, "--port", d.port, "port to listen on (0 = any free port)")
    _flag(parser, "--metrics-port", d.metrics_port, "serve Prometheus metrics on this HTTP port (0 = off)")
    _flag(parser, "--prefill", d.prefill, "prefill worker addresses")
    _flag(parser, "--decode", d.decode, "decode worker addresses")
    _flag(
        parser,
        "--aggregated",
        d.aggregated,
        "aggregated worker addresses (disagg decode --aggregated); when given, each request is prefilled and "
        "decoded on one of them and --prefill/--decode are not used",
    )
    _flag(parser, "--default-max-new-tokens", d.default_max_new_tokens, "max_new_tokens when a request gives 0")
    _flag(parser, "--max-prompt-chars", d.max_prompt_chars, "longest prompt accepted, in characters")
    _flag(parser, "--request-timeout-seconds", d.request_timeout_seconds, "server-side limit on one request")
    _flag(parser, "--grace-seconds", d.grace_seconds, "time to finish in-flight streams on SIGTERM")
    _flag(parser, "--max-inflight", d.max_inflight, "concurrent requests before RESOURCE_EXHAUSTED")
    _flag(parser, "--max-attempts", d.max_attempts, "worker failures one request survives (retry, migration)")
    _flag(
        parser,
        "--kv-transport",
        d.kv_transport,
        "how the KV cache reaches the decode worker: 'relayed' "
        "through the gateway, 'direct' (prefill pushes it to the decode worker the gateway chose), or "
        "'shared-memory' (co-located workers sharing /dev/shm)",
        choices=KV_TRANSPORTS,
    )
    _flag(
        parser,
        "--health-interval-seconds",
        d.health_interval_seconds,
        "how often worker health and load are checked (a load reading counts for two intervals)",
    )
    _flag(
        parser,
        "--load-kv-weight",
        d.load_kv_weight,
        "in the choice of worker, how many sequences a worker's full KV budget weighs (score = active + queued + "
        "started since its load report + this x kv_bytes / kv_budget_bytes)",
    )
    _flag(
        parser,
        "--prefix-routing",
        d.prefix_routing,
        "KV-aware routing: send a prompt to the prefill worker that holds its prefix (by the workers' cache events, "
        "or an index of this gateway's own decisions; only matters with more than one prefill worker)",
    )
    _flag(
        parser,
        "--prefix-routing-weight",
        d.prefix_routing_weight,
        "KV-aware routing cost = this x uncached share of the prompt + the worker's load score (sequences)",
    )
    _flag(
        parser,
        "--prefix-balance-abs",
        d.prefix_balance_abs,
        "KV-aware routing falls back to least-loaded when max - min load exceeds this and --prefix-balance-rel",
    )
    _flag(parser, "--prefix-balance-rel", d.prefix_balance_rel, "... and max load exceeds this x min load")
    _flag(
        parser,
        "--prefix-routing-events",
        d.prefix_routing_events,
        "KV-aware routing by the exact index: subscribe to each prefill worker's cache events (WatchKvEvents) and "
        "tokenize prompts here to look their blocks up; workers that do not report use the approximate index",
    )
    _flag(
        parser,
        "--prefix-routing-tokenizer",
        d.prefix_routing_tokenizer,
        "the tokenizer the exact index tokenizes with: a model name or folder as --model takes it (empty: the "
        "model the prefill workers report)",
    )
    _flag(
        parser,
        "--local-prefill-tokens",
        d.local_prefill_tokens,
        "conditional disaggregation: offer each prompt to a decode worker first (they must run --local-prefill), "
        "which prefills it in its own engine when at most this many of its tokens are missing from its prefix "
        "cache (a short prompt, or a conversation's next turn on the worker that decoded the last one) and "
        "declines otherwise; 0 = every prompt goes to a prefill worker",
    )
    _flag(
        parser,
        "--local-prefill-min-cached",
        d.local_prefill_min_cached,
        "with --local-prefill-tokens: a decode worker prefills a prompt only if it holds at least this share of "
        "its tokens (e.g. 0.5: a conversation's next turn, not a cold prompt, whose first token comes sooner from "
        "an idle prefill worker than from inside a busy decode loop; benchmarks/results/local_prefill_threshold_*); "
        "0 = by uncached tokens alone",
    )
    _flag(
        parser,
        "--handoff-held-prefix",
        d.handoff_held_prefix,
        "with --local-prefill-tokens: a prompt a decode worker declined, whose first blocks it holds, is handed to "
        "that worker with only the KV after them (the prefill worker sends the rest; the worker checks the blocks' "
        "keys, and a block evicted meanwhile means the handoff is made again, whole)",
    )
    _flag(parser, "--auth-token", d.auth_token, "require 'authorization: Bearer TOKEN' on Generate")
    _flag(parser, "--http-port", d.http_port, "serve the OpenAI-compatible HTTP API on this port (0 = off)")
    _flag(parser, "--served-model-name", d.served_model_name, "model name of the HTTP API (empty: accept any)")
    _flag(parser, "--max-body-bytes", d.max_body_bytes, "largest HTTP request body accepted")
    _flag(
        parser,
        "--stream-interval-tokens",
        d.stream_interval_tokens,
        "send a sequence's tokens in one message per this many (both fronts; the first token goes at once)",
    )
    _flag(parser, "--stream-interval-ms", d.stream_interval_ms, "or once the oldest held token is this old (0 = off)")
    add_tls_flags(parser)


def _pick(cls: type[Options], args: argparse.Namespace, **overrides: object) -> Options:
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


def model_options(args: argparse.Namespace) -> ModelOptions:
    return _pick(ModelOptions, args)


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    return _pick(
        WorkerConfig, args, model=model_options(args), batch=_pick(BatchPolicy, args), tls=_pick(TlsOptions, args)
    )


def gateway_config(args: argparse.Namespace) -> GatewayConfig:
    return _pick(GatewayConfig, args, tls=_pick(TlsOptions, args))
