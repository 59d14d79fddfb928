"""`disagg bench`: a load generator against a gateway (in the spirit of vLLM's benchmark_serving), its statistics,
and the comparison with in-process `generate()` run in the same invocation.

Definitions (per request, seconds): TTFT is the arrival of the first token; TPOT is (E2E - TTFT) / (tokens - 1);
ITL is every gap between consecutive tokens; E2E is the arrival of the last token. Throughput is finished requests
and output tokens over the wall time of the whole run. Goodput (as vLLM's `--goodput`, DistServe's measure) is the
finished requests that met every given SLO over that same wall time: TTFT, TPOT and E2E each at most their limit,
and for ITL every gap of the request at most its limit (one stall misses it). The prefix hit rate is the cached
prompt tokens the gateway reports (`usage.cached_prompt_tokens`) over all prompt tokens, summed over the finished
requests.

Workloads: `random` (distinct prompts of `prompt_tokens`), `shared-system-prompt` (request i = system prompt i mod N
of `system_tokens` + a distinct user turn of `prompt_tokens`) and `multi-turn` (conversations of `turns` turns, each
re-sending the whole history, i.e. the earlier user turns and replies, plus a new user turn of `prompt_tokens`; the
turns of one conversation are sequential, conversations run concurrently up to `concurrency`) and `mixed` (distinct
prompts, a `long_fraction` of them `long_prompt_tokens` long and the rest `prompt_tokens`: the long prefills are
what stalls an aggregated worker's running streams).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc
from disagg.tools.client import Completion, channel, complete

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PERCENTILES = (50, 90, 99)
PROMPT_WORDS = (
    "the",
    "model",
    "reads",
    "every",
    "token",
    "of",
    "the",
    "prompt",
    "once",
    "and",
    "then",
    "writes",
    "one",
    "at",
    "a",
    "time",
    "while",
    "cache",
    "keys",
    "values",
    "grows",
    "by",
    "column",
    "per",
    "step",
    "so",
    "batching",
    "many",
    "sequences",
    "keeps",
    "arithmetic",
    "units",
    "busy",
    "instead",
    "waiting",
)


@dataclass(frozen=True)
class Workload:
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    concurrency: int = 1  # most requests in flight (closed loop)
    request_rate: float = float("inf")  # Poisson arrivals per second; inf = all at once, limited by concurrency
    ignore_eos: bool = True
    seed: int = 0
    kind: str = "random"  # one of WORKLOADS
    system_prompts: int = 0  # shared-system-prompt: how many distinct system prompts
    system_tokens: int = 0  # shared-system-prompt: tokens of each
    turns: int = 1  # multi-turn: turns per conversation (num_requests = conversations x turns)
    history: str = "text"  # multi-turn: the history re-sent as "text" or "tokens"
    long_fraction: float = 0.0  # mixed: the share of prompts that are long
    long_prompt_tokens: int = 0  # mixed: tokens of each long prompt


WORKLOADS = ("random", "shared-system-prompt", "multi-turn", "mixed")
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


def make_prompts(tokenizer: PreTrainedTokenizerBase, count: int, prompt_tokens: int, seed: int = 0) -> list[list[int]]:
    """`count` different prompts of exactly `prompt_tokens` tokens whose text re-encodes to the same ids.

    The gateway takes text, so a prompt must survive decode -> encode unchanged to have the asked length there.
    """
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        words = [rng.choice(PROMPT_WORDS) for _ in range(prompt_tokens * 2)]
        ids = tokenizer.encode(" " + " ".join(words))[:prompt_tokens]
        while tokenizer.encode(tokenizer.decode(ids)) != ids:  # a cut inside a word can merge differently
            ids = ids[:-1] + tokenizer.encode(" the")
            ids = ids[:prompt_tokens]
        if len(ids) != prompt_tokens:
            raise ValueError(f"could not build a prompt of {prompt_tokens} tokens")
        prompts.append(ids)
    return prompts


def _checked_concat(tokenizer: PreTrainedTokenizerBase, *parts: list[int]) -> list[int]:
    """The parts joined, checked to survive decode -> encode unchanged (as the gateway will tokenize the text)."""
    ids = [t for part in parts for t in part]
    if tokenizer.encode(tokenizer.decode(ids)) != ids:
        raise ValueError("the joined prompt does not re-encode to the same tokens")
    return ids


def make_shared_system_prompts(
    tokenizer: PreTrainedTokenizerBase,
    count: int,
    system_prompts: int,
    system_tokens: int,
    user_tokens: int,
    seed: int = 0,
) -> list[list[int]]:
    """`count` prompts: prompt i = system prompt i mod `system_prompts` (exactly `system_tokens`) followed by its
    own distinct user turn (exactly `user_tokens`); every prompt is `system_tokens + user_tokens` tokens as text."""
    systems = make_prompts(tokenizer, system_prompts, system_tokens, seed=seed + 1_000_003)
    users = make_prompts(tokenizer, count, user_tokens, seed=seed)
    return [_checked_concat(tokenizer, systems[i % system_prompts], users[i]) for i in range(count)]


def make_conversations(
    tokenizer: PreTrainedTokenizerBase, conversations: int, turns: int, user_tokens: int, seed: int = 0
) -> list[list[list[int]]]:
    """The user turns of each conversation (exactly `user_tokens` each, all distinct); the replies come from the
    server at run time and `next_turn_prompt` joins them into the growing history."""
    users = make_prompts(tokenizer, conversations * turns, user_tokens, seed=seed)
    return [users[c * turns : (c + 1) * turns] for c in range(conversations)]


def long_positions(count: int, long_fraction: float, seed: int = 0) -> list[bool]:
    """Which of `count` requests are long: exactly round(count x fraction) of them, at seeded random places, so
    a short run has the asked mix (a coin per request would not) and every run of a seed the same one."""
    if not 0 <= long_fraction <= 1:
        raise ValueError(f"the long fraction must be in [0, 1], not {long_fraction}")
    long = set(random.Random(seed).sample(range(count), round(count * long_fraction)))
    return [i in long for i in range(count)]


def make_mixed_prompts(
    tokenizer: PreTrainedTokenizerBase,
    count: int,
    short_tokens: int,
    long_tokens: int,
    long_fraction: float,
    seed: int = 0,
) -> list[list[int]]:
    """`count` distinct prompts, those `long_positions` marks exactly `long_tokens` long, the rest `short_tokens`."""
    is_long = long_positions(count, long_fraction, seed)
    longs = iter(make_prompts(tokenizer, sum(is_long), long_tokens, seed=seed + 1_000_003))
    shorts = iter(make_prompts(tokenizer, count - sum(is_long), short_tokens, seed=seed))
    return [next(longs) if long else next(shorts) for long in is_long]


def fit_long_prompt(long_tokens: int, short_tokens: int, output_tokens: int, context_length: int) -> int:
    """The long prompt's length cut to what leaves room for the output in the model's context (distilgpt2: 1024
    positions, so 1000 + 64 becomes 960); raises ValueError when even the short prompts do not fit."""
    if short_tokens + output_tokens > context_length:
        raise ValueError(
            f"{short_tokens} prompt + {output_tokens} output tokens exceed the model's context of {context_length}"
        )
    return min(long_tokens, context_length - output_tokens)


def next_turn_prompt(previous_prompt: str, reply: str, user_turn: str) -> str:
    """A turn's prompt as a chat client re-sends it: the previous turn's prompt (the history so far), the reply it
    got, then the new user turn. Its tokens start with the previous prompt's tokens, so the prefix cache can hit."""
    return previous_prompt + reply + user_turn


