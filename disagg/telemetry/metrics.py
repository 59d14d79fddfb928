"""Prometheus metrics, one class per component (gen_ai.server.* names where the GenAI conventions have one).

`install(component)` makes the process's metrics once; code that records asks for the class it needs with
`current(DecodeMetrics)` and gets None in a process of another component (or before setup), so recording is a
no-op there.
"""

from __future__ import annotations

from typing import Any, TypeVar

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets (seconds) from 5 ms to 5 min: token gaps on a CPU are tens of ms, whole requests up to minutes.
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BYTES_BUCKETS = tuple(float(1 << n) for n in range(14, 32, 2))  # 16 KiB .. 2 GiB
SHARE_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

PRIORITY_LABEL_LIMIT = 8  # priorities beyond +-8 share one label each way: a client cannot multiply the series


def priority_label(priority: int) -> str:
    """The `priority` label of a request's priority class: its value within +-PRIORITY_LABEL_LIMIT, else "<-8" or
    ">8"."""
    if priority < -PRIORITY_LABEL_LIMIT:
        return f"<-{PRIORITY_LABEL_LIMIT}"
    if priority > PRIORITY_LABEL_LIMIT:
        return f">{PRIORITY_LABEL_LIMIT}"
    return str(priority)


_registry = CollectorRegistry()


def registry() -> CollectorRegistry:
    return _registry


def _latency(name: str, doc: str, reg: CollectorRegistry, labels: tuple[str, ...] = ()) -> Histogram:
    return Histogram(name, doc, labels, buckets=LATENCY_BUCKETS, registry=reg)


class ComponentMetrics:
    """What every component counts: failed RPCs by method and status."""

    def __init__(self, reg: CollectorRegistry):
        self.errors = Counter(
            "disagg_request_errors", "Failed RPCs by method and gRPC status code", ["method", "code"], registry=reg
        )


class GatewayMetrics(ComponentMetrics):
    """The client's view of each request, measured where it leaves the service."""

    def __init__(self, reg: CollectorRegistry):
        super().__init__(reg)
        model = ("model",)
        self.ttft = _latency(
            "gen_ai_server_time_to_first_token_seconds",
            "Time from request to the first token sent to the client",
            reg,
            model,
        )
        self.tpot = _latency(
            "gen_ai_server_time_per_output_token_seconds",
            "Per request: time between first and last token over the tokens after the first",
            reg,
            model,
        )
        self.itl = _latency(
            "disagg_inter_token_latency_seconds", "Gap between consecutive tokens sent to the client", reg, model
        )
        self.e2e = _latency(
            "gen_ai_server_request_duration_seconds", "End-to-end request duration at the gateway", reg, model
        )
        self.ttft_by_priority = _latency(
            "disagg_time_to_first_token_by_priority_seconds",
            "Time from request to the first token sent to the client, by the request's priority class",
            reg,
            ("priority",),
        )
        self.admission_wait = _latency(
            "disagg_admission_wait_seconds",
            "Time a request waited for one of the gateway's --max-inflight places, by priority class",
            reg,
            ("priority",),
        )
        self.admission_waiting = Gauge(
            "disagg_admission_waiting", "Requests waiting for a place in flight (--admission-queue)", registry=reg
        )
        self.requests = Counter(
            "disagg_requests", "Finished requests by finish reason", ["model", "finish_reason"], registry=reg
        )
        self.prompt_tokens = Counter("disagg_prompt_tokens", "Prompt tokens of finished requests", model, registry=reg)
        self.generation_tokens = Counter("disagg_generation_tokens", "Tokens sent to clients", model, registry=reg)
        # KV-aware routing of prefill (gateway.prefix_routing): which index chose, and how much of the prompt the
        # chosen worker held by it
        self.routing_decisions = Counter(
            "disagg_prefix_routing_decisions",
            "Prefill worker choices by the index that made them: exact (the workers' cache events), approximate "
            "(this gateway's own routing), none (routing off, one candidate, or the imbalance guard: least loaded)",
            ["source"],
            registry=reg,
        )
        self.routing_matched_share = Histogram(
            "disagg_prefix_routing_matched_share",
            "Share of the prompt the chosen prefill worker held by the index that chose it (exact: tokens of its "
            "leading cached blocks; approximate: bytes of the longest prefix routed there)",
            ["source"],
            buckets=SHARE_BUCKETS,
            registry=reg,
        )
        self.indexed_blocks = Gauge(
            "disagg_prefix_routing_indexed_blocks",
            "Blocks a prefill worker reports in its prefix cache (exact index; no series while it does not report)",
            ["worker"],
            registry=reg,
        )
        self.kv_snapshots = Counter(
            "disagg_prefix_routing_snapshots",
            "WatchKvEvents snapshots received from a prefill worker (one per subscription)",
            ["worker"],
            registry=reg,
        )
        self.local_prefill = Counter(
            "disagg_local_prefill",
            "Conditional disaggregation (--local-prefill-tokens): prompts offered to a decode worker, by outcome: "
            "local (prefilled there), declined (too many uncached tokens: sent to a prefill worker), refused (the "
            "decode worker was full: sent to a prefill worker)",
            ["outcome"],
            registry=reg,
        )
        self.held_prefix_handoffs = Counter(
            "disagg_held_prefix_handoffs",
            "Handoffs to a decode worker that holds the prompt's first blocks (it declined to prefill the rest), by "
            "outcome: suffix (only the KV after them sent), gone (evicted meanwhile: handed over whole), refused "
            "(that worker was full: handed over whole to another)",
            ["outcome"],
            registry=reg,
        )


