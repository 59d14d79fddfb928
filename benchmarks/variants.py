"""The systems one `disagg bench` invocation measures, as typed records: the in-process `generate()` baselines and
the cluster variants its on/off/both flags multiply into. A run's display name (the key of a record's results, e.g.
`cluster_prefix_off`) is derived from these fields; nothing reads a name back: code that needs to know what a run
was asks its fields, and ratios pair runs by their fields (`benchmarks.ratios`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from disagg import config as cfg

ROUTINGS = ("kv-aware", "least-loaded")
APIS = ("grpc", "openai")
# Conditional disaggregation as `disagg up` has it by default (off: its threshold is 0), from the same definition.
LOCAL_PREFILL = bool(cfg.option_default(cfg.GatewayConfig, "local_prefill_tokens", "up"))
# The Variant fields that can depart from the default variant, in the order their suffixes join the display name,
# with each one's suffix.
DEPARTURE_SUFFIXES = (
    ("kv_cache", "_kv_off"),
    ("prefix_cache", "_prefix_off"),
    ("routing", "_least_loaded"),
    ("local_prefill", "_local_prefill_off" if LOCAL_PREFILL else "_local_prefill"),
    ("held_prefix", "_whole_handoff"),
    ("greedy_screen", "_float32_head"),
)


@dataclass(frozen=True)
class Baseline:
    """`transformers` `generate()` in the bench process: one request at a time, or static batches of the
    invocation's concurrency."""

    static_batches: bool

    @property
    def name(self) -> str:
        return "generate_static_batch" if self.static_batches else "generate_sequential"


@dataclass(frozen=True)
class Variant:
    """One local cluster configuration; the defaults are what `disagg bench` measures unless its flags say
    otherwise: `disagg up`'s path (every serving feature on but conditional disaggregation, as there)."""

    aggregated: bool = False  # aggregated workers (prefill and decode in one engine) instead of prefill + decode
    kv_cache: bool = True  # off: the decode worker recomputes the sequence every step
    prefix_cache: bool = True  # the workers' prefix caches (prefill; decode with local prefill; aggregated)
    routing: str = "kv-aware"  # the gateway's choice of prefill worker: one of ROUTINGS
    local_prefill: bool = LOCAL_PREFILL  # conditional disaggregation: short uncached prompts prefilled on decode
    held_prefix: bool = True  # a declined prompt handed back without the KV blocks the decode worker holds
    greedy_screen: bool = True  # greedy tokens from the exact bf16 screen (off: float32 logits)

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing {self.routing!r}: one of {', '.join(ROUTINGS)}")
        aggregated_departs = self.routing != "kv-aware" or self.local_prefill != LOCAL_PREFILL or not self.held_prefix
        if self.aggregated and aggregated_departs:
            raise ValueError("an aggregated cluster has no prefill routing, local prefill or held-prefix handoff")
        if not self.held_prefix and not self.local_prefill:
            raise ValueError("the held-prefix handoff exists only with local prefill")

    def departures(self) -> list[str]:
        """The fields set otherwise than in the default variant, in display-name order (the mode aside)."""
        return [name for name, _ in DEPARTURE_SUFFIXES if getattr(self, name) != getattr(DEFAULT_VARIANT, name)]

    @property
    def name(self) -> str:
        suffixes = dict(DEPARTURE_SUFFIXES)
        base = "cluster_aggregated" if self.aggregated else "cluster"
        return base + "".join(suffixes[name] for name in self.departures())


DEFAULT_VARIANT = Variant()


