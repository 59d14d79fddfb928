"""The prefill forward pass over a batch of prompts of different lengths (left-padded).

Only the last position's logits are computed (`logits_to_keep=1`: half the prefill time on a CPU); each prompt's
KV cache comes back unpadded, ready for the codec. With a split head (disagg.model.lm_head) the pass runs the body
only: the exact greedy screen picks every prompt's greedy first token at once, and the float32 logits are computed
only for a prompt whose first token is sampled, constrained by a grammar or needs logprobs.

A prompt that asks for prompt logprobs (`all_positions`) keeps every position's output: the body's hidden states
when the head splits from it (the logits are computed a slice at a time, disagg.model.logprobs.prompt_logprobs),
otherwise the model's logits at every position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import DynamicCache, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from disagg.model.grammar import SequenceGrammar, mask_rows
from disagg.model.kv_layers import KvLayers
from disagg.model.lm_head import ExactGreedyHead, LmHead, splittable
from disagg.model.sampling import SamplingParams, sample_token


@dataclass
class PrefillOutput:
    """One prompt's result: what chooses its first token, and its KV cache (None when off).

    From the model's own forward pass, `logits`; from a split head's, the last hidden state, the greedy token the
    head picked (its screen: None for a plain head), and the logits computed on first use.
    """

    kv: KvLayers | None
    _logits: torch.Tensor | None = None  # [vocab], float32
    hidden: torch.Tensor | None = None  # [hidden], with `head`
    head: LmHead | None = None
    greedy_token: int | None = None
    # With all_positions: every position's hidden state [tokens, hidden] (with `positions_head`), or logits
    # [tokens, vocab]; position i predicts token i + 1.
    positions: torch.Tensor | None = None
    positions_head: LmHead | None = None

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            assert self.head is not None and self.hidden is not None, "a PrefillOutput holds logits or hidden"
            self._logits = self.head.logits(self.hidden[None])[0]
        return self._logits

    def position_logits(self, start: int, end: int) -> torch.Tensor:
        """Float32 logits of positions start..end-1 [end - start, vocab] (needs all_positions)."""
        assert self.positions is not None, "prefill(..., all_positions) keeps every position"
        rows = self.positions[start:end]
        return self.positions_head.logits(rows) if self.positions_head is not None else rows.float()

    def first_token(self, params: SamplingParams, step: int, grammar: SequenceGrammar | None = None) -> int:
        """The token for output position `step` (as `sample_token` picks it from the logits, masked by `grammar`)."""
        if grammar is None and params.greedy and self.greedy_token is not None:
            return self.greedy_token
        logits = self.logits
        if grammar is not None:
            logits = logits.clone()[None]
            mask_rows(logits, [0], [grammar])
            logits = logits[0]
        return sample_token(logits, params, step)


def _last_position(
    model: PreTrainedModel, head: LmHead | None, all_positions: bool = False, **inputs: Any
) -> tuple[Any, list[tuple[torch.Tensor | None, torch.Tensor | None, int | None]], torch.Tensor | None]:
    """The forward pass (the model's own, or its body when a head is given): (its output, for the cache), per
    row (logits, hidden, greedy token) of the last position, and with `all_positions` every position's hidden
    state [rows, length, hidden] (logits [rows, length, vocab] without a head)."""
    if head is None:
        out = model(**inputs, logits_to_keep=0 if all_positions else 1)
        logits = out.logits[:, -1, :].float()
        return out, [(row, None, None) for row in logits], out.logits if all_positions else None
    out = model.base_model(**inputs)
    hidden = out.last_hidden_state[:, -1, :]
    greedy = head.greedy(hidden) if isinstance(head, ExactGreedyHead) else [None] * hidden.shape[0]
    every = out.last_hidden_state if all_positions else None
    return out, [(None, row, token) for row, token in zip(hidden, greedy)], every


def left_padded(sequences: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) for sequences left-padded to the longest one.

    Positions count real tokens only, so a padded row computes exactly what it would alone.
    """
    longest = max(len(s) for s in sequences)
    input_ids = torch.zeros((len(sequences), longest), dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, tokens in enumerate(sequences):
        input_ids[row, longest - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
        mask[row, longest - len(tokens) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), mask.to(device), positions.to(device)


class _LayerReportingCache(DynamicCache):
    """A DynamicCache that reports each layer as soon as the forward pass has written its K and V (layer-wise
    streaming: during a prefill, a layer's cache entry is final once its attention has stored it)."""

    def __init__(self, config: PreTrainedConfig, on_layer: Callable[[int, torch.Tensor, torch.Tensor], None]):
        super().__init__(config=config)
        self._on_layer = on_layer

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        result = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = cast(DynamicLayer, self.layers[layer_idx])  # (a DynamicCache's layers are DynamicLayers)
        assert layer.keys is not None and layer.values is not None  # just stored by update
        self._on_layer(layer_idx, layer.keys, layer.values)
        return result


@torch.inference_mode()
def prefill(
    model: PreTrainedModel,
    prompts: list[list[int]],
    *,
    want_kv: bool = True,
    on_layer: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    head: LmHead | None = None,
    all_positions: Sequence[bool] = (),
) -> list[PrefillOutput]:
    """Run the prompts through the model together; returns one PrefillOutput per prompt, in order (`head`: the
    split head to finish with, see the module docstring; None: the model's own forward pass).

    `on_layer(row, layer, keys, values)`, if given, receives each prompt's unpadded K and V of each layer while the
    forward pass continues with the later layers (called on this thread). The prompts marked in `all_positions`
    keep every position's output (PrefillOutput.position_logits), for their prompt logprobs.
    """
    every = any(all_positions)
    if every and head is None and splittable(model):  # the body's hidden states, a head for slices of them
        head = LmHead(model)
    device = next(model.parameters()).device
    input_ids, mask, positions = left_padded(prompts, device)
    cache: _LayerReportingCache | None = None
    if want_kv and on_layer is not None:

        def report(layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
            for row, tokens in enumerate(prompts):
                start = input_ids.shape[1] - len(tokens)
                on_layer(
                    row,
                    layer,
                    keys[row : row + 1, :, start:].contiguous(),
                    values[row : row + 1, :, start:].contiguous(),
                )

        cache = _LayerReportingCache(model.config, report)
    out, lasts, position_outputs = _last_position(
        model,
        head,
        every,
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=want_kv,
        **({"cache": cache} if cache is not None else {}),
    )
    results = []
    for row, tokens in enumerate(prompts):
        kv = None
        if want_kv:
            start = input_ids.shape[1] - len(tokens)
            kv = [
                (layer.keys[row : row + 1, :, start:].contiguous(), layer.values[row : row + 1, :, start:].contiguous())
                for layer in out.cache.layers
            ]
        logits, hidden, greedy = lasts[row]
        result = PrefillOutput(kv, logits, hidden, head, greedy)
        if position_outputs is not None and row < len(all_positions) and all_positions[row]:
            result.positions = position_outputs[row, input_ids.shape[1] - len(tokens) :]
            result.positions_head = head
        results.append(result)
    return results


@torch.inference_mode()
def prefill_after_prefix(
    model: PreTrainedModel,
    tokens: list[int],
    prefix: KvLayers,
    *,
    on_layer: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    head: LmHead | None = None,
) -> PrefillOutput:
    """One prompt whose first P tokens' KV is known (`prefix`, each [1, kv_heads, P, head_dim]): only the other
    tokens go through the model, attending to the prefix. Returns the whole prompt's KV, as `prefill` does.

    `on_layer(layer, keys, values)`, if given, receives each layer's whole K and V (prefix included) while the
    forward pass continues.
    """
    known = prefix[0][0].shape[2]
    if not 0 < known < len(tokens):
        raise ValueError(f"a prefix of {known} tokens for a prompt of {len(tokens)}: at least one must be computed")
    device = next(model.parameters()).device
    cache = _LayerReportingCache(model.config, on_layer) if on_layer is not None else DynamicCache(config=model.config)
    for layer, (keys, values) in enumerate(prefix):
        DynamicCache.update(cache, keys.to(device), values.to(device), layer)  # (not reported: the prefix is known)
    suffix = torch.tensor([tokens[known:]], dtype=torch.long, device=device)
    out, lasts, _ = _last_position(
        model,
        head,
        input_ids=suffix,
        attention_mask=torch.ones((1, len(tokens)), dtype=torch.long, device=device),
        position_ids=torch.arange(known, len(tokens), dtype=torch.long, device=device).unsqueeze(0),
        cache=cache,
        use_cache=True,
    )
    kv = [(layer.keys.contiguous(), layer.values.contiguous()) for layer in out.cache.layers]
    logits, hidden, greedy = lasts[0]
    return PrefillOutput(kv, logits, hidden, head, greedy)