class WorkerMetrics(ComponentMetrics):
    """Queue, batch and KV handoff metrics that prefill and decode workers share."""

    def __init__(self, reg: CollectorRegistry):
        super().__init__(reg)
        self.queue_wait = _latency(
            "disagg_queue_wait_seconds",
            "Time a request waited in the worker's queue before its first forward pass",
            reg,
        )
        self.queue_length = Gauge("disagg_queue_length", "Requests waiting in the worker's queue", registry=reg)
        self.queue_wait_by_priority = _latency(
            "disagg_queue_wait_by_priority_seconds",
            "Time a request waited in the worker's queue before its first forward pass, by priority class",
            reg,
            ("priority",),
        )
        self.kv_bytes = Counter(
            "disagg_kv_transferred_bytes",
            "KV cache bytes handed over (sent by prefill, received by decode)",
            registry=reg,
        )
        self.kv_seconds = _latency(
            "disagg_kv_transfer_seconds",
            "Time to stream one request's KV cache (serialize+send on prefill, first to last byte received on decode)",
            reg,
        )
        self.kv_request_bytes = Histogram(
            "disagg_kv_request_bytes", "KV cache bytes of one request", buckets=BYTES_BUCKETS, registry=reg
        )
        self.batch_size = Histogram(
            "disagg_batch_size",
            "Sequences in the forward passes requests took part in (per request-step)",
            buckets=BATCH_BUCKETS,
            registry=reg,
        )
        # the prefix cache (prefill workers; decode workers with --aggregated or --local-prefill), counted in blocks
        # of --prefix-block-tokens (a prompt's full blocks: found or not)
        self.prefix_hits = Counter(
            "disagg_prefix_cache_hit_blocks", "Prompt blocks found in the prefix cache", registry=reg
        )
        self.prefix_misses = Counter(
            "disagg_prefix_cache_miss_blocks", "Full prompt blocks not found in the prefix cache", registry=reg
        )
        self.prefix_cached_tokens = Counter(
            "disagg_prefix_cache_cached_tokens", "Prompt tokens whose KV came from the prefix cache", registry=reg
        )
        self.prefix_evictions = Counter(
            "disagg_prefix_cache_evicted_blocks", "Blocks evicted from the prefix cache (LRU)", registry=reg
        )
        self.prefix_bytes = Gauge("disagg_prefix_cache_bytes", "KV bytes held by the prefix cache", registry=reg)

    def observe_kv(self, size: int, seconds: float) -> None:
        """One request's KV handoff, on either side."""
        self.kv_bytes.inc(size)
        self.kv_seconds.observe(seconds)
        self.kv_request_bytes.observe(size)


