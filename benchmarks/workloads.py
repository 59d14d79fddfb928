"""What a benchmark sends: the workload's shape and its prompt sets, built so the gateway sees exactly the asked
token counts.

Workloads: `random` (distinct prompts of `prompt_tokens`), `shared-system-prompt` (request i = system prompt i mod N
of `system_tokens` + a distinct user turn of `prompt_tokens`), `multi-turn` (conversations of `turns` turns, each
re-sending the whole history, i.e. the earlier user turns and replies, plus a new user turn of `prompt_tokens`; the
turns of one conversation are sequential, conversations run concurrently up to `concurrency`) and `mixed` (distinct
prompts, a `long_fraction` of them `long_prompt_tokens` long and the rest `prompt_tokens`: the long prefills are
what stalls an aggregated worker's running streams).
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

WORKLOADS = ("random", "shared-system-prompt", "multi-turn", "mixed")
PROMPT_WORDS = (
    "the", "model", "reads", "every", "token", "of", "the", "prompt", "once", "and", "then", "writes", "one", "at",
    "a", "time", "while", "cache", "keys", "values", "grows", "by", "column", "per", "step", "so", "batching",
    "many", "sequences", "keeps", "arithmetic", "units", "busy", "instead", "waiting",
)  # fmt: skip


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


@dataclass
class BenchPrompts:
    """What the drivers send: token ids (for the baselines), their texts, the multi-turn conversations' user turns
    (texts), and the warm-up prompts (distinct from the workload's where a cache could remember them)."""

    ids: list[list[int]]
    texts: list[str]
    conversations: list[list[str]] | list[list[list[int]]]  # user turns as text, or as ids (--history tokens)
    warmup: list[str]


def resolve_workload_defaults(args: argparse.Namespace) -> None:
    """The defaults that depend on --workload: 128 prompt tokens for random, 64-token user turns otherwise (the
    issue's 512 + 64 shape); 96 output tokens for multi-turn: 6 x 64 + 5 x 96 = 864 prompt tokens at the last turn,
    + 96 generated = 960, under GPT-2's 1,024 positions (128 would reach 1,152: past them, the decode worker fails)."""
    if args.prompt_tokens is None:
        args.prompt_tokens = 128 if args.workload == "random" else 64
    if args.output_tokens is None:
        args.output_tokens = 96 if args.workload == "multi-turn" else 64
    if args.workload == "multi-turn":
        args.conversations = args.conversations or max(1, args.num_requests // args.turns)
        args.num_requests = args.conversations * args.turns


def workload_from_args(args: argparse.Namespace) -> Workload:
    """The invocation's workload (at its first request rate), each kind's own fields set only for that kind."""
    return Workload(
        args.num_requests,
        args.prompt_tokens,
        args.output_tokens,
        args.concurrency,
        args.rates[0],
        args.ignore_eos,
        args.seed,
        kind=args.workload,
        system_prompts=args.system_prompts if args.workload == "shared-system-prompt" else 0,
        system_tokens=args.system_tokens if args.workload == "shared-system-prompt" else 0,
        turns=args.turns if args.workload == "multi-turn" else 1,
        history=args.history,
        long_fraction=args.long_fraction if args.workload == "mixed" else 0.0,
        long_prompt_tokens=args.long_prompt_tokens if args.workload == "mixed" else 0,
    )


def build_prompts(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> BenchPrompts:
    """The prompts of the invocation's workload, and warm-up prompts of the same shape."""

    def text(ids: list[int]) -> str:
        return cast(str, tokenizer.decode(ids))  # (one list of ids decodes to one str)

    conversations: list[list[str]] | list[list[list[int]]] = []
    if args.workload == "shared-system-prompt":
        ids = make_shared_system_prompts(
            tokenizer, args.num_requests, args.system_prompts, args.system_tokens, args.prompt_tokens, args.seed
        )
    elif args.workload == "multi-turn":
        turns = make_conversations(tokenizer, args.conversations, args.turns, args.prompt_tokens, args.seed)
        conversations = turns if args.history == "tokens" else [[text(t) for t in conv] for conv in turns]
        ids = [conv[0] for conv in turns]  # first turns: what the warm-up length and the record's prompt show
    elif args.workload == "mixed":
        ids = make_mixed_prompts(
            tokenizer, args.num_requests, args.prompt_tokens, args.long_prompt_tokens, args.long_fraction, args.seed
        )
    else:
        ids = make_prompts(tokenizer, args.num_requests, args.prompt_tokens, args.seed)
    texts = [text(i) for i in ids]
    # Prompts of their own, so that warming up does not fill the prefix cache (on by default) with the workload's.
    count = max(1, args.warmup_requests)
    if args.workload == "mixed":  # half long, half short: both kinds of forward pass warmed up
        warm = make_mixed_prompts(tokenizer, count, args.prompt_tokens, args.long_prompt_tokens, 0.5, args.seed + 7919)
    else:
        warm = make_prompts(tokenizer, count, len(ids[0]), args.seed + 7919)
    warmup = [text(i) for i in warm]
    return BenchPrompts(ids, texts, conversations, warmup)


def round_prompts(
    args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase, first: BenchPrompts, index: int
) -> BenchPrompts:
    """The prompts of round `index`: the first round's, then prompts of the same shape from another seed, so that a
    later round never finds an earlier round's prompts in the prefix cache (on by default)."""
    if index == 0:
        return first
    return build_prompts(argparse.Namespace(**{**vars(args), "seed": args.seed + 104_729 * index}), tokenizer)
