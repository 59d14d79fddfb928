"""Prompt logprobs from the prefill forward pass (disagg.model.logprobs.prompt_logprobs): every position within 1e-4
of log-softmax of HF's own logits, with either head, in a left-padded batch, and through the prefill engine with
a prefix cache holding the prompt's beginning (bypassed for such a request, then filled as usual)."""

from __future__ import annotations

import math

import pytest
import torch

from disagg.config import BatchPolicy
from disagg.engine.prefill import PrefillEngine, PrefillJob, PrefillResult
from disagg.kv.prefix_cache import PrefixCache
from disagg.model.lm_head import greedy_head
from disagg.model.loading import LoadedModel
from disagg.model.logprobs import prompt_logprobs, token_text
from disagg.model.output_stream import OutputStream
from disagg.model.prefill import prefill
from disagg.model.sampling import SamplingParams

TEXTS = ["Hi there", "The capital of France is Paris, and the capital of Italy is", "def fib(n):"]


def hf_log_softmax(lm: LoadedModel, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab]: log-softmax of the model's own logits, the whole prompt alone."""
    with torch.inference_mode():
        return torch.log_softmax(lm.model(torch.tensor([tokens])).logits[0].float(), dim=-1)


def assert_matches_hf(lm: LoadedModel, tokens: list[int], got: list, top_n: int) -> None:
    reference = hf_log_softmax(lm, tokens)
    assert [lp.token_id for lp in got] == tokens
    assert math.isnan(got[0].logprob) and not got[0].top  # nothing predicts the first token
    for position, lp in enumerate(got[1:]):  # token position + 1, predicted at `position`
        assert abs(lp.logprob - float(reference[position, tokens[position + 1]])) < 1e-4
        assert lp.token == token_text(lm.tokenizer, tokens[position + 1])
        values, ids = torch.topk(reference[position], top_n)
        assert len(lp.top) == top_n
        for (top_id, _, top_value), value in zip(lp.top, values.tolist()):
            assert abs(top_value - value) < 1e-4
            assert abs(float(reference[position, top_id]) - top_value) < 1e-4  # (the same token, ties aside)


@pytest.mark.parametrize("model", ["gpt2_model", "llama_model"])
@pytest.mark.parametrize("screen", ["off", "bf16"])
def test_every_position_matches_hf_in_a_padded_batch(request, model, screen):
    lm: LoadedModel = request.getfixturevalue(model)
    prompts = [lm.tokenizer.encode(t) for t in TEXTS]
    outputs = prefill(lm.model, prompts, want_kv=True, head=greedy_head(lm.model, screen), all_positions=[1, 0, 1])
    assert outputs[1].positions is None  # only the rows that asked keep every position
    for row in (0, 2):
        got = prompt_logprobs(outputs[row].position_logits, prompts[row], 3, lm.tokenizer, chunk=4)
        assert_matches_hf(lm, prompts[row], got, 3)
    first = outputs[0]  # the first token is picked as without prompt logprobs
    plain = prefill(lm.model, [prompts[0]], want_kv=False)[0]
    assert first.first_token(SamplingParams(4), 0) == int(torch.argmax(plain.logits))


def run(engine: PrefillEngine, lm: LoadedModel, tokens: list[int], prompt_top: int | None) -> PrefillResult:
    results: list[PrefillResult] = []

    def deliver(result: PrefillResult | BaseException) -> None:
        assert not isinstance(result, BaseException), result
        results.append(result)

    output = OutputStream(lm.tokenizer, SamplingParams(max_new_tokens=4), lm.eos_token_ids)
    engine.submit(PrefillJob("r", tokens, output, deliver, prompt_logprobs=prompt_top))
    while engine.waiting:
        engine.run_once()
    return results[0]


@pytest.mark.parametrize("model", ["gpt2_model", "llama_model"])
def test_a_cached_prefix_is_bypassed_for_prompt_logprobs(request, model):
    """With the prompt's first blocks in the cache, a request for prompt logprobs computes the whole prompt (its
    cached_tokens 0) and still matches HF everywhere; the next request without them hits the cache as before."""
    lm: LoadedModel = request.getfixturevalue(model)
    cache = PrefixCache(lm.fingerprint, 64 << 20, block_tokens=4)
    engine = PrefillEngine(lm, BatchPolicy(max_batch_size=4), prefix_cache=cache)
    tokens = lm.tokenizer.encode("The capital of France is Paris, and the capital of Italy is Rome. The capital")
    warm = run(engine, lm, tokens[:12], None)
    assert warm.prompt_logprobs is None and len(cache) == 3
    with_logprobs = run(engine, lm, tokens, 2)
    assert with_logprobs.cached_tokens == 0
    assert with_logprobs.prompt_logprobs is not None
    assert_matches_hf(lm, tokens, with_logprobs.prompt_logprobs, 2)
    without = run(engine, lm, tokens, None)
    assert without.cached_tokens == 16 and without.first_token == with_logprobs.first_token
