"""The split head (disagg.model.lm_head): the bfloat16 screen's greedy token is float32's argmax, including where
bfloat16 alone picks another token; the engines that use it stream what the float32 head streams, sampled and
logprob rows included."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from disagg.config import BatchPolicy
from disagg.engine.aggregated import AggregatedEngine, Prompt
from disagg.engine.decode import DecodeSequence, DecodeSetup, TokenEvent
from disagg.model.decode_batch import DecodeBatch
from disagg.model.lm_head import ExactGreedyHead, LmHead, greedy_head, splittable
from disagg.model.loading import LoadedModel
from disagg.model.output_stream import OutputStream
from disagg.model.prefill import prefill, prefill_after_prefix
from disagg.model.sampling import SamplingParams


def float32_argmax(head: LmHead, hidden: torch.Tensor) -> list[int]:
    return torch.argmax(hidden @ head.weight.T, dim=-1).tolist()


@pytest.mark.parametrize("model", ["gpt2_model", "llama_model"])
def test_screen_picks_float32_argmax_on_real_decode_states(request, model):
    """Hidden states of a real batch decoding (and the same states scaled up 30x: larger logits, looser bounds)."""
    lm: LoadedModel = request.getfixturevalue(model)
    head = ExactGreedyHead(lm.model)
    texts = ["The capital of France is", "def fib(n):", "Batching improves utilization because", "1, 2, 3,"]
    outs = prefill(lm.model, [lm.tokenizer.encode(t) for t in texts], want_kv=True)
    batch = DecodeBatch(*lm.kv_shape(), lm.dtype, lm.device)
    batch.add_many([(str(i), o.kv, int(o.logits.argmax())) for i, o in enumerate(outs)])
    for _ in range(12):
        hidden = batch.step_hidden(lm.model)
        expected = float32_argmax(head, hidden)
        assert head.greedy(hidden) == expected
        assert head.greedy(hidden * 30) == float32_argmax(head, hidden * 30)
        batch.set_last_tokens(expected)
    # The screen keeps few tokens: the bound is tight enough to be worth it
    assert head.rows == 12 * 2 * len(texts) and head.screened_tokens / head.rows < 64


@pytest.mark.parametrize("model", ["gpt2_model", "llama_model"])
def test_prefill_picks_first_tokens_with_the_screen(request, model):
    """Prompts of different lengths (left-padded) and one after a cached prefix: with the split head, the same KV,
    the greedy first token float32's, and the logits (computed on demand) the model's own."""
    lm: LoadedModel = request.getfixturevalue(model)
    head = greedy_head(lm.model, "bf16")
    texts = ["Hi", "The capital of France is Paris, and the capital of Italy is", "def fib(n):"]
    prompts = [lm.tokenizer.encode(t) for t in texts]
    plain = prefill(lm.model, prompts, want_kv=True)
    split = prefill(lm.model, prompts, want_kv=True, head=head)
    sampled = SamplingParams(4, temperature=0.7, seed=3)
    for a, b in zip(plain, split):
        assert b.greedy_token == int(torch.argmax(a.logits)) and b.first_token(SamplingParams(4), 0) == b.greedy_token
        assert b.first_token(sampled, 0) == a.first_token(sampled, 0)  # sampled: from the logits, made now
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
        assert all(torch.equal(x, y) for kv_a, kv_b in zip(a.kv, b.kv) for x, y in zip(kv_a, kv_b))
    ids, known = prompts[1], 8
    prefix = [(k[:, :, :known], v[:, :, :known]) for k, v in plain[1].kv]
    after = prefill_after_prefix(lm.model, ids, prefix, head=head)
    assert after.greedy_token == int(torch.argmax(prefill_after_prefix(lm.model, ids, prefix).logits))
    assert after.greedy_token == split[1].greedy_token  # the prompt's first token, with or without the prefix


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=64, n_layer=1, n_head=2, n_positions=32)).eval()


def test_screen_separates_tokens_bfloat16_cannot():
    """Token j's row is token i's plus a sliver along h: their logits differ by far less than bfloat16 resolves, so
    bfloat16's own argmax picks wrong about half the time; the screen keeps both and float32 decides."""
    model = tiny_gpt2()
    head = ExactGreedyHead(model)
    weight = head.weight  # the model's own tensor: changed in place, then the screen is rebuilt
    generator = torch.Generator().manual_seed(1)
    bfloat16_wrong = 0
    for trial in range(40):
        hidden = torch.randn(1, 64, generator=generator)
        with torch.no_grad():
            i = int(torch.argmax(hidden @ weight.T))
            j = (i + 1 + trial) % weight.shape[0]
            sign = 1.0 if trial % 2 == 0 else -1.0  # j just above i, or just below
            weight[j] = weight[i] + sign * 1e-4 * hidden[0] / hidden.norm() ** 2
        head = ExactGreedyHead(model)
        expected = float32_argmax(head, hidden)
        assert expected == [j if sign > 0 else i]
        assert head.greedy(hidden) == expected, trial
        bf16 = torch.argmax(head.screen_scores(hidden).float(), dim=-1).tolist()
        bfloat16_wrong += bf16 != expected
    assert bfloat16_wrong > 0  # (else this test would not tell the screen from a plain bfloat16 argmax)


