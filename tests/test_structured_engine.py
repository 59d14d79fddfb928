"""Grammars, prompt logprobs and priority in the decode and aggregated engines, in process: grammar rows masked in
the batch while the other rows (greedy ones through the bf16 screen) get exactly the tokens they get without them;
the join queue in priority order; the aggregated engine's first token masked, its prompt logprobs, its prompts'
queue in priority order."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from disagg.config import BatchPolicy
from disagg.engine.aggregated import AggregatedEngine, Prompt
from disagg.engine.decode import DecodeEngine, DecodeSequence, DecodeSetup, TokenEvent
from disagg.model.grammar import REGEX, GrammarCompiler, GrammarSpec, json_schema_spec, model_grammars
from disagg.model.loading import LoadedModel
from disagg.model.output_stream import new_output
from disagg.model.prefill import prefill
from disagg.model.sampling import SamplingParams
from tests.test_prompt_logprobs import assert_matches_hf

DIGITS = GrammarSpec(REGEX, "[0-9]{12}")
SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "ok": {"type": "boolean"}},
    "required": ["id", "ok"],
    "additionalProperties": False,
}
TEXTS = ["The capital of France is", "Batching improves utilization because", "def fib(n):", "One two three four"]


class Runs:
    """What an engine (thread not started: run_once until idle) delivers, per sequence."""

    def __init__(self) -> None:
        self.events: dict[str, list[TokenEvent]] = {}
        self.order: list[str] = []  # sequences in the order the engine delivered their first event

    def deliver_to(self, name: str):
        self.events.setdefault(name, [])

        def deliver(event: TokenEvent | BaseException) -> None:
            assert not isinstance(event, BaseException), event
            if name not in self.order:
                self.order.append(name)
            self.events[name].append(event)

        return deliver

    def text(self, name: str) -> str:
        return "".join(e.text for e in self.events[name])


def handed_over(
    lm: LoadedModel, grammars: GrammarCompiler, runs: Runs, name: str, text: str, params: SamplingParams
) -> DecodeSequence:
    """A sequence as a decode worker receives it: the prompt's KV and the first token the prefill worker picked
    (masked by the grammar), from which the grammar's state is rebuilt."""
    ids = lm.tokenizer.encode(text)
    out = prefill(lm.model, [ids])[0]
    first = out.first_token(params, 0, new_output(lm.tokenizer, params, lm.eos_token_ids, grammars).grammar)
    output = new_output(lm.tokenizer, params, lm.eos_token_ids, grammars, [first])
    runs.events[name] = [TokenEvent(first, output.text, None)]  # (what the prefill worker sent)
    return DecodeSequence(name, ids, output, out.kv, runs.deliver_to(name))


def drain(engine: DecodeEngine) -> None:
    while engine.running or engine.waiting or getattr(engine, "prompts", None):
        engine.run_once()


@pytest.mark.parametrize("model", ["gpt2_model", "llama_model"])
@pytest.mark.parametrize("screen", ["bf16", "off"])
def test_grammar_rows_are_masked_and_the_others_untouched(request, model, screen):
    lm: LoadedModel = request.getfixturevalue(model)
    plain = SamplingParams(max_new_tokens=14, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=14, ignore_eos=True, temperature=1.0, seed=5)
    kinds = {
        "digits": SamplingParams(max_new_tokens=20, grammar=DIGITS),
        "json": SamplingParams(max_new_tokens=40, temperature=1.0, seed=9, grammar=json_schema_spec(SCHEMA)),
    }
    grammars, results = model_grammars(lm), {}
    for with_grammar in (False, True):
        runs = Runs()
        engine = DecodeEngine(lm, BatchPolicy(max_batch_size=8), DecodeSetup(greedy_screen=screen))
        rows = {"greedy": plain, "sampled": sampled}
        rows |= kinds if with_grammar else {"other-greedy": plain, "other-sampled": sampled}
        for (name, params), text in zip(rows.items(), TEXTS):
            engine.submit(handed_over(lm, grammars, runs, name, text, params))
        drain(engine)
        results[with_grammar] = runs
    for name in ("greedy", "sampled"):  # rows without a grammar: the same tokens, the grammar rows beside them or not
        assert [e.token for e in results[True].events[name]] == [e.token for e in results[False].events[name]]
    masked = results[True]
    assert re.fullmatch("[0-9]{12}", masked.text("digits")) and masked.events["digits"][-1].finish_reason == "eos"
    assert masked.events["json"][-1].finish_reason == "eos"
    jsonschema.validate(json.loads(masked.text("json")), SCHEMA)


def test_the_join_queue_admits_higher_priority_first(gpt2_model: LoadedModel):
    """One row at a time (max batch 1): sequences waiting to join go lowest priority value first, FIFO among equals."""
    runs, grammars = Runs(), model_grammars(gpt2_model)
    engine = DecodeEngine(gpt2_model, BatchPolicy(max_batch_size=1))
    for name, priority in [("low", 4), ("mid-1", 0), ("high", -3), ("mid-2", 0)]:
        params = SamplingParams(max_new_tokens=3, ignore_eos=True, priority=priority)
        engine.submit(handed_over(gpt2_model, grammars, runs, name, TEXTS[0], params))
    drain(engine)
    assert runs.order == ["high", "mid-1", "mid-2", "low"]


def test_the_aggregated_engine_masks_first_tokens_serves_prompt_logprobs_and_priority(gpt2_model: LoadedModel):
    lm = gpt2_model
    grammars = model_grammars(lm)
    runs = Runs()
    engine = AggregatedEngine(lm, BatchPolicy(max_batch_size=1))
    prompts = {}
    cases = [
        ("low", SamplingParams(max_new_tokens=3, ignore_eos=True, priority=2)),
        ("digits", SamplingParams(max_new_tokens=16, grammar=DIGITS, prompt_logprobs=2)),
        ("high", SamplingParams(max_new_tokens=3, ignore_eos=True, priority=-1)),
    ]
    for (name, params), text in zip(cases, TEXTS):
        ids = lm.tokenizer.encode(text)
        output = new_output(lm.tokenizer, params, lm.eos_token_ids, grammars)
        prompts[name] = Prompt([DecodeSequence(name, ids, output, None, runs.deliver_to(name))])
        prompts[name].prompt_logprobs = params.prompt_logprobs
        engine.submit_prompt(prompts[name])
    drain(engine)
    assert runs.order == ["high", "digits", "low"]
    assert re.fullmatch("[0-9]{12}", runs.text("digits"))
    got = prompts["digits"].prompt_logprob_values
    assert got is not None
    assert_matches_hf(lm, lm.tokenizer.encode(TEXTS[1]), got, 2)
    assert prompts["low"].prompt_logprob_values is None
