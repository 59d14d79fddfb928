"""`disagg bench`'s workloads: prompts of exact token lengths, shared prefixes, conversations, arrivals, mixes."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.workloads import (
    Workload,
    arrival_delays,
    fit_long_prompt,
    long_positions,
    make_conversations,
    make_mixed_prompts,
    make_prompts,
    make_shared_system_prompts,
    next_turn_prompt,
)


def test_prompts_have_exactly_the_asked_tokens_after_a_text_round_trip(gpt2_model):
    tok = gpt2_model.tokenizer
    prompts = make_prompts(tok, 5, 37, seed=3)
    assert len({tuple(p) for p in prompts}) == 5
    for ids in prompts:
        assert len(ids) == 37 and tok.encode(tok.decode(ids)) == ids


def test_shared_system_prompts_share_exact_prefixes(gpt2_model):
    tok = gpt2_model.tokenizer
    prompts = make_shared_system_prompts(tok, 7, 3, 40, 9, seed=1)
    assert len(prompts) == 7
    for i, ids in enumerate(prompts):
        assert len(ids) == 49 and tok.encode(tok.decode(ids)) == ids  # the gateway sees exactly these tokens
        assert ids[:40] == prompts[i % 3][:40]
    assert len({tuple(p[:40]) for p in prompts}) == 3  # 3 system prompts
    assert len({tuple(p[40:]) for p in prompts}) == 7  # every user turn its own


def test_multi_turn_histories_grow_by_the_reply_and_the_user_turn(gpt2_model):
    tok = gpt2_model.tokenizer
    conversations = make_conversations(tok, 2, 4, 11, seed=2)
    assert [len(c) for c in conversations] == [4, 4]
    assert len({tuple(t) for c in conversations for t in c}) == 8
    replies = make_prompts(tok, 4, 5, seed=9)  # stand-ins for the server's replies, of a known length
    prompt, expected = "", 0
    previous: list[int] = []
    for t, user in enumerate(conversations[0]):
        prompt = next_turn_prompt(prompt, tok.decode(replies[t - 1]) if t else "", tok.decode(user))
        ids = tok.encode(prompt)
        expected += (5 if t else 0) + 11
        assert len(ids) == expected  # the whole history, exactly
        assert ids[: len(previous)] == previous  # the previous turn's prompt is a token prefix: cacheable
        assert ids[-11:] == user
        previous = ids
    assert expected == 4 * 11 + 3 * 5


def test_poisson_arrivals_have_the_asked_rate():
    gaps = arrival_delays(Workload(4000, 8, 8, concurrency=10, request_rate=20.0, seed=1))
    assert np.mean(gaps) == pytest.approx(1 / 20, rel=0.05)
    assert arrival_delays(Workload(3, 8, 8)) == [0.0, 0.0, 0.0]


def test_long_positions_have_the_exact_share_and_depend_only_on_the_seed():
    marks = long_positions(50, 0.2, seed=1)
    assert len(marks) == 50 and sum(marks) == 10
    assert long_positions(50, 0.2, seed=1) == marks
    assert long_positions(50, 0.2, seed=2) != marks
    assert not any(long_positions(7, 0.0)) and all(long_positions(7, 1.0))
    with pytest.raises(ValueError, match="long fraction"):
        long_positions(10, 1.5)


def test_mixed_prompts_have_the_asked_lengths_at_the_seeded_places(gpt2_model):
    tok = gpt2_model.tokenizer
    prompts = make_mixed_prompts(tok, 20, 12, 70, 0.25, seed=4)
    assert [len(p) for p in prompts] == [70 if long else 12 for long in long_positions(20, 0.25, seed=4)]
    assert sum(len(p) == 70 for p in prompts) == 5
    assert len({tuple(p) for p in prompts}) == 20
    assert all(tok.encode(tok.decode(ids)) == ids for ids in prompts)  # the gateway sees exactly these lengths
    assert make_mixed_prompts(tok, 20, 12, 70, 0.25, seed=4) == prompts


def test_long_prompts_are_cut_to_leave_room_for_the_output():
    assert fit_long_prompt(1000, 64, 64, context_length=1024) == 960  # distilgpt2's 1,024 positions
    assert fit_long_prompt(500, 64, 64, context_length=1024) == 500
    with pytest.raises(ValueError, match="exceed the model's context of 1024"):
        fit_long_prompt(1000, 1000, 64, context_length=1024)
