"""KV-aware routing: send a prompt to the prefill worker most likely to hold its prefix in its prefix cache.

Two indexes say which worker holds what; for each worker the exact one is used when that worker reports, the
approximate one otherwise.

- Exact (gateway.kv_events): each prefill worker reports the blocks its cache stores and evicts
  (PrefillService/WatchKvEvents: a snapshot, then changes). The gateway tokenizes the prompt (for routing only,
  with the workers' tokenizer and the worker's own rendering function) and computes its block keys with the
  worker's fingerprint and block size; `matched_w` is the tokens of the longest run of leading blocks `w` holds,
  of `total` = the prompt's tokens (+ the tokens already generated, for a resumed request).
- Approximate (this module): built from this gateway's own routing decisions. After a prefill worker sends a
  request's SequenceStart (it accepted and tokenized the prompt), the gateway records the prompt's keys under that
  worker; `matched_w` is the longest of the prompt's keyed prefixes recorded under `w`, of `total` = the prompt's
  length in the same unit. A guess can be wrong (the worker evicted the blocks, restarted, or another gateway
  routed elsewhere): it is used only for workers that do not report.

Either way a wrong answer costs only a cache miss, never a wrong token: the worker checks its own blocks, token by
token (disagg/kv/prefix_cache.py).

The approximate index has two kinds of keys, both blake2b (deterministic across processes, unlike `hash()`):

- text keys, so that the choice needs no tokenizer: the hash of the prompt's first N bytes (UTF-8; a chat
  request's messages serialized as role NUL content NUL ...) at cut points N = 64, 128, 256, 512, then every 1024
  bytes, each key naming the whole prefix up to its cut;
- token keys for a request that carries its token ids (one resumed after a failure):
  `block_keys(prompt_token_ids, model_fingerprint, 16)`, the prefix cache's own chain keys, with the fingerprint
  of the last SequenceStart seen (SequenceStart.kv_layout.model_fingerprint). Both sides are the gateway's own
  computation, so the block size need not be the workers' `--prefix-block-tokens`.

Choice. For each candidate worker w (healthy, not excluded), with `matched_w` and `total` from the index that
judges w,

    cost_w = weight * (total - matched_w) / total + load_w

that is, the share of the prompt w would still have to prefill (its uncached blocks), weighted, plus `load_w`, the
pool's load score (WorkerPool.score: sequences). `weight` (`--prefix-routing-weight`) is how many sequences of load
a fully uncached prompt weighs: a prompt goes to a worker holding its prefix unless that worker is more than about
`weight` sequences busier. The lowest cost wins; a worker that recently refused a request still goes last, and
ties go to the worker listed first. A prompt no worker holds therefore goes least loaded.
Guard (SGLang's cache-aware router): when the load is imbalanced, `max_load - min_load > abs_threshold` and
`max_load > rel_threshold * min_load` over the candidates, the cache is ignored and the least-loaded worker wins.
Each choice is counted by the index that made it (`exact`, `approximate`; `none` for load alone: routing off, a
single candidate, the guard), with the share of the prompt the chosen worker held (Prometheus, gateway).

Bounds. The approximate index holds at most `max_entries` keys (default 100,000), least recently used evicted
first; a key may name several workers (a shared system prompt served by both). A worker marked down, or gone from
DNS, drops its keys (WorkerPool.on_gone), and so does one that reports a new instance id (restarted: its cache is
new). The exact index holds what the workers hold, and a worker's entries go when its subscription ends.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from disagg import telemetry
from disagg.kv.prefix_cache import DEFAULT_BLOCK_TOKENS, block_keys
from disagg.pb.disagg.v1 import worker_pb2
from gateway.kv_events import ExactIndex, KvEventWatchers, PromptBlocks, RoutingTokenizer
from gateway.worker_pool import Worker, WorkerPool

DEFAULT_MAX_ENTRIES = 100_000
FIRST_CUTS = (64, 128, 256, 512)  # then every CUT_STEP bytes
CUT_STEP = 1024
_TEXT_SALT = b"disagg-text-prefix-v1"


@dataclass(frozen=True)
class PromptKeys:
    """A prompt's keys, each with the length of the prefix it names (bytes or tokens), and the prompt's length."""

    total: int
    cuts: tuple[tuple[int, bytes], ...]  # (prefix length, key), increasing lengths


def cut_points(length: int) -> list[int]:
    """The prefix lengths a prompt of `length` bytes is keyed at: 64, 128, 256, 512, then every 1024."""
    cuts = [c for c in FIRST_CUTS if c <= length]
    cuts.extend(range(CUT_STEP, length + 1, CUT_STEP))
    return cuts


def text_keys(text: bytes) -> PromptKeys:
    """Keys of `text`'s prefixes at cut_points: one running blake2b, a digest per cut (O(len) in all)."""
    h = hashlib.blake2b(_TEXT_SALT, digest_size=16)
    cuts, done = [], 0
    for cut in cut_points(len(text)):
        h.update(text[done:cut])
        done = cut
        cuts.append((cut, h.copy().digest()))
    return PromptKeys(len(text), tuple(cuts))


