"""Structured output's library pieces (disagg.model.grammar): specs, the compile cache, matcher state rebuilt from
accepted tokens, masking only the rows that have a grammar, errors that name the problem; and the first token
masked in the prefill forward pass."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from transformers import LogitsProcessorList

from disagg.errors import InvalidRequest
from disagg.model.grammar import (
    JSON_OBJECT,
    LARK,
    REGEX,
    GrammarCompiler,
    GrammarSpec,
    GrammarViolation,
    allowed_tokens,
    check_grammar,
    json_schema_spec,
    mask_rows,
)
from disagg.model.loading import LoadedModel, gpt2_tokenizer
from disagg.model.output_stream import OutputStream
from disagg.model.prefill import prefill
from disagg.model.sampling import SamplingParams

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    tokenizer = gpt2_tokenizer()
    return GrammarCompiler(tokenizer, len(tokenizer))


def test_equal_schemas_are_one_spec_and_compile_once(compiler):
    a = json_schema_spec(PERSON)
    b = json_schema_spec(json.dumps(PERSON, indent=2))  # same schema, other text
    assert a == b and hash(a) == hash(b)
    before = compiler.compiles
    compiler.start(a)
    compiler.start(b)
    compiler.start(a, compiler.tokenizer.encode('{"name'))
    assert compiler.compiles == before + 1


@pytest.mark.parametrize(
    "spec, named",
    [
        (GrammarSpec("json_schema", '{"type": "wat"}'), "json_schema: Invalid type: wat"),
        (GrammarSpec(REGEX, "[a-"), "regex: "),
        (GrammarSpec(LARK, "start: missing_rule"), 'lark: at 1(8): unknown name: "missing_rule"'),
        (GrammarSpec(REGEX, ""), "regex must not be empty"),
        (GrammarSpec("yaml", "x"), "grammar kind must be one of"),
    ],
)
def test_bad_grammars_are_refused_naming_the_problem(compiler, spec, named):
    with pytest.raises(InvalidRequest) as without_tokenizer:  # the gateway checks without one
        check_grammar(spec)
    assert named in str(without_tokenizer.value)
    with pytest.raises(InvalidRequest) as on_a_worker:
        compiler.start(spec)
    assert named in str(on_a_worker.value)


@pytest.mark.parametrize("text", ["[1, 2]", "not json {", '"a string"'])
def test_a_json_schema_must_be_a_json_object(text):
    with pytest.raises(InvalidRequest, match="json_schema"):
        json_schema_spec(text)


def test_state_rebuilt_from_accepted_tokens_is_the_state_stepped_into(compiler):
    """What a decode worker does with the handoff's tokens: the same mask as the matcher that took them one by one."""
    spec = json_schema_spec(PERSON)
    tokens = compiler.tokenizer.encode('{"name": "Ada", "age": 3')
    stepped = compiler.start(spec)
    for token in tokens:
        assert not stepped.finished
        stepped.accept(token)
    rebuilt = compiler.start(spec, tokens)
    vocab = compiler.vocab_size
    assert torch.equal(allowed_tokens([stepped], vocab), allowed_tokens([rebuilt], vocab))
    allowed = allowed_tokens([rebuilt], vocab)[0]
    assert allowed[compiler.tokenizer.encode("}")[0]] and allowed[compiler.tokenizer.encode("7")[0]]
    assert not allowed[compiler.tokenizer.encode(",")[0]]  # additionalProperties: false
    rebuilt.accept(compiler.tokenizer.encode("}")[0])
    assert rebuilt.finished  # only the end-of-sequence token may follow
    assert allowed_tokens([rebuilt], vocab)[0].nonzero().flatten().tolist() == [compiler.tokenizer.eos_token_id]


def test_tokens_the_grammar_forbids_are_refused(compiler):
    spec = GrammarSpec(REGEX, "[0-9]{3}")
    with pytest.raises(GrammarViolation, match="output position 1"):
        compiler.start(spec, compiler.tokenizer.encode("1a"))
    grammar = compiler.start(spec)
    with pytest.raises(GrammarViolation):
        grammar.accept(compiler.tokenizer.encode("x")[0])


