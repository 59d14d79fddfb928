"""Which waiting prompts go through one left-padded prefill forward pass together (both prefill engines).

Every row of a left-padded batch costs as much as the longest one, so a 64-token prompt batched with a 960-token
one costs 960 tokens of compute, and the long one's forward pass pays for it: with 20% long prompts, a batch of
four short and one long prompt computed 4,800 tokens for 1,216 real ones. Prompts are therefore batched only with
prompts of similar length (within `MAX_LENGTH_RATIO` of each other); the others keep their place in the queue
for the next pass, which the first of them in service order (priority, then arrival: disagg.engine.queueing)
leads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

MAX_LENGTH_RATIO = 2.0  # longest / shortest prompt of one batch: at most half of any row is padding


def similar_length_batch(
    lengths: Sequence[int],
    token_budget: int,
    max_prompts: int,
    fits: Callable[[int], bool] = lambda index: True,
    max_ratio: float = MAX_LENGTH_RATIO,
) -> list[int]:
    """Indices (into the queue, in service order) of the prompts to prefill together.

    The first prompt always goes, however long (it is never starved); a later one joins when its length is within
    `max_ratio` of the batch's shortest and longest, the padded batch (prompts x longest) stays within
    `token_budget`, and `fits(index)` (the caller's own limit, e.g. free decode rows) agrees.
    """
    if not lengths or max_prompts < 1 or not fits(0):
        return []
    taken, shortest, longest = [0], lengths[0], lengths[0]
    for index in range(1, len(lengths)):
        if len(taken) >= max_prompts:
            break
        length = lengths[index]
        low, high = min(shortest, length), max(longest, length)
        if high > max_ratio * low or high * (len(taken) + 1) > token_budget or not fits(index):
            continue
        taken.append(index)
        shortest, longest = low, high
    return taken


def take_indices(queue: list, indices: Sequence[int]) -> tuple[list, list]:
    """(the items at `indices`, the rest in their order)."""
    chosen = set(indices)
    return [queue[i] for i in indices], [item for i, item in enumerate(queue) if i not in chosen]
