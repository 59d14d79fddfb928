"""A prefill after prefix-cache hits, for the prefill and aggregated engines: in the cache's own pool where the
native runner runs (the hits' blocks read where they are, the prompts' new KV written once into blocks the cache
then keeps: no KV copied into or out of the cache), else with the hits' KV copied in and the prompts' copied into
the cache afterwards (HF's forward pass, or a pool with no room for them now).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from disagg.kv.prefix_cache import PrefixCache, PrefixHit
from disagg.model.loading import LoadedModel
from disagg.model.native_prefill import Prefiller
from disagg.model.prefill import PrefillOutput

LayerSink = Callable[[int, int, torch.Tensor, torch.Tensor], None]  # (row, layer, keys, values)


class CachedPrefill:
    """An engine's prefill with its prefix cache (None: no cache, every prompt computed whole)."""

    def __init__(self, lm: LoadedModel, prefiller: Prefiller, cache: PrefixCache | None):
        self.prefiller, self.cache = prefiller, cache
        if cache is not None and prefiller.native is not None:  # the pool, sized to the budget, mapped lazily
            cache.bind(*lm.kv_shape(), lm.dtype, lm.device)

    def acquire(self, input_ids: list[int], bypass: bool = False) -> PrefixHit:
        """The cached prefix of a prompt, pinned (nothing with `bypass`: a prompt that needs every position)."""
        if self.cache is None or bypass:
            return PrefixHit()
        return self.cache.acquire(input_ids)

    def release(self, hits: Sequence[PrefixHit]) -> None:
        if self.cache is not None:
            for hit in hits:
                self.cache.release(hit)

    def run(
        self,
        prompts: list[list[int]],
        hits: Sequence[PrefixHit],
        *,
        want_kv: bool = True,
        on_layer: LayerSink | None = None,
        all_positions: Sequence[bool] = (),
    ) -> tuple[list[PrefillOutput], Callable[[], object]]:
        """One forward pass of `prompts`, each after its hit (one prompt at a time when it has one, outside the
        cache's pool); returns the outputs and `keep`, to call once their first tokens have left: it gives the
        prompts' full blocks to the cache."""
        cache = self.cache
        tables = cache.place(prompts, hits) if cache is not None and self.prefiller.native is not None else None
        if cache is not None and tables is not None:
            assert cache.storage is not None
            try:
                outputs = self.prefiller.batch(
                    prompts,
                    want_kv=want_kv,
                    on_layer=on_layer,
                    all_positions=all_positions,
                    placed=(cache.storage, tables),
                )
            except BaseException:
                cache.drop(tables)
                raise
            return outputs, lambda: cache.keep(prompts, tables)
        if any(hit.blocks for hit in hits):
            assert len(prompts) == 1, "a prompt after a cached prefix is prefilled alone outside the cache's pool"
            rows = None if on_layer is None else (lambda layer, keys, values: on_layer(0, layer, keys, values))
            outputs = [self.prefiller.after_prefix(prompts[0], hits[0].kv(), on_layer=rows)]
        else:
            outputs = self.prefiller.batch(prompts, want_kv=want_kv, on_layer=on_layer, all_positions=all_positions)

        def insert() -> None:
            if cache is not None:
                for ids, out in zip(prompts, outputs):
                    if out.kv is not None:
                        cache.insert(ids, out.kv)

        return outputs, insert
