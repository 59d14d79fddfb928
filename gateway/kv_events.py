"""The exact prefix index: what each prefill worker says its prefix cache holds (PrefillService/WatchKvEvents).

For every prefill worker in the pool the gateway keeps one subscription. Its first message is a snapshot (the
worker's per-process instance id, model, model fingerprint, block size and every block key held), then batches of
keys stored and removed. A subscription that ends or breaks drops that worker's entries at once (its cache may be
gone: a restarted worker starts empty), and the gateway subscribes again with backoff (0.1 s doubling to 5 s); a
new instance id at the same address also drops what the approximate index guessed for it. A worker that does not
serve WatchKvEvents (UNIMPLEMENTED: an older worker) or reports nonsense is asked again every 30 s, and is judged
by the approximate index meanwhile.

To look a prompt up, the router needs its block keys, so the gateway tokenizes, for routing only (as NVIDIA
Dynamo's frontend and SGLang's router do): with the tokenizer of the model the workers report (or the one named by
--prefix-routing-tokenizer), loaded once with disagg.model.loading.load_tokenizer, and the same function the
prefill worker renders and encodes prompts with (disagg.rpc.prompt.request_token_ids); then block_keys with each
worker's fingerprint and block size. The worker still tokenizes for real: a different tokenizer here can only cost
a cache miss, never a wrong token. A worker reports only once that tokenizer is loaded (so that its entries are
usable when they appear).

Tokenization runs on one thread of its own, never on the event loop. Measured on this 2-core machine (loaded):
a 200,000-character prompt (the longest the gateway accepts; 42,500 GPT-2 tokens) takes ~160 ms to tokenize and
~20 ms more for its block keys; inline, the loop (every stream this gateway serves) stalled for up to 560 ms, and
on the thread its longest gap was 15 ms (the tokenizer releases the GIL). A 1,000-token prompt takes ~3 ms.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from disagg import telemetry
from disagg.errors import InvalidRequest
from disagg.kv.prefix_cache import block_keys
from disagg.pb.disagg.v1 import worker_pb2
from disagg.rpc.prompt import request_token_ids
from gateway.worker_pool import Worker, WorkerPool

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
Layout = tuple[str, int]  # (model fingerprint, block tokens): what a prompt's block keys depend on


class NotReporting(Exception):
    """The worker cannot feed the exact index (no WatchKvEvents, a bad report, no tokenizer for its model)."""


@dataclass
class ReportedCache:
    """One worker's prefix cache as it reports it."""

    instance_id: str
    model: str
    fingerprint: str
    block_tokens: int
    keys: set[bytes] = field(default_factory=set)

    @property
    def layout(self) -> Layout:
        return self.fingerprint, self.block_tokens


@dataclass(frozen=True)
class PromptBlocks:
    """A prompt tokenized for routing: its length in tokens and its block keys for each layout workers report."""

    tokens: int
    keys: dict[Layout, list[bytes]]


class ExactIndex:
    """address -> the worker's ReportedCache, for the workers whose subscription is live."""

    def __init__(self) -> None:
        self.caches: dict[str, ReportedCache] = {}

    def __len__(self) -> int:
        return len(self.caches)

    def reset(self, address: str, cache: ReportedCache) -> None:
        self.caches[address] = cache
        telemetry.note_indexed_blocks(address, len(cache.keys), snapshot=True)

    def apply(self, address: str, stored: Iterable[bytes], removed: Iterable[bytes]) -> None:
        cache = self.caches[address]
        cache.keys.update(stored)
        cache.keys.difference_update(removed)
        telemetry.note_indexed_blocks(address, len(cache.keys))

    def drop(self, address: str) -> bool:
        """Forget the worker's report (its subscription ended); True if there was one."""
        telemetry.note_indexed_blocks(address, None)
        return self.caches.pop(address, None) is not None

    def layouts(self) -> set[Layout]:
        return {cache.layout for cache in self.caches.values()}

    def matched(self, address: str, blocks: PromptBlocks) -> int | None:
        """Tokens of the prompt's leading blocks the worker holds; None when it does not report (the approximate
        index judges it then)."""
        cache = self.caches.get(address)
        keys = None if cache is None else blocks.keys.get(cache.layout)
        if cache is None or keys is None:
            return None
        held = 0
        for key in keys:
            if key not in cache.keys:
                break
            held += 1
        return min(held * cache.block_tokens, blocks.tokens)