def arrival_delays(workload: Workload) -> list[float]:
    """Seconds between consecutive request sends: Poisson (exponential gaps) at `request_rate`, or all at once."""
    if workload.request_rate == float("inf"):
        return [0.0] * workload.num_requests
    rng = np.random.default_rng(workload.seed)
    return list(rng.exponential(1.0 / workload.request_rate, workload.num_requests))


async def run_against_gateway(
    address: str,
    workload: Workload,
    prompts: list[str],
    on_done: Callable[[], None] = lambda: None,
    timeout: float = 600.0,
) -> RunResult:
    """Send the workload's requests (prompt i cycles through `prompts`) and record what each one saw."""
    limit = asyncio.Semaphore(workload.concurrency)
    records = [RequestRecord() for _ in range(workload.num_requests)]
    async with channel(address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)

        async def one(i: int) -> None:
            request = gateway_pb2.GenerateRequest(
                prompt=prompts[i % len(prompts)],
                max_new_tokens=workload.output_tokens,
                ignore_eos=workload.ignore_eos,
                request_id=f"bench-{i}",
            )
            try:
                await _send(stub, request, records[i], timeout)
            finally:
                limit.release()
                on_done()

        duration = await _drive(workload, limit, one)
    return RunResult("cluster", duration, records)


async def _send(
    stub: gateway_pb2_grpc.GatewayStub, request: gateway_pb2.GenerateRequest, record: RequestRecord, timeout: float
) -> Completion | None:
    """One request into `record` (timings, usage or the error); returns the completion, None when it failed."""
    try:
        done = await complete(stub, request, timeout=timeout)
    except Exception as exc:  # a failed request is counted, not fatal to the run
        details = exc.details() if hasattr(exc, "details") else str(exc)
        record.error = f"{type(exc).__name__}: {details}"
        return None
    record.token_times = done.token_times
    record.prompt_tokens = done.prompt_tokens
    record.cached_prompt_tokens = done.cached_prompt_tokens
    if not done.token_times:
        record.error = "no tokens"
        return None
    return done


