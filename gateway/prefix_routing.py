"""KV-aware routing: send a prompt to the prefill worker most likely to hold its prefix in its prefix cache.

The index is approximate: it is built from this gateway's own routing decisions, not from the workers' cache
events. After a prefill worker sends a request's SequenceStart (it accepted and tokenized the prompt), the gateway
records the prompt's keys under that worker; a later prompt with the same beginning is routed there. A guess can
be wrong (the worker evicted the blocks, restarted, or another gateway routed elsewhere); a wrong guess costs only
a cache miss, never a wrong token: the worker checks its own blocks, token by token (disagg/kv/prefix_cache.py).

Two kinds of keys, both blake2b (deterministic across processes, unlike Python's `hash()`):

- text keys, so that the choice is made before tokenization (the gateway does not tokenize): the hash of the
  prompt's first N bytes (UTF-8; a chat request's messages serialized as role NUL content NUL ...) at cut points
  N = 64, 128, 256, 512, then every 1024 bytes, each key naming the whole prefix up to its cut;
- token keys for a request that carries its token ids (one resumed after a failure):
  `block_keys(prompt_token_ids, model_fingerprint, 16)`, the prefix cache's own chain keys, with the fingerprint
  of the last SequenceStart seen (SequenceStart.kv_layout.model_fingerprint). Both sides are the gateway's own
  computation, so the block size need not be the workers' `--prefix-block-tokens`.

Choice. For each candidate worker w (healthy, not excluded), `matched_w` is the longest of the prompt's cuts the
index holds under w (0 if none), and

    cost_w = weight * (total - matched_w) / total + load_w

where `load_w` is the pool's load score (WorkerPool.score: sequences) and `weight` (`--prefix-routing-weight`) is
how many sequences of load a fully uncached prompt weighs: a prompt goes to a worker holding its prefix unless that
worker is more than about `weight` sequences busier. The lowest cost wins; a worker that recently refused a request
still goes last, and ties go to the worker listed first. A prompt no worker holds therefore goes least loaded.
Guard (SGLang's cache-aware router): when the load is imbalanced, `max_load - min_load > abs_threshold` and
`max_load > rel_threshold * min_load` over the candidates, the cache is ignored and the least-loaded worker wins.

Bounds. The index holds at most `max_entries` keys (default 100,000), least recently used evicted first; a key may
name several workers (a shared system prompt served by both). A worker marked down, or gone from DNS, drops its
keys (WorkerPool.on_gone): its cache is lost or unreachable.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from disagg.kv.prefix_cache import DEFAULT_BLOCK_TOKENS, block_keys
from disagg.pb.disagg.v1 import worker_pb2
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


class PrefixRouter:
    """Picks a prefill worker by cost (module docstring) and records where each prompt went."""

    def __init__(self, pool: WorkerPool[Any], options: RoutingOptions = RoutingOptions()):
        self.pool, self.options = pool, options
        self.index = PrefixIndex(options.max_entries)
        self.fingerprint = ""  # the model's, from the last SequenceStart (token keys need it)
        pool.on_gone.append(self.index.drop_worker)

    def keys(self, request: worker_pb2.PrefillRequest) -> PromptKeys:
        if request.prompt_token_ids:
            if not self.fingerprint:
                return PromptKeys(len(request.prompt_token_ids), ())
            return token_keys(request.prompt_token_ids, self.fingerprint)
        return text_keys(prompt_text(request))

    def pick(self, request: worker_pb2.PrefillRequest, exclude: frozenset[str] = frozenset()) -> Worker[Any]:
        """The candidate with the lowest cost; the pool's least-loaded pick when routing is off or pointless."""
        candidates = self.pool.candidates(exclude)
        if not self.options.enabled or len(candidates) < 2:
            return self.pool.pick(exclude)
        keys = self.keys(request)
        matched = self.index.matched(keys) if keys.cuts else {}
        if not matched:
            return self.pool.pick(exclude)
        now = self.pool.now()
        loads = {w.address: self.pool.score(w, now) for w in candidates}
        high, low = max(loads.values()), min(loads.values())
        if high - low > self.options.balance_abs_threshold and high > self.options.balance_rel_threshold * low:
            return self.pool.pick(exclude)  # imbalanced: the cache waits

        def cost(w: Worker[Any]) -> tuple[bool, float]:
            uncached = (keys.total - matched.get(w.address, 0)) / keys.total
            return self.pool.deprioritised(w, now), self.options.weight * uncached + loads[w.address]

        return min(candidates, key=cost)

    def record(self, worker: Worker[Any], request: worker_pb2.PrefillRequest, start: worker_pb2.SequenceStart) -> None:
        """`worker` sent `request`'s SequenceStart: it computes (and caches) the prompt; remember both key kinds."""
        if not self.options.enabled:
            return
        if start.kv_layout.model_fingerprint:
            self.fingerprint = start.kv_layout.model_fingerprint
        keys: list[bytes] = []
        if not request.prompt_token_ids:
            keys.extend(key for _, key in text_keys(prompt_text(request)).cuts)
        if self.fingerprint:
            keys.extend(key for _, key in token_keys(start.prompt_token_ids, self.fingerprint).cuts)
        self.index.record(worker.address, keys)