@dataclass(frozen=True)
class RunKey:
    """What one measured run was: a system, the front it was loaded through, and the rate of a sweep."""

    system: Variant | Baseline
    api: str = ""  # a cluster's front, one of APIS; "" for the in-process baselines
    rate: float | None = None  # the --request-rates point (None: no sweep, or a baseline)

    def __post_init__(self) -> None:
        if (self.api in APIS) != isinstance(self.system, Variant):
            raise ValueError(f"api {self.api!r}: a cluster is loaded through one of {', '.join(APIS)}, a baseline none")

    @property
    def name(self) -> str:
        return self.system.name + ("_openai" if self.api == "openai" else "")

    @property
    def label(self) -> str:
        return self.name if self.rate is None else f"{self.name}@{self.rate:g}/s"


_ON_OFF = {"on": [True], "off": [False]}


def variants(args: argparse.Namespace) -> list[Variant]:
    """The clusters that --mode, --kv-cache, --prefix-cache, --routing, --local-prefill, --handoff-held-prefix and
    --greedy-screen ask for (routing, local prefill and the held-prefix handoff only vary the disaggregated
    cluster). With 'both', the default setting comes first, except for the local-prefill, held-prefix and
    greedy-screen A/Bs, which measure the new behaviour after the old."""
    aggregated = {"disaggregated": [False], "aggregated": [True], "both": [False, True]}[args.mode]
    kv = {**_ON_OFF, "both": [True, False]}
    routings = {"kv-aware": ["kv-aware"], "least-loaded": ["least-loaded"], "both": list(ROUTINGS)}[args.routing]
    later = {**_ON_OFF, "both": [False, True]}
    return [
        Variant(agg, kv_cache, prefix_cache, routing, local_prefill, held_prefix, greedy_screen)
        for agg in aggregated
        for kv_cache in kv[args.kv_cache]
        for prefix_cache in kv[args.prefix_cache]
        for routing in (routings if not agg else ["kv-aware"])
        for local_prefill in (later[args.local_prefill] if not agg else [LOCAL_PREFILL])
        for held_prefix in (later[args.handoff_held_prefix] if local_prefill and not agg else [True])
        for greedy_screen in later[args.greedy_screen]
    ]


def reference(args: argparse.Namespace) -> Variant:
    """The cluster an invocation's ratios are taken against (`benchmarks.ratios`): the disaggregated one with its
    settings, an A/B ('both') on its new side (the feature on, KV-aware routing)."""
    local_prefill = args.local_prefill != "off"
    return Variant(
        kv_cache=args.kv_cache != "off",
        prefix_cache=args.prefix_cache != "off",
        routing="least-loaded" if args.routing == "least-loaded" else "kv-aware",
        local_prefill=local_prefill,
        held_prefix=args.handoff_held_prefix != "off" or not local_prefill,
        greedy_screen=args.greedy_screen != "off",
    )


def varied_fields(args: argparse.Namespace) -> set[str]:
    """The Variant fields the invocation measures both ways (its flags set to 'both')."""
    flags = {
        "kv_cache": args.kv_cache,
        "prefix_cache": args.prefix_cache,
        "routing": args.routing,
        "local_prefill": args.local_prefill,
        "held_prefix": args.handoff_held_prefix,
        "greedy_screen": args.greedy_screen,
    }
    return {name for name, flag in flags.items() if flag == "both"}


def mode_label(key: RunKey, varied: set[str]) -> str:
    """A cluster run as the sweep's line: disaggregated or aggregated, with the suffixes of what the invocation
    varies (`_kv_off` with --kv-cache both) and of the HTTP front (`_openai`)."""
    assert isinstance(key.system, Variant), "a sweep measures clusters only"
    suffixes = dict(DEPARTURE_SUFFIXES)
    label = "aggregated" if key.system.aggregated else "disaggregated"
    label += "".join(suffixes[name] for name in key.system.departures() if name in varied)
    return label + ("_openai" if key.api == "openai" else "")


def schedule(args: argparse.Namespace) -> list[tuple[Variant, float]]:
    """The order of the cluster runs of one round: at each rate, every variant in turn (so drifts in the machine's
    speed hit each variant alike)."""
    return [(variant, rate) for rate in args.rates for variant in variants(args)]