async def run_conversations(
    address: str,
    workload: Workload,
    conversations: list[list[str]] | list[list[list[int]]],
    on_done: Callable[[], None] = lambda: None,
    timeout: float = 600.0,
) -> RunResult:
    """The multi-turn workload: each conversation sends its user turns one after the other, every turn re-sending
    the history with the replies received; up to `concurrency` conversations at once, each starting at a Poisson
    arrival at `request_rate` conversations per second (inf: all at once). Record c * turns + t is turn t of
    conversation c; a failed turn ends its conversation (the turns left are counted as failed).

    User turns as text re-send the history as text (what a chat client does: the server re-encodes it, and may
    split a reply into other tokens than it generated); as token ids, the history is re-sent as the tokens sent
    and received (`prompt_token_ids`: a client that keeps the conversation's tokens)."""
    limit = asyncio.Semaphore(workload.concurrency)
    starts = list(itertools.accumulate(arrival_delays(replace(workload, num_requests=len(conversations)))))
    offsets = [sum(len(c) for c in conversations[:i]) for i in range(len(conversations))]
    records = [RequestRecord() for c in conversations for _ in c]
    async with channel(address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)

        async def conversation(c: int) -> None:
            await asyncio.sleep(starts[c])
            async with limit:
                text, reply_text = "", ""
                ids: list[int] = []
                reply_ids: list[int] = []
                for t, user in enumerate(conversations[c]):
                    request = gateway_pb2.GenerateRequest(
                        max_new_tokens=workload.output_tokens,
                        ignore_eos=workload.ignore_eos,
                        request_id=f"bench-conv{c}-turn{t}",
                    )
                    if isinstance(user, str):
                        request.prompt = text = next_turn_prompt(text, reply_text, user)
                    else:
                        ids = [*ids, *reply_ids, *cast("list[int]", user)]
                        request.prompt_token_ids[:] = ids
                    done = await _send(stub, request, records[offsets[c] + t], timeout)
                    on_done()
                    if done is None:
                        for left in records[offsets[c] + t + 1 : offsets[c] + len(conversations[c])]:
                            left.error = "an earlier turn of the conversation failed"
                            on_done()
                        return
                    reply_text, reply_ids = done.text, done.token_ids

        started = time.perf_counter()
        await asyncio.gather(*(conversation(c) for c in range(len(conversations))))
        duration = time.perf_counter() - started
    return RunResult("cluster", duration, records)


async def _drive(
    workload: Workload, limit: asyncio.Semaphore, one: Callable[[int], Coroutine[Any, Any, None]]
) -> float:
    """Start request i at its arrival time (and when `limit` lets it); returns the seconds until all ended."""
    started = time.perf_counter()
    tasks: list[asyncio.Task[None]] = []
    for i, delay in enumerate(arrival_delays(workload)):
        if delay:
            await asyncio.sleep(delay)
        await limit.acquire()
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    return time.perf_counter() - started