class RoutingTokenizer:
    """Tokenizers by model name, each loaded once (a failure too: logged, then the model is not looked up), used
    on one thread of their own."""

    def __init__(self, name: str = "", load: Callable[[str], PreTrainedTokenizerBase] | None = None):
        self.name = name  # --prefix-routing-tokenizer: this one whatever the workers serve ("" = theirs)
        self._load = load
        self._tokenizers: dict[str, PreTrainedTokenizerBase] = {}
        self._loads: dict[str, asyncio.Future[bool]] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="routing-tokenizer")

    def model_for(self, reported: str) -> str:
        return self.name or reported

    async def ensure(self, model: str) -> bool:
        """Load `model`'s tokenizer if it was never tried (once, whoever asks first); whether it is usable."""
        if model not in self._loads:
            self._loads[model] = asyncio.ensure_future(self._load_in_thread(model))
        return await asyncio.shield(self._loads[model])  # (a cancelled watcher does not cancel the others' load)

    async def _load_in_thread(self, model: str) -> bool:
        try:
            loaded = await asyncio.get_running_loop().run_in_executor(self._executor, self._load_one, model)
        except Exception as error:  # offline hub, unknown name: exact routing is off for this model
            log.warning("no tokenizer for %r (%s): KV-aware routing uses the approximate index", model, error)
            return False
        self._tokenizers[model] = loaded
        return True

    def _load_one(self, model: str) -> PreTrainedTokenizerBase:
        if self._load is not None:
            return self._load(model)
        from disagg.model.loading import load_tokenizer  # transformers: only in a gateway that routes exactly

        return load_tokenizer(model)

    async def blocks(self, model: str, request: worker_pb2.PrefillRequest, layouts: set[Layout]) -> PromptBlocks | None:
        """The request's prompt (+ tokens already generated) as block keys per layout; None when the prompt does
        not tokenize (the worker will say why) or there is no tokenizer."""
        tokenizer = self._tokenizers.get(model)
        if tokenizer is None:
            return None

        def compute() -> PromptBlocks | None:
            try:
                ids = request_token_ids(tokenizer, model, request) + list(request.generated_token_ids)
            except InvalidRequest:
                return None
            return PromptBlocks(len(ids), {(fp, bt): block_keys(ids, fp, bt) for fp, bt in layouts})

        return await asyncio.get_running_loop().run_in_executor(self._executor, compute)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class KvEventWatchers:
    """One WatchKvEvents subscription per prefill worker of the pool, feeding `index` (module docstring)."""

    def __init__(
        self,
        pool: WorkerPool[Any],
        index: ExactIndex,
        tokenizer: RoutingTokenizer,
        on_new_instance: Callable[[str], object] = lambda address: None,
        backoff: tuple[float, float] = (0.1, 5.0),
        retry_not_reporting: float = 30.0,
    ):
        self.pool, self.index, self.tokenizer = pool, index, tokenizer
        self.on_new_instance = on_new_instance  # a worker restarted: what was guessed about its cache is wrong
        self.backoff, self.retry_not_reporting = backoff, retry_not_reporting
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._instances: dict[str, str] = {}  # address -> the last instance id it reported
        self._not_reporting: set[str] = set()  # (logged once)

    def sync(self) -> None:
        """A subscription for every worker in rotation; none for the ones gone from DNS (draining, closed)."""
        for address, worker in self.pool.workers.items():
            if address not in self._tasks:
                self._tasks[address] = asyncio.create_task(self._watch(worker), name=f"kv-events {address}")
        for address in [a for a in self._tasks if a not in self.pool.workers]:
            self._tasks.pop(address).cancel()
            self.index.drop(address)

    async def run(self, interval: float) -> None:
        """Keep the subscriptions in step with the pool (it re-resolves DNS every health interval)."""
        while True:
            self.sync()
            await asyncio.sleep(interval)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self.tokenizer.close()

    async def _watch(self, worker: Worker[Any]) -> None:
        delay = self.backoff[0]
        while True:
            wait = None
            try:
                await self._follow(worker)  # ends cleanly when the worker stops
            except NotReporting as why:
                if worker.address not in self._not_reporting:
                    log.info("prefill worker %s reports no KV events (%s): approximate index", worker.address, why)
                    self._not_reporting.add(worker.address)
                wait = self.retry_not_reporting
            except grpc.aio.AioRpcError as error:
                log.debug("KV events of %s: %s %s", worker.address, error.code().name, error.details())
            finally:
                reported = self.index.drop(worker.address)
            if reported:
                log.info("prefill worker %s: KV event stream ended; its exact entries dropped", worker.address)
                self._not_reporting.discard(worker.address)
            await asyncio.sleep(delay if wait is None else wait)
            delay = self.backoff[0] if reported else min(2 * delay, self.backoff[1])

    async def _follow(self, worker: Worker[Any]) -> None:
        """One subscription, until it ends. Raises NotReporting, or AioRpcError when it breaks."""
        call = worker.stub.WatchKvEvents(worker_pb2.WatchKvEventsRequest())
        try:
            async for message in call:
                kind = message.WhichOneof("event")
                if kind == "snapshot":
                    self.index.reset(worker.address, await self._snapshot(worker.address, message.snapshot))
                elif kind == "events" and worker.address in self.index.caches:
                    self.index.apply(worker.address, message.events.stored, message.events.removed)
                else:
                    raise NotReporting(f"{kind or 'an empty message'} before any snapshot")
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise NotReporting("UNIMPLEMENTED") from error
            raise
        finally:
            call.cancel()

    async def _snapshot(self, address: str, snapshot: worker_pb2.KvCacheSnapshot) -> ReportedCache:
        if snapshot.block_tokens < 1 or not snapshot.model_fingerprint or not snapshot.instance_id:
            raise NotReporting(f"snapshot without block size, fingerprint or instance id: {snapshot}")
        model = self.tokenizer.model_for(snapshot.model)
        if not await self.tokenizer.ensure(model):
            raise NotReporting(f"no tokenizer for {model!r}")
        if self._instances.get(address, snapshot.instance_id) != snapshot.instance_id:
            log.info("prefill worker %s restarted (new instance %s): its cache is new", address, snapshot.instance_id)
            self.on_new_instance(address)
        self._instances[address] = snapshot.instance_id
        return ReportedCache(
            snapshot.instance_id,
            snapshot.model,
            snapshot.model_fingerprint,
            snapshot.block_tokens,
            set(snapshot.block_keys),
        )