class PrefillMetrics(WorkerMetrics):
    def __init__(self, reg: CollectorRegistry):
        super().__init__(reg)
        self.forward = _latency("disagg_prefill_forward_seconds", "Prefill forward pass of a request's batch", reg)
        self.prompt_tokens = Counter("disagg_prompt_tokens", "Prompt tokens prefilled", registry=reg)


class DecodeMetrics(WorkerMetrics):
    def __init__(self, reg: CollectorRegistry):
        super().__init__(reg)
        self.running = Gauge("disagg_running_batch_size", "Sequences in the running decode batch", registry=reg)
        self.kv_load = _latency("disagg_kv_load_seconds", "Copying a received KV cache into the decode batch", reg)
        self.tpot = _latency(
            "disagg_decode_time_per_output_token_seconds",
            "Per request: decode time over tokens decoded (decode worker's view)",
            reg,
        )
        self.generation_tokens = Counter("disagg_generation_tokens", "Tokens decoded", registry=reg)
        self.greedy_screen_kept = Gauge(
            "disagg_greedy_screen_kept_tokens_per_row",
            "Tokens the bf16 greedy screen kept for float32 scoring, per greedy row, since start (of a vocabulary of "
            "tens of thousands; 0: the screen is off or unused)",
            registry=reg,
        )
        self.held_prefix_tokens = Counter(
            "disagg_kv_held_prefix_tokens",
            "Tokens whose KV a handoff left out because this worker's prefix cache held it (sent: the rest)",
            registry=reg,
        )


COMPONENTS: dict[str, type[ComponentMetrics]] = {
    "gateway": GatewayMetrics,
    "prefill": PrefillMetrics,
    "decode": DecodeMetrics,
}
_current: ComponentMetrics | None = None
M = TypeVar("M", bound=ComponentMetrics)


def install(component: str) -> ComponentMetrics:
    """This process's metrics (made on the first call; a process is one component)."""
    global _current
    if _current is None:
        _current = COMPONENTS[component](_registry)
    return _current


def current(kind: type[M]) -> M | None:
    """The process's metrics if they are (a subclass of) `kind`, else None."""
    return _current if isinstance(_current, kind) else None


def count_error(method: str, code: grpc.StatusCode) -> None:
    """One failed RPC (called by the error interceptor, and for client cancellations)."""
    if (m := current(ComponentMetrics)) is not None:
        m.errors.labels(method, code.name).inc()


def watch_engine(engine: Any) -> None:
    """Gauges read at scrape time: queue length, and the running batch size of a decode engine."""
    if (m := current(WorkerMetrics)) is not None:
        # (an aggregated engine also counts the prompts it has yet to prefill)
        m.queue_length.set_function(lambda: engine.queued if hasattr(engine, "queued") else len(engine.waiting))
    if (d := current(DecodeMetrics)) is not None:
        d.running.set_function(lambda: len(engine.running))
        d.greedy_screen_kept.set_function(lambda: _screen_kept_per_row(getattr(engine, "head", None)))


def watch_admission(gate: Any) -> None:
    """The requests waiting in the gateway's admission queue (read at scrape time); `gate` is a
    gateway.admission.AdmissionGate."""
    if (m := current(GatewayMetrics)) is not None:
        m.admission_waiting.set_function(lambda: gate.waiting)


def _screen_kept_per_row(head: Any) -> float:
    """disagg.model.lm_head.ExactGreedyHead's tokens scored in float32 per row; 0 without one."""
    rows = getattr(head, "rows", 0)
    return head.screened_tokens / rows if rows else 0.0


def watch_prefix_cache(cache: Any) -> None:
    """The prefix cache's bytes (read at scrape time) and evictions (counted as they happen); `cache` is a
    disagg.kv.prefix_cache.PrefixCache."""
    if (m := current(WorkerMetrics)) is not None:
        m.prefix_bytes.set_function(lambda: cache.bytes_held)
        cache.on_evict = m.prefix_evictions.inc
