"""Choosing the next token: greedy, temperature, top-k, top-p; pure functions of (logits, params, seed, step).

A sampled token depends only on the logits, the request's parameters, its seed and the token's index in the
output, never on which worker ran it or what else was in the batch. So a seeded request is reproducible run to
run, across batch compositions, and across a migration to another worker.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from disagg.model.grammar import GrammarSpec

_SEED_STRIDE = 0x9E3779B97F4A7C15  # odd (golden ratio): distinct sequence indices get distinct seeds


@dataclass(frozen=True)
class SamplingParams:
    """Resolved sampling and stopping parameters of one request (the domain twin of the proto message)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    n: int = 1  # sequences forked from one prefill
    logprobs: bool = False  # compute each token's log-probability
    top_logprobs: int = 0  # and this many alternatives
    grammar: GrammarSpec | None = None  # structured output: every token, the first included, masked by it
    prompt_logprobs: int | None = None  # each prompt token's logprob and this many alternatives (None: off)
    # Scheduling, not sampling: lower is served earlier (vLLM's sense), FIFO among equals. It rides here because
    # these parameters travel with the request to every queue it waits in.
    priority: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def for_sequence(params: SamplingParams, index: int) -> SamplingParams:
    """The parameters of sequence `index` of an n > 1 request: sequence 0 is the request itself (so n=1 and
    sequence 0 of n=3 give the same sample), the others sample with a seed derived from the request's."""
    if index == 0:
        return params
    return replace(params, seed=(params.seed + index * _SEED_STRIDE) % (2**63))


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Scaled logits of one row with everything outside top-k and the top-p nucleus set to -inf."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the most likely token always stays).
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    return logits


def sample_token(logits: torch.Tensor, params: SamplingParams, step: int) -> int:
    """The token for output position `step` of a request, from that position's logits (one row)."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(filter_logits(logits, params.temperature, params.top_k, params.top_p), dim=-1)
    generator = torch.Generator(device="cpu").manual_seed((params.seed * 1_000_003 + step) % (2**63))
    # Exponential race (as in gpt-fast and TGI): argmax(p / E) with E ~ Exp(1) samples from p.
    noise = torch.empty(probs.shape, dtype=torch.float32).exponential_(generator=generator)
    return int(torch.argmax(probs.cpu() / noise))


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> list[int]:
    """Next tokens for a batch of rows; greedy rows share one argmax."""
    greedy = torch.argmax(logits, dim=-1).tolist()
    return [greedy[i] if p.greedy else sample_token(logits[i], p, steps[i]) for i, p in enumerate(params)]
