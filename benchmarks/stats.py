"""Per-request timings reduced to what the records report: percentiles, throughput, goodput, prefix hit rate.

Definitions (per request, seconds): TTFT is the arrival of the first token; TPOT is (E2E - TTFT) / (tokens - 1);
ITL is every gap between consecutive tokens; E2E is the arrival of the last token. Throughput is finished requests
and output tokens over the wall time of the whole run. Goodput (as vLLM's `--goodput`, DistServe's measure) is the
finished requests that met every given SLO over that same wall time: TTFT, TPOT and E2E each at most their limit,
and for ITL every gap of the request at most its limit (one stall misses it). The prefix hit rate is the cached
prompt tokens the gateway reports (`usage.cached_prompt_tokens`) over all prompt tokens, summed over the finished
requests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)
SLO_METRICS = ("ttft", "tpot", "itl", "e2e")
SLO_ALIASES = {"e2el": "e2e"}  # vLLM's name for end-to-end latency


@dataclass
class RequestRecord:
    """One request as the client saw it; times in seconds since the request was sent."""

    token_times: list[float] = field(default_factory=list)
    error: str = ""
    prompt_tokens: int = 0  # from the response's usage (0 where the front does not say)
    cached_prompt_tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.token_times[0]

    @property
    def e2e(self) -> float:
        return self.token_times[-1]

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.e2e - self.ttft) / (n - 1) if n > 1 else None

    @property
    def itl(self) -> list[float]:
        return list(np.diff(self.token_times))


def summarize(values: Sequence[float]) -> dict[str, float]:
    """mean, p50, p90, p99 (linear interpolation, as numpy and vLLM's benchmark compute them)."""
    if not len(values):
        return {"mean": float("nan"), **{f"p{p}": float("nan") for p in PERCENTILES}}
    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), **{f"p{p}": float(np.percentile(array, p)) for p in PERCENTILES}}


@dataclass
class RunResult:
    """One system under one workload: per-request records reduced to the reported statistics."""

    name: str
    duration: float
    records: list[RequestRecord]
    # where prefills went, if known: the gateway's choices by index ("exact", ...) and requests per prefill worker
    # ("prefill-0", ...)
    routing: dict[str, float] = field(default_factory=dict)

    def stats(self, slos_ms: Mapping[str, float] | None = None) -> dict:
        """The run's statistics; with SLOs (milliseconds by metric, see `parse_goodput`) also its goodput."""
        ok = [r for r in self.records if not r.error and r.token_times]
        tokens = sum(len(r.token_times) for r in ok)
        prompt_tokens = sum(r.prompt_tokens for r in ok)
        cached = sum(r.cached_prompt_tokens for r in ok)
        slo = {}
        if slos_ms:
            good = sum(meets_slos(r, slos_ms) for r in ok)
            slo = {
                "slos_ms": dict(slos_ms),
                "good_requests": good,
                "goodput": good / self.duration if self.duration else float("nan"),
            }
        return {
            "name": self.name,
            "duration_s": self.duration,
            "completed": len(ok),
            "failed": len(self.records) - len(ok),
            "output_tokens": tokens,
            "request_throughput": len(ok) / self.duration if self.duration else float("nan"),
            "output_token_throughput": tokens / self.duration if self.duration else float("nan"),
            "ttft_s": summarize([r.ttft for r in ok]),
            "tpot_s": summarize([t for r in ok if (t := r.tpot) is not None]),
            "itl_s": summarize([gap for r in ok for gap in r.itl]),
            "e2e_s": summarize([r.e2e for r in ok]),
            "prompt_tokens": prompt_tokens,
            "cached_prompt_tokens": cached,
            "prefix_hit_rate": cached / prompt_tokens if prompt_tokens else float("nan"),
            "errors": sorted({r.error for r in self.records if r.error})[:5],
            **slo,
            **({"routing": self.routing} if self.routing else {}),
        }


def meets_slos(record: RequestRecord, slos_ms: Mapping[str, float]) -> bool:
    """Whether a finished request met every SLO (milliseconds by metric; a metric it has no value of, such as the
    TPOT or ITL of a one-token reply, is met). A failed request meets none."""
    if record.error or not record.token_times:
        return False
    worst = {
        "ttft": record.ttft,
        "tpot": record.tpot or 0.0,
        "itl": max(record.itl, default=0.0),
        "e2e": record.e2e,
    }
    return all(worst[metric] * 1000 <= limit for metric, limit in slos_ms.items())


def parse_goodput(pairs: Sequence[str]) -> dict[str, float]:
    """SLOs from vLLM's `--goodput` syntax, `METRIC:MS` pairs (ttft, tpot, itl, e2e or e2el; milliseconds).

    Raises ValueError naming the pair and what is wrong with it: a typo must not silently drop an SLO.
    """
    slos: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition(":")
        metric = SLO_ALIASES.get(name.strip().lower(), name.strip().lower())
        if not sep or metric not in SLO_METRICS:
            raise ValueError(f"{pair!r}: expected METRIC:MS with METRIC one of {', '.join(SLO_METRICS)} (or e2el)")
        try:
            limit = float(value)
        except ValueError:
            raise ValueError(f"{pair!r}: {value!r} is not a number of milliseconds") from None
        if not 0 < limit < float("inf"):
            raise ValueError(f"{pair!r}: the limit must be a positive, finite number of milliseconds")
        if metric in slos:
            raise ValueError(f"{pair!r}: a second SLO for {metric}")
        slos[metric] = limit
    return slos