def token_keys(tokens: Sequence[int], fingerprint: str, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> PromptKeys:
    """Keys of `tokens`' full blocks: the prefix cache's own chain keys."""
    keys = block_keys(tokens, fingerprint, block_tokens)
    return PromptKeys(len(tokens), tuple(((i + 1) * block_tokens, key) for i, key in enumerate(keys)))


def prompt_text(request: worker_pb2.PrefillRequest) -> bytes:
    """What the text keys hash: the prompt, or a chat request's messages (the template is the worker's)."""
    if request.messages:
        return b"".join(f"{m.role}\0{m.content}\0".encode() for m in request.messages)
    return request.prompt.encode()


class PrefixIndex:
    """key -> the workers it was routed to, LRU-bounded, with each worker's keys (to drop them at once)."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._owners: OrderedDict[bytes, set[str]] = OrderedDict()  # least recently used first
        self._by_worker: dict[str, set[bytes]] = {}
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._owners)

    def keys_of(self, address: str) -> int:
        return len(self._by_worker.get(address, ()))

    def record(self, address: str, keys: Iterable[bytes]) -> None:
        """`address` served a prompt with these keys (now the most recently used)."""
        mine = self._by_worker.setdefault(address, set())
        for key in reversed(list(keys)):  # a prompt's shortest prefix most recent: its head is evicted last
            owners = self._owners.get(key)
            if owners is None:
                owners = self._owners[key] = set()
            else:
                self._owners.move_to_end(key)
            owners.add(address)
            mine.add(key)
        while len(self._owners) > self.max_entries:
            key, owners = self._owners.popitem(last=False)
            self.evictions += 1
            for owner in owners:
                self._by_worker[owner].discard(key)

    def matched(self, keys: PromptKeys) -> dict[str, int]:
        """Per worker, the longest of the prompt's prefixes it holds (its keys are refreshed as used, head last)."""
        found: dict[str, int] = {}
        for length, key in reversed(keys.cuts):
            owners = self._owners.get(key)
            if owners is None:
                continue  # (a later, longer cut may still be there: keys name whole prefixes)
            self._owners.move_to_end(key)
            for owner in owners:
                found.setdefault(owner, length)  # (longest first)
        return found

    def drop_worker(self, address: str) -> int:
        """Forget every key routed to `address`; returns how many."""
        mine = self._by_worker.pop(address, set())
        for key in mine:
            owners = self._owners.get(key)
            if owners is not None:
                owners.discard(address)
                if not owners:
                    del self._owners[key]
        return len(mine)


@dataclass(frozen=True)
class RoutingOptions:
    enabled: bool = True
    weight: float = 4.0  # sequences of load a fully uncached prompt weighs
    balance_abs_threshold: float = 8.0
    balance_rel_threshold: float = 1.5
    max_entries: int = DEFAULT_MAX_ENTRIES
    exact: bool = True  # subscribe to the workers' cache events (the exact index)
    tokenizer: str = ""  # the exact index's tokenizer: a model name or folder ("" = the model the workers report)


class PrefixRouter:
    """Picks a prefill worker by cost (module docstring) and records where each prompt went.

    Also the decode workers' affinity under conditional disaggregation (`fingerprint` given, `exact` off): a
    decode worker keeps each finished sequence's prompt + generated tokens in its cache, so the continuation keys
    of a finished request (`record_continuation`) go under the worker that decoded it, and a conversation's next
    turn, which starts with them, goes back there unless that worker is much busier. The token keys are then the
    gateway's own (its `fingerprint`, not the model's), as only the gateway computes them."""

    def __init__(self, pool: WorkerPool[Any], options: RoutingOptions = RoutingOptions(), fingerprint: str = ""):
        self.pool, self.options = pool, options
        self.index = PrefixIndex(options.max_entries)
        self.fingerprint = fingerprint  # the model's, from the last SequenceStart (token keys need it)
        self.affinity = bool(fingerprint)  # the decode workers' router (the class docstring)
        pool.on_gone.append(self.index.drop_worker)
        self.exact = ExactIndex()
        self.tokenizer = RoutingTokenizer(options.tokenizer)
        self.watchers: KvEventWatchers | None = None  # started by watch()
        if options.enabled and options.exact:
            self.watchers = KvEventWatchers(pool, self.exact, self.tokenizer, on_new_instance=self.index.drop_worker)

    async def watch(self, interval: float) -> None:
        """Subscribe to every prefill worker's cache events, in step with the pool (a task for the gateway's life)."""
        if self.watchers is not None:
            await self.watchers.run(interval)

    async def close(self) -> None:
        if self.watchers is not None:
            await self.watchers.close()
        else:
            self.tokenizer.close()

    def keys(self, request: worker_pb2.PrefillRequest) -> PromptKeys:
        if request.prompt_token_ids:
            if not self.fingerprint:
                return PromptKeys(len(request.prompt_token_ids), ())
            return token_keys(request.prompt_token_ids, self.fingerprint)
        return text_keys(prompt_text(request))

    async def prompt_blocks(self, request: worker_pb2.PrefillRequest) -> PromptBlocks | None:
        """The request's block keys for the exact index (tokenized off the event loop); None when no worker
        reports or there is no choice to make."""
        if not self.options.enabled or not self.exact.caches:
            return None
        if sum(w.healthy for w in self.pool.workers.values()) < 2:
            return None
        model = self.tokenizer.model_for(next(iter(self.exact.caches.values())).model)  # (one model per pool)
        return await self.tokenizer.blocks(model, request, self.exact.layouts())

    def pick(
        self,
        request: worker_pb2.PrefillRequest,
        exclude: frozenset[str] = frozenset(),
        blocks: PromptBlocks | None = None,
    ) -> Worker[Any]:
        """The candidate with the lowest cost; the pool's least-loaded pick when routing is off or pointless.
        `blocks`: the prompt's keys for the exact index (prompt_blocks), used for the workers that report."""
        candidates = self.pool.candidates(exclude)
        if not self.options.enabled or len(candidates) < 2:
            return self._by_load(exclude)
        shares = self._shares(request, candidates, blocks)
        if not any(share for _, share in shares.values()):
            chosen = self.pool.pick(exclude)  # nobody holds any of it: least loaded
            self._count(shares[chosen.address][0], 0.0)
            return chosen
        now = self.pool.now()
        loads = {w.address: self.pool.score(w, now) for w in candidates}
        high, low = max(loads.values()), min(loads.values())
        if high - low > self.options.balance_abs_threshold and high > self.options.balance_rel_threshold * low:
            return self._by_load(exclude)  # imbalanced: the cache waits

        def cost(w: Worker[Any]) -> tuple[bool, float]:
            uncached = 1.0 - shares[w.address][1]
            return self.pool.deprioritised(w, now), self.options.weight * uncached + loads[w.address]

        chosen = min(candidates, key=cost)
        self._count(*shares[chosen.address])
        return chosen

    def _by_load(self, exclude: frozenset[str]) -> Worker[Any]:
        self._count("none")
        return self.pool.pick(exclude)

    def _count(self, source: str, share: float | None = None) -> None:
        """The prefill routing metrics count prefill choices only (not the decode workers' affinity)."""
        if not self.affinity:
            telemetry.record_routing(source, share)

    def _shares(
        self, request: worker_pb2.PrefillRequest, candidates: list[Worker[Any]], blocks: PromptBlocks | None
    ) -> dict[str, tuple[str, float]]:
        """Per candidate, the index that judges it and the share of the prompt it holds by that index."""
        shares: dict[str, tuple[str, float]] = {}
        approximate: tuple[PromptKeys, dict[str, int]] | None = None
        for w in candidates:
            exact = None if blocks is None else self.exact.matched(w.address, blocks)
            if exact is not None:
                shares[w.address] = ("exact", exact / blocks.tokens if blocks and blocks.tokens else 0.0)
                continue
            if approximate is None:  # (the keys are computed once, for the workers that do not report)
                keys = self.keys(request)
                approximate = keys, self.index.matched(keys) if keys.cuts else {}
            keys, found = approximate
            shares[w.address] = ("approximate", found.get(w.address, 0) / keys.total if keys.total else 0.0)
        return shares

    def record(self, worker: Worker[Any], request: worker_pb2.PrefillRequest, start: worker_pb2.SequenceStart) -> None:
        """`worker` sent `request`'s SequenceStart: it computes (and caches) the prompt; remember both key kinds."""
        if not self.options.enabled:
            return
        if start.kv_layout.model_fingerprint and not self.affinity:
            self.fingerprint = start.kv_layout.model_fingerprint
        keys: list[bytes] = []
        if not request.prompt_token_ids:
            keys.extend(key for _, key in text_keys(prompt_text(request)).cuts)
        if self.fingerprint:
            keys.extend(key for _, key in token_keys(start.prompt_token_ids, self.fingerprint).cuts)
        self.index.record(worker.address, keys)

    def record_continuation(
        self, worker: Worker[Any], request: worker_pb2.PrefillRequest, token_ids: Sequence[int], reply: str
    ) -> None:
        """`worker` finished `request` (prompt + generated = `token_ids`, `reply` the text of sequence 0): the keys
        a next turn re-sending this history starts with (text: the prompt and the reply; a chat request's
        messages and an assistant message; tokens: every full block)."""
        if not self.options.enabled:
            return
        keys: list[bytes] = []
        if not request.prompt_token_ids:
            history = prompt_text(request) + (f"assistant\0{reply}\0" if request.messages else reply).encode()
            keys.extend(key for _, key in text_keys(history).cuts)
        if self.fingerprint:
            keys.extend(key for _, key in token_keys(token_ids, self.fingerprint).cuts)
        self.index.record(worker.address, keys)