def spread_token_times(chunk_times: list[float], tokens: int) -> list[float]:
    """Per-token arrival times from SSE chunk times: the first chunk is the first token (always sent alone), the
    rest are spread evenly over the other chunks (exact at a stream interval of 1 token, where chunk = token)."""
    if not chunk_times or tokens <= 0:
        return []
    rest, chunks = tokens - 1, chunk_times[1:]
    times = [chunk_times[0]]
    for i, at in enumerate(chunks):
        times += [at] * (rest * (i + 1) // len(chunks) - rest * i // len(chunks))
    return times


async def run_against_openai(
    base_url: str,
    workload: Workload,
    prompts: list[str],
    model: str,
    on_done: Callable[[], None] = lambda: None,
    timeout: float = 600.0,
) -> RunResult:
    """The same workload through the OpenAI-compatible HTTP front (streamed /v1/completions, usage chunk on)."""
    import httpx2

    limit = asyncio.Semaphore(workload.concurrency)
    records = [RequestRecord() for _ in range(workload.num_requests)]
    pool = httpx2.Limits(max_connections=workload.concurrency, max_keepalive_connections=workload.concurrency)
    async with httpx2.AsyncClient(base_url=base_url, timeout=timeout, limits=pool) as http:

        async def one(i: int) -> None:
            body = {
                "model": model,
                "prompt": prompts[i % len(prompts)],
                "max_tokens": workload.output_tokens,
                "ignore_eos": workload.ignore_eos,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            chunk_times: list[float] = []
            tokens = 0
            try:
                started = time.perf_counter()
                async with http.stream("POST", "/completions", json=body) as reply:
                    if reply.status_code != 200:
                        raise RuntimeError(f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}")
                    async for line in reply.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        event = json.loads(line[6:])
                        if "error" in event:
                            raise RuntimeError(event["error"]["message"])
                        if event["choices"]:
                            chunk_times.append(time.perf_counter() - started)
                        elif usage := event.get("usage"):
                            tokens = usage["completion_tokens"]
                            records[i].prompt_tokens = usage.get("prompt_tokens", 0)
                            details = usage.get("prompt_tokens_details") or {}
                            records[i].cached_prompt_tokens = details.get("cached_tokens", 0)
                records[i].token_times = spread_token_times(chunk_times, tokens)
                if not records[i].token_times:
                    records[i].error = "no tokens"
            except Exception as exc:  # a failed request is counted, not fatal to the run
                records[i].error = f"{type(exc).__name__}: {exc}"
            finally:
                limit.release()
                on_done()

        duration = await _drive(workload, limit, one)
    return RunResult("cluster_openai", duration, records)


def comparison(results: dict[str, dict]) -> dict[str, float]:
    """The ratios the issue asks for: cluster vs the in-process baselines."""
    cluster = results.get("cluster")
    ratios: dict[str, float] = {}
    if not cluster:
        return ratios
    for name in ("generate_sequential", "generate_static_batch"):
        base = results.get(name)
        if base:
            ratios[f"throughput_vs_{name}"] = cluster["output_token_throughput"] / base["output_token_throughput"]
            ratios[f"e2e_mean_vs_{name}"] = cluster["e2e_s"]["mean"] / base["e2e_s"]["mean"]
            ratios[f"ttft_mean_vs_{name}"] = cluster["ttft_s"]["mean"] / base["ttft_s"]["mean"]
    if (http := results.get("cluster_openai")) is not None:  # the HTTP front against the gRPC one, same cluster
        ratios["openai_throughput_vs_grpc"] = http["output_token_throughput"] / cluster["output_token_throughput"]
        ratios["openai_ttft_mean_vs_grpc"] = http["ttft_s"]["mean"] / cluster["ttft_s"]["mean"]
    if (least := results.get("cluster_least_loaded")) is not None:  # the same trace, KV-aware vs least-loaded
        aware, plain = cluster["prefix_hit_rate"], least["prefix_hit_rate"]
        ratios["kv_aware_hit_rate_vs_least_loaded"] = aware / plain if plain else float("inf")
    if (off := results.get("cluster_prefix_off")) is not None:  # the same workload, prefix cache on vs off
        ratios["prefix_off_ttft_p50_vs_on"] = off["ttft_s"]["p50"] / cluster["ttft_s"]["p50"]
        ratios["prefix_off_ttft_p99_vs_on"] = off["ttft_s"]["p99"] / cluster["ttft_s"]["p99"]
        ratios["prefix_off_e2e_p50_vs_on"] = off["e2e_s"]["p50"] / cluster["e2e_s"]["p50"]
    if (remote := results.get("cluster_local_prefill_off")) is not None:  # conditional disaggregation off vs on
        ratios["local_prefill_off_ttft_p50_vs_on"] = remote["ttft_s"]["p50"] / cluster["ttft_s"]["p50"]
        ratios["local_prefill_off_e2e_p50_vs_on"] = remote["e2e_s"]["p50"] / cluster["e2e_s"]["p50"]
    if (whole := results.get("cluster_whole_handoff")) is not None:  # handoffs back to a decode worker, whole
        ratios["whole_handoff_ttft_p50_vs_on"] = whole["ttft_s"]["p50"] / cluster["ttft_s"]["p50"]
        ratios["whole_handoff_e2e_p50_vs_on"] = whole["e2e_s"]["p50"] / cluster["e2e_s"]["p50"]
        sent = cluster.get("routing", {}).get("kv-bytes-sent")
        sent_whole = whole.get("routing", {}).get("kv-bytes-sent")
        if sent and sent_whole:
            ratios["whole_handoff_kv_bytes_vs_on"] = sent_whole / sent
    if (plain := results.get("cluster_float32_head")) is not None:  # the decode step's A/B: float32 logits vs screen
        ratios["greedy_screen_throughput_vs_float32_head"] = (
            cluster["output_token_throughput"] / plain["output_token_throughput"]
        )
        ratios["greedy_screen_tpot_mean_vs_float32_head"] = cluster["tpot_s"]["mean"] / plain["tpot_s"]["mean"]
        for name in ("generate_sequential", "generate_static_batch"):
            if base := results.get(name):
                ratios[f"float32_head_throughput_vs_{name}"] = (
                    plain["output_token_throughput"] / base["output_token_throughput"]
                )
    if (neither := results.get("cluster_prefix_off_local_prefill_off")) is not None:  # no cache, no local prefill
        ratios["neither_ttft_p50_vs_both"] = neither["ttft_s"]["p50"] / cluster["ttft_s"]["p50"]
        ratios["neither_ttft_p99_vs_both"] = neither["ttft_s"]["p99"] / cluster["ttft_s"]["p99"]
    return ratios


def format_table(results: dict[str, dict], ratios: dict[str, float]) -> str:
    """Plain-text side-by-side table of every system in the run, in milliseconds."""
    names = list(results)
    rows = [("", *names)]
    rows.append(("requests ok/failed", *(f"{results[n]['completed']}/{results[n]['failed']}" for n in names)))
    rows.append(("wall time (s)", *(f"{results[n]['duration_s']:.2f}" for n in names)))
    rows.append(("requests/s", *(f"{results[n]['request_throughput']:.2f}" for n in names)))
    rows.append(("output tokens/s", *(f"{results[n]['output_token_throughput']:.1f}" for n in names)))
    if any("goodput" in results[n] for n in names):
        rows.append(("goodput (requests/s)", *(f"{results[n].get('goodput', float('nan')):.2f}" for n in names)))
    for metric in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        for stat in ("mean", "p50", "p90", "p99"):
            label = f"{metric[:-2].upper()} {stat} (ms)"
            rows.append((label, *(f"{results[n][metric][stat] * 1000:.1f}" for n in names)))
    if any(results[n].get("prompt_tokens") for n in names):  # what the fronts reported of the prefix cache
        rows.append(("prompt tokens", *(str(results[n].get("prompt_tokens", "")) for n in names)))
        rows.append(("cached prompt tokens", *(str(results[n].get("cached_prompt_tokens", "")) for n in names)))
        rows.append(("prefix hit rate", *(f"{results[n].get('prefix_hit_rate', float('nan')):.1%}" for n in names)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines += [f"{name}: {value:.2f}x" for name, value in ratios.items()]
    return "\n".join(lines)


def save_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
        f.write("\n")


def plot(path: str, runs: list[RunResult], title: str) -> None:
    """Latency distributions (TTFT, TPOT, E2E) per system, and output throughput, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    labels = [r.name for r in runs]
    for ax, (metric, getter) in zip(
        axes[:3],
        (
            ("TTFT", lambda r: [x.ttft for x in r.records if x.token_times]),
            ("TPOT", lambda r: [t for x in r.records if (t := x.tpot)]),
            ("E2E", lambda r: [x.e2e for x in r.records if x.token_times]),
        ),
    ):
        data = [[v * 1000 for v in getter(r)] or [float("nan")] for r in runs]
        ax.boxplot(data, tick_labels=labels, showfliers=True)
        ax.set_title(f"{metric} (ms)")
        ax.tick_params(axis="x", labelrotation=20)
    throughput = [r.stats()["output_token_throughput"] for r in runs]
    colors = ["tab:blue", "tab:gray", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    axes[3].bar(labels, throughput, color=[colors[i % len(colors)] for i in range(len(runs))])
    axes[3].set_title("output tokens/s")
    axes[3].tick_params(axis="x", labelrotation=20)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


@dataclass(frozen=True)
class SweepPoint:
    """One system at one request rate of a `--request-rates` sweep: what the table and the plot are made of."""

    system: str  # the run's name: cluster, cluster_aggregated, ...
    mode: str  # disaggregated or aggregated (with the variant's suffixes)
    request_rate: float
    stats: dict  # RunResult.stats


SWEEP_COLUMNS = (  # (key in sweep_rows, Markdown header)
    ("mode", "mode"),
    ("request_rate", "rate (req/s)"),
    ("completed", "ok"),
    ("failed", "failed"),
    ("request_throughput", "requests/s"),
    ("output_token_throughput", "output tok/s"),
    ("goodput", "goodput (req/s)"),
    ("ttft_p50_ms", "TTFT p50 (ms)"),
    ("ttft_p99_ms", "TTFT p99 (ms)"),
    ("tpot_p50_ms", "TPOT p50 (ms)"),
    ("tpot_p99_ms", "TPOT p99 (ms)"),
    ("itl_p50_ms", "ITL p50 (ms)"),
    ("itl_p99_ms", "ITL p99 (ms)"),
)


def sweep_rows(points: Sequence[SweepPoint]) -> list[dict]:
    """One flat row per (mode, rate), in the order of SWEEP_COLUMNS (milliseconds; goodput None without SLOs)."""
    rows = []
    for p in points:
        row: dict = {"system": p.system, "mode": p.mode, "request_rate": p.request_rate}
        row |= {key: p.stats[key] for key in ("completed", "failed", "request_throughput", "output_token_throughput")}
        row["goodput"] = p.stats.get("goodput")
        for metric in ("ttft", "tpot", "itl"):
            for stat in ("p50", "p99"):
                row[f"{metric}_{stat}_ms"] = p.stats[f"{metric}_s"][stat] * 1000
        rows.append(row)
    return rows


def sweep_table(points: Sequence[SweepPoint]) -> str:
    """The sweep as a Markdown table, one row per (mode, rate), sorted by mode then rate."""

    def cell(key: str, value: object) -> str:
        if value is None:
            return "n/a"
        if key == "request_rate":
            return f"{value:g}"
        if isinstance(value, float):
            return f"{value:.1f}" if key.endswith("_ms") else f"{value:.2f}"
        return str(value)

    ordered = sorted(points, key=lambda p: (p.mode, p.request_rate))
    lines = ["| " + " | ".join(header for _, header in SWEEP_COLUMNS) + " |", "|" + "---|" * len(SWEEP_COLUMNS)]
    for row in sweep_rows(ordered):
        lines.append("| " + " | ".join(cell(key, row[key]) for key, _ in SWEEP_COLUMNS) + " |")
    return "\n".join(lines)


def plot_sweep(path: str, points: Sequence[SweepPoint], title: str) -> None:
    """Two panels against the offered request rate, one line per mode: p99 ITL (the stalls a long prefill causes
    in an aggregated worker's running streams) and goodput (requests/s within every SLO; requests/s without SLOs).
    Rates sit evenly spaced (a sweep is usually geometric, and may end at inf)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({p.request_rate for p in points})
    x = {rate: i for i, rate in enumerate(rates)}
    with_slos = any("goodput" in p.stats for p in points)
    fig, (itl, good) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode in sorted({p.mode for p in points}):
        line = sorted((p for p in points if p.mode == mode), key=lambda p: p.request_rate)
        xs = [x[p.request_rate] for p in line]
        itl.plot(xs, [p.stats["itl_s"]["p99"] * 1000 for p in line], marker="o", label=mode)
        key = "goodput" if with_slos else "request_throughput"
        good.plot(xs, [p.stats.get(key, float("nan")) for p in line], marker="o", label=mode)
    finite = [r for r in rates if r != float("inf")]
    good.plot([x[r] for r in finite], finite, linestyle="--", color="gray", label="offered rate")
    slos: dict[str, float] = next((p.stats["slos_ms"] for p in points if "slos_ms" in p.stats), {})
    itl.set_title("p99 inter-token latency (ms)")
    good.set_title(
        "goodput (requests/s within " + ", ".join(f"{k} {v:g} ms" for k, v in slos.items()) + ")"
        if with_slos
        else "requests/s (no --goodput SLOs given)"
    )
    for ax in (itl, good):
        ax.set_xticks(range(len(rates)), [f"{r:g}" for r in rates])
        ax.set_xlabel("request rate (requests/s, Poisson)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