def test_ties_go_to_the_lowest_token_id_as_argmax():
    model = tiny_gpt2()
    with torch.no_grad():
        model.get_output_embeddings().weight[300] = model.get_output_embeddings().weight[7]
    head = ExactGreedyHead(model)
    hidden = head.weight[7:8].clone() * 5  # token 7 (and its twin 300) score highest
    assert float32_argmax(head, hidden) == [7] and head.greedy(hidden) == [7]


def test_non_finite_hidden_falls_back_to_the_float32_argmax():
    head = ExactGreedyHead(tiny_gpt2())
    hidden = torch.randn(3, 64)
    hidden[1, 5] = float("nan")
    assert head.greedy(hidden)[0] == float32_argmax(head, hidden)[0]
    assert len(head.greedy(hidden)) == 3


def test_which_head_an_engine_gets(gpt2_model):
    assert splittable(gpt2_model.model)
    assert isinstance(greedy_head(gpt2_model.model, "bf16"), ExactGreedyHead)
    assert greedy_head(gpt2_model.model, "off") is None  # the model's own forward pass
    assert greedy_head(tiny_gpt2().to(torch.bfloat16), "bf16") is None  # nothing cheaper than a bf16 model
    with pytest.raises(ValueError, match="greedy screen"):
        greedy_head(gpt2_model.model, "fp8")


def run_engine(
    lm: LoadedModel, screen: str, requests: dict[str, tuple[list[int], SamplingParams]], kv_cache: bool = True
) -> dict:
    """Each request's tokens and logprobs through an aggregated engine, all in one batch."""
    engine = AggregatedEngine(lm, BatchPolicy(max_batch_size=8), DecodeSetup(kv_cache=kv_cache, greedy_screen=screen))
    out: dict[str, list[TokenEvent]] = {name: [] for name in requests}
    done = {name: threading.Event() for name in requests}
    for name, (ids, params) in requests.items():

        def deliver(event: TokenEvent | BaseException, name: str = name) -> None:
            assert not isinstance(event, BaseException), event
            out[name].append(event)
            if event.finish_reason:
                done[name].set()

        output = OutputStream(lm.tokenizer, params, lm.eos_token_ids)
        engine.submit_prompt(Prompt([DecodeSequence(name, ids, output, None, deliver)]))
    engine.start()
    try:
        for event in done.values():
            assert event.wait(120)
    finally:
        engine.stop()
    return {
        name: [(e.token, e.logprobs and round(e.logprobs.logprob, 4)) for e in events] for name, events in out.items()
    }


def test_engine_streams_the_same_with_and_without_the_screen(gpt2_model):
    """A batch mixing screened rows with rows that need full logits (sampled, logprobs): same tokens either way."""
    ids = gpt2_model.tokenizer.encode
    requests = {
        "greedy": (ids("Batching improves utilization"), SamplingParams(12, ignore_eos=True)),
        "sampled": (ids("The decode worker"), SamplingParams(12, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)),
        "logprobs": (ids("Hi"), SamplingParams(12, logprobs=True, top_logprobs=2, ignore_eos=True)),
        "greedy2": (ids("A prefill worker computes"), SamplingParams(12, ignore_eos=True)),
    }
    screened, plain = run_engine(gpt2_model, "bf16", requests), run_engine(gpt2_model, "off", requests)
    assert screened == plain
    # KV cache off (every step recomputes the sequence: RecomputeBatch's body): the same tokens again
    greedy = {name: requests[name] for name in ("greedy", "greedy2")}
    assert run_engine(gpt2_model, "bf16", greedy, kv_cache=False) == {name: plain[name] for name in greedy}
    assert all(len(tokens) == 12 for tokens in screened.values())
    assert screened["logprobs"][1][1] is not None