def test_masking_touches_only_the_rows_with_a_grammar(compiler):
    vocab = compiler.vocab_size
    logits = torch.randn(4, vocab)
    original = logits.clone()
    grammars = [compiler.start(GrammarSpec(REGEX, "(yes|no)")), compiler.start(GrammarSpec(JSON_OBJECT))]
    mask_rows(logits, [1, 3], grammars)
    assert torch.equal(logits[0], original[0]) and torch.equal(logits[2], original[2])
    for row, grammar in zip([1, 3], grammars):
        allowed = allowed_tokens([grammar], vocab)[0]
        assert torch.equal(logits[row][allowed], original[row][allowed])
        assert torch.isinf(logits[row][~allowed]).all() and 0 < int(allowed.sum()) < vocab
    first = compiler.tokenizer.decode([int(torch.argmax(logits[3]))])
    assert first.startswith("{")
    mask_rows(logits, [], [])  # no grammar rows: nothing to do


def test_an_output_stream_advances_its_grammar_and_ends_at_eos_even_with_ignore_eos(compiler):
    tokenizer = compiler.tokenizer
    eos = tokenizer.eos_token_id
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    output = OutputStream(tokenizer, params, frozenset([eos]), grammar=compiler.start(GrammarSpec(REGEX, "ok")))
    output.replay(tokenizer.encode("ok"))
    assert output.finish_reason is None and output.grammar is not None and output.grammar.finished
    output.append(eos)
    assert output.finish_reason == "eos" and output.text == "ok"
    with pytest.raises(GrammarViolation):
        OutputStream(tokenizer, params, frozenset([eos]), grammar=compiler.start(GrammarSpec(REGEX, "ok"))).replay(
            tokenizer.encode("no")
        )


@pytest.mark.parametrize("model", ["gpt2_model", "llama_model"])
def test_prefill_first_token_obeys_the_grammar_and_decoding_on_stays_valid(request, model):
    """The first token comes from the prompt's masked logits, greedy and sampled (the greedy screen is bypassed
    for a grammar); masked greedy decoding from there, with the model's own logits, yields valid JSON."""
    lm: LoadedModel = request.getfixturevalue(model)
    grammars = GrammarCompiler(lm.tokenizer, int(lm.model.config.vocab_size))
    spec = json_schema_spec(PERSON)
    prompt = lm.tokenizer.encode("The capital of France is")
    out = prefill(lm.model, [prompt], want_kv=False)[0]
    unconstrained = int(torch.argmax(out.logits))
    assert not lm.tokenizer.decode([unconstrained]).lstrip().startswith("{")  # so the mask has work to do
    for params in [SamplingParams(40), SamplingParams(40, temperature=1.0, seed=7)]:
        grammar = grammars.start(spec)
        first = out.first_token(params, 0, grammar)
        assert lm.tokenizer.decode([first]).startswith("{")
        output = OutputStream(lm.tokenizer, params, lm.eos_token_ids, grammar=grammar)
        output.append(first)

        def masked(input_ids: torch.Tensor, scores: torch.Tensor, output: OutputStream = output) -> torch.Tensor:
            if len(output.tokens) < input_ids.shape[1] - len(prompt):  # the token HF chose last
                output.append(int(input_ids[0, -1]))
            scores = scores.float().clone()
            assert output.grammar is not None
            mask_rows(scores, [0], [output.grammar])
            return scores

        with torch.inference_mode():  # masked greedy decoding with HF's own loop and KV cache
            generated = lm.model.generate(
                torch.tensor([[*prompt, first]]),
                attention_mask=torch.ones((1, len(prompt) + 1), dtype=torch.long),
                max_new_tokens=40,
                do_sample=False,
                logits_processor=LogitsProcessorList([masked]),
                pad_token_id=lm.tokenizer.eos_token_id,
            )
        output.append(int(generated[0, -1]))  # (chosen after the processor's last call)
        assert output.finish_reason == "eos", output.text
        jsonschema.validate(json.loads(output.text), PERSON)
