"""Log-probabilities of generated and prompt tokens: log-softmax of the model's raw logits (before temperature,
top-k, top-p and any grammar's mask).

The prefill worker computes the first token's from the prefill logits, the decode worker one per step, with the
same function, so every position of a sequence is reported the same way wherever it was made.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

MAX_TOP_LOGPROBS = 20  # as the OpenAI API


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated token's log-probability and the `top` most likely tokens at its position (most likely first)."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (token id, text, logprob)


def token_text(tokenizer: Any, token_id: int) -> str:
    """A token's text on its own (a piece of a multi-byte character decodes to U+FFFD)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _from_row(log_probs: torch.Tensor, token: int, top_n: int, tokenizer: Any) -> TokenLogprobs:
    top: list[tuple[int, str, float]] = []
    if top_n > 0:
        values, ids = torch.topk(log_probs, min(top_n, log_probs.shape[-1]))
        top = [(i, token_text(tokenizer, i), v) for i, v in zip(ids.tolist(), values.tolist())]
    return TokenLogprobs(token, token_text(tokenizer, token), float(log_probs[token]), top)


def token_logprobs(logits: torch.Tensor, token: int, top_n: int, tokenizer: Any) -> TokenLogprobs:
    """From one position's logits [vocab]."""
    return _from_row(torch.log_softmax(logits.float(), dim=-1), token, top_n, tokenizer)


def batch_logprobs(
    logits: torch.Tensor, tokens: Sequence[int], params: Sequence[Any], tokenizer: Any
) -> list[TokenLogprobs | None]:
    """Per row of a decode step's logits [rows, vocab]: the sampled token's logprobs, None where not asked."""
    wanted = [i for i, p in enumerate(params) if p.logprobs]
    result: list[TokenLogprobs | None] = [None] * len(params)
    if not wanted:
        return result
    log_probs = torch.log_softmax(logits[wanted].float(), dim=-1)
    for row, i in enumerate(wanted):
        result[i] = _from_row(log_probs[row], tokens[i], params[i].top_logprobs, tokenizer)
    return result


PROMPT_LOGPROBS_CHUNK = 256  # positions whose logits [chunk, vocab] exist at once (~51 MB for GPT-2's vocabulary)


def prompt_logprobs(
    position_logits: Callable[[int, int], torch.Tensor],
    tokens: Sequence[int],
    top_n: int,
    tokenizer: Any,
    chunk: int = PROMPT_LOGPROBS_CHUNK,
) -> list[TokenLogprobs]:
    """Each prompt token's log-probability given the tokens before it, with the `top_n` most likely tokens at its
    position; nothing predicts the first token: its logprob is NaN, with no alternatives. `position_logits(start,
    end)` gives the float32 logits of positions start..end-1, position i predicting token i + 1; they are computed
    and dropped a chunk of positions at a time."""
    texts: dict[int, str] = {}

    def text(token_id: int) -> str:
        if token_id not in texts:
            texts[token_id] = token_text(tokenizer, token_id)
        return texts[token_id]

    result = [TokenLogprobs(tokens[0], text(tokens[0]), math.nan)] if tokens else []
    for start in range(0, len(tokens) - 1, chunk):
        end = min(start + chunk, len(tokens) - 1)
        log_probs = torch.log_softmax(position_logits(start, end).float(), dim=-1)
        targets = torch.tensor(tokens[start + 1 : end + 1], dtype=torch.long, device=log_probs.device)
        chosen = log_probs.gather(1, targets[:, None])[:, 0].tolist()
        tops: list[list[tuple[int, str, float]]] = [[] for _ in chosen]
        if top_n > 0:
            values, ids = torch.topk(log_probs, min(top_n, log_probs.shape[-1]), dim=-1)
            tops = [
                [(i, text(i), v) for i, v in zip(row_ids, row_values)]
                for row_ids, row_values in zip(ids.tolist(), values.tolist())
            ]
        for token, logprob, top in zip(tokens[start + 1 : end + 1], chosen, tops):
            result.append(TokenLogprobs(token, text(token), logprob, top))
    return result
