"""The native forward pass (disagg/model/native.py) over the paged pool (disagg/model/paged_batch.py), with HF as
the reference: logits within float tolerance of HF's, greedy tokens equal to HF `generate()` on GPT-2 (seeded
dummy weights, distilgpt2's shape) and Llama (the bundled SmolLM2), sequences joining and leaving mid-batch, forks
sharing blocks, a prefix hit computing only the rest."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from disagg.config import BatchPolicy
from disagg.engine.aggregated import AggregatedEngine
from disagg.engine.decode import DecodeEngine, DecodeSetup
from disagg.kv.budget import KvBudget
from disagg.kv.prefix_cache import block_keys
from disagg.model.block_pool import BlockPool
from disagg.model.decode_batch import DecodeBatch
from disagg.model.lm_head import ExactGreedyHead, LmHead
from disagg.model.loading import LoadedModel
from disagg.model.native import NativeModel, native_family
from disagg.model.native_prefill import Prefiller
from disagg.model.paged_attention import load as load_kernel
from disagg.model.paged_batch import PagedDecodeBatch
from disagg.model.paged_kv import PagedKvStorage
from disagg.model.prefill import prefill
from tests.test_aggregated import Collector, reference
from tests.test_batching import Collector as BatchingCollector

MODELS = ["gpt2_model", "llama_model"]
TEXTS = [
    "Hi",
    "The decode worker keeps every running sequence in blocks of keys and values, paged.",
    "Batching improves utilization because",
    "def fib(n):",
]


_REFERENCES: dict[tuple[str, tuple[int, ...], int], list[int]] = {}


def cached_reference(lm: LoadedModel, ids: list[int], max_new_tokens: int) -> list[int]:
    """generate()'s tokens, computed once per model, prompt and length in this session."""
    key = (lm.name, tuple(ids), max_new_tokens)
    if key not in _REFERENCES:
        _REFERENCES[key] = reference(lm, ids, max_new_tokens)
    return _REFERENCES[key]


def greedy_run(batch: PagedDecodeBatch, head: LmHead, steps: int) -> list[list[int]]:
    """Every row's tokens over `steps` decode steps (rows in the batch's order at the start)."""
    order = list(batch.seq_ids)
    tokens: dict[str, list[int]] = {seq_id: [] for seq_id in order}
    for _ in range(steps):
        picked = head.greedy(batch.step_hidden())
        for seq_id, token in zip(batch.seq_ids, picked):
            tokens[seq_id].append(token)
        batch.set_last_tokens(picked)
    return [tokens[seq_id] for seq_id in order]


def test_the_families_it_runs():
    from transformers import GPT2Config, GPT2LMHeadModel

    assert native_family(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))) == "gpt2"
    odd = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, scale_attn_by_inverse_layer_idx=True)
    )
    assert native_family(odd) is None  # HF's forward stays for what the native pass does not compute


def test_the_kernel_builds_here():
    """The paged attention kernel compiles on this machine (the fallback exists, but must not hide a broken build)."""
    assert load_kernel()


@pytest.mark.parametrize("model", MODELS)
def test_prefill_logits_match_hf(request, model):
    lm: LoadedModel = request.getfixturevalue(model)
    native = NativeModel(lm.model)
    head = LmHead(lm.model)
    prompts = [lm.tokenizer.encode(t) for t in TEXTS]
    pool = BlockPool(64, 16)
    storage = PagedKvStorage(*lm.kv_shape(), 16, 64, lm.dtype, lm.device)
    tables = [pool.new_table() for _ in prompts]
    for table, ids in zip(tables, prompts):
        pool.reserve(table, len(ids))
    hidden = native.prefill(prompts, tables, storage)
    for table, ids in zip(tables, prompts):
        pool.advance(table, len(ids))
    expected = prefill(lm.model, prompts)
    for row, (table, out) in enumerate(zip(tables, expected)):
        torch.testing.assert_close(head.logits(hidden[row : row + 1])[0], out.logits, rtol=1e-4, atol=1e-4)
        for (k, v), (ek, ev) in zip(storage.read_sequence(table), out.kv):  # the KV it stored is HF's
            torch.testing.assert_close(k, ek, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(v, ev, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("attention", "packed"), [("kernel", True), ("kernel", False), ("matmul", True)])
@pytest.mark.parametrize("model", MODELS)
def test_decode_logits_match_the_hf_slab_and_greedy_matches_generate(request, model, attention, packed):
    """The same handed-over caches stepped by HF's modules over the slab and natively over the pool (attention by
    the kernel or by gathering; prepacked weights or HF's): logits within tolerance each step; the greedy tokens
    are generate()'s."""
    lm: LoadedModel = request.getfixturevalue(model)
    head = LmHead(lm.model)
    prompts = [lm.tokenizer.encode(t) for t in TEXTS]
    outs = prefill(lm.model, prompts)
    firsts = [int(o.logits.argmax()) for o in outs]
    joiners = [(str(i), o.kv, first) for i, (o, first) in enumerate(zip(outs, firsts))]
    slab = DecodeBatch(*lm.kv_shape(), lm.dtype, lm.device)
    slab.add_many(joiners)
    paged = PagedDecodeBatch(NativeModel(lm.model, attention, pack_weights=packed), lm.dtype, lm.device)
    paged.add_many(joiners)
    steps = 11
    tokens: list[list[int]] = [[f] for f in firsts]
    for _ in range(steps):
        expected = head.logits(slab.step_hidden(lm.model))
        got = head.logits(paged.step_hidden())
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
        picked = got.argmax(-1).tolist()
        slab.set_last_tokens(picked)
        paged.set_last_tokens(picked)
        for row, token in zip(tokens, picked):
            row.append(token)
    for ids, row in zip(prompts, tokens):
        assert row == cached_reference(lm, ids, steps + 1)


@pytest.mark.parametrize("model", MODELS)
def test_sequences_join_and_leave_mid_batch_and_keep_their_alone_output(request, model):
    lm: LoadedModel = request.getfixturevalue(model)
    head = LmHead(lm.model)
    prompts = [lm.tokenizer.encode(t) for t in TEXTS]
    outs = prefill(lm.model, prompts)
    firsts = [int(o.logits.argmax()) for o in outs]
    batch = PagedDecodeBatch(NativeModel(lm.model), lm.dtype, lm.device, block_tokens=4)  # many block crossings
    got: dict[str, list[int]] = {str(i): [firsts[i]] for i in range(len(prompts))}

    def step() -> None:
        picked = head.greedy(batch.step_hidden())
        for seq_id, token in zip(batch.seq_ids, picked):
            got[seq_id].append(token)
        batch.set_last_tokens(picked)

    batch.add_many([("0", outs[0].kv, firsts[0]), ("1", outs[1].kv, firsts[1])])
    for _ in range(3):
        step()
    batch.add_many([("2", outs[2].kv, firsts[2])])  # joins a running batch
    for _ in range(3):
        step()
    batch.remove("0")  # leaves mid-batch: its blocks go back
    batch.add_many([("3", outs[3].kv, firsts[3])])  # and a joiner reuses them
    for _ in range(5):
        step()
    for seq_id, tokens in got.items():
        ids = prompts[int(seq_id)]
        assert tokens == cached_reference(lm, ids, len(tokens)), seq_id
    for seq_id in list(batch.seq_ids):
        batch.remove(seq_id)
    assert batch.pool.num_used == 0 and batch.kv_bytes == 0


def test_forks_share_the_prompt_blocks_and_copy_only_the_tail(gpt2_model):
    """n > 1: joiners handed the same KV object fork one table; each writes its own tail (copy-on-write), and both
    decode what a lone sequence decodes."""
    lm = gpt2_model
    head = LmHead(lm.model)
    ids = lm.tokenizer.encode(TEXTS[1])  # not a multiple of the block size: the tail block is partly filled
    out = prefill(lm.model, [ids])[0]
    first = int(out.logits.argmax())
    batch = PagedDecodeBatch(NativeModel(lm.model), lm.dtype, lm.device)
    batch.add_many([("a", out.kv, first), ("b", out.kv, first)])
    a, b = batch.tables
    assert a.ids == b.ids and all(batch.pool.refcount[block] == 2 for block in a.ids)
    used = batch.pool.num_used
    a_tokens, b_tokens = greedy_run(batch, head, 6)
    assert a.ids[:-1] == b.ids[:-1] and a.ids[-1] != b.ids[-1]  # full blocks shared, the tail copied
    assert batch.pool.num_used == used + 1
    assert [first, *a_tokens] == [first, *b_tokens] == cached_reference(lm, ids, 7)


@pytest.mark.parametrize("model", MODELS)
def test_prefix_hit_shares_blocks_and_computes_only_the_rest(request, model):
    """A prompt whose first blocks are cached: the table takes the cached block ids (refcount++, the pool's KV
    unchanged), only the other tokens go through the model, and the logits are the whole prompt's."""
    lm: LoadedModel = request.getfixturevalue(model)
    native, head = NativeModel(lm.model), LmHead(lm.model)
    size = 4
    pool = BlockPool(64, size)
    storage = PagedKvStorage(*lm.kv_shape(), size, 64, lm.dtype, lm.device)
    first_ids = lm.tokenizer.encode(TEXTS[1])
    first = pool.new_table()
    pool.reserve(first, len(first_ids))
    native.prefill([first_ids], [first], storage)
    pool.advance(first, len(first_ids))
    keys = block_keys(first_ids, lm.fingerprint, size)
    pool.cache_blocks(first, keys, first_ids)

    second_ids = [*first_ids[:9], *lm.tokenizer.encode(" and then some other words")]
    hit = pool.cached_prefix(block_keys(second_ids, lm.fingerprint, size), second_ids)
    assert hit == first.ids[:2]  # two full blocks of 4 match (the 9th token starts the third)
    before = [t.clone() for t in storage.keys + storage.values]
    pool.acquire_cached(hit)
    second = pool.new_table(hit, len(hit) * size)
    assert all(pool.refcount[block] == 2 for block in hit)
    assert pool.reserve(second, len(second_ids) - second.num_tokens) == []
    hidden = native.prefill([second_ids], [second], storage)
    pool.advance(second, len(second_ids) - len(hit) * size)
    for now, then in zip(storage.keys + storage.values, before):
        assert torch.equal(now[:, first.ids], then[:, first.ids])  # the first sequence's KV untouched
    expected = prefill(lm.model, [second_ids])[0]
    torch.testing.assert_close(head.logits(hidden)[0], expected.logits, rtol=1e-4, atol=1e-4)
    for (k, v), (ek, ev) in zip(storage.read_sequence(second), expected.kv):
        torch.testing.assert_close(k, ek, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(v, ev, rtol=1e-4, atol=1e-4)


def test_the_pool_gives_its_memory_back_when_the_batch_empties(gpt2_model):
    lm = gpt2_model
    out = prefill(lm.model, [lm.tokenizer.encode(TEXTS[1])])[0]
    batch = PagedDecodeBatch(NativeModel(lm.model), lm.dtype, lm.device, block_tokens=4)
    initial = batch.pool_bytes
    batch.add_many([(str(i), list(out.kv), 5) for i in range(20)])  # 20 x 5 or more blocks > the 64 it starts with
    assert batch.pool_bytes > initial and batch.kv_bytes > 0
    for seq_id in list(batch.seq_ids):
        batch.remove(seq_id)
    assert batch.pool_bytes == initial and batch.kv_bytes == 0 and batch.pool.num_used == 0


def test_a_lone_sequence_runs_when_its_blocks_round_past_the_kv_budget(gpt2_model):
    """The budget is exactly the sequence's reservation (prompt + max_new_tokens, not a multiple of the block
    size): its blocks for that length are more than the limit, and it runs anyway, alone."""
    lm = gpt2_model
    ids = lm.tokenizer.encode(TEXTS[1])
    new_tokens = 5
    assert (len(ids) + new_tokens) % 16
    layers, heads, head_dim = lm.kv_shape()
    budget = KvBudget(2 * layers * heads * head_dim * (len(ids) + new_tokens) * 4)
    engine = AggregatedEngine(lm, BatchPolicy(), DecodeSetup(budget=budget))
    collector = Collector()
    engine.submit_prompt(collector.prompt(lm, "lone", ids, new_tokens, budget))
    engine.start()
    try:
        collector.wait("lone", timeout=60)
    finally:
        engine.stop()
    assert collector.tokens("lone") == cached_reference(lm, ids, new_tokens)


def test_joiners_are_paced_by_the_kv_tokens_they_copy(gpt2_model):
    """While others decode, a step copies at most `join_tokens_per_step` KV tokens into the pool (at least one
    joiner): a burst of long handoffs is spread over steps (the running streams' largest gap stays a few steps)."""
    lm = gpt2_model
    engine = DecodeEngine(lm, BatchPolicy(max_batch_size=8))
    engine.join_tokens_per_step = 100
    collector = BatchingCollector()
    ids = lm.tokenizer.encode(TEXTS[1] * 4)  # ~70 tokens: one joiner per step, two would pass 100
    assert 50 < len(ids) <= 100
    engine.submit(collector.sequence(lm, "running", ids, 12))
    engine.run_once()  # alone: joins and steps
    for name in "abc":
        engine.submit(collector.sequence(lm, name, ids, 4))
    joined = []
    for _ in range(3):
        engine.run_once()
        assert engine.last_step is not None
        joined.append(engine.last_step.joined)
    assert joined == [1, 1, 1]
    while engine.busy():
        engine.run_once()
    for name in ["running", "a", "b", "c"]:
        assert collector.tokens(name) == cached_reference(lm, ids, len(collector.tokens(name)) + 1)[1:], name


@pytest.mark.parametrize("model", MODELS)
def test_native_prefill_gives_hf_prefills_results(request, model):
    """The Prefiller engines use: native against HF, both with the greedy screen, on prompts of different lengths
    (unpadded against left-padded), after a known prefix, layer by layer, and every position's logits."""
    lm: LoadedModel = request.getfixturevalue(model)
    screen = ExactGreedyHead(lm.model)
    hf, native = Prefiller(lm.model, screen, None), Prefiller(lm.model, screen, NativeModel(lm.model, "matmul"))
    prompts = [lm.tokenizer.encode(t) for t in TEXTS]
    reported: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def on_layer(row: int, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        reported[(row, layer)] = (keys, values)

    marked = [False, True, False, False]
    expected = hf.batch(prompts, all_positions=marked)
    got = native.batch(prompts, on_layer=on_layer, all_positions=marked)
    layers = lm.kv_shape()[0]
    assert len(reported) == len(prompts) * layers
    for row, (a, b) in enumerate(zip(expected, got)):
        assert b.greedy_token == a.greedy_token
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)
        for layer, ((k, v), (ek, ev)) in enumerate(zip(b.kv, a.kv)):
            torch.testing.assert_close(k, ek, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(v, ev, rtol=1e-4, atol=1e-4)
            assert torch.equal(reported[(row, layer)][0], k) and torch.equal(reported[(row, layer)][1], v)
    n = len(prompts[1])
    torch.testing.assert_close(got[1].position_logits(0, n), expected[1].position_logits(0, n), rtol=1e-4, atol=1e-4)
    same_length = [ids[:3] for ids in prompts[1:]]  # (no padding: the rows as they are)
    for a, b in zip(hf.batch(same_length), native.batch(same_length)):
        assert b.greedy_token == a.greedy_token
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)
    known = 5
    prefix = [(k[:, :, :known], v[:, :, :known]) for k, v in expected[1].kv]
    after = native.after_prefix(prompts[1], prefix)
    assert after.greedy_token == expected[1].greedy_token
    torch.testing.assert_close(after.logits, expected[1].logits, rtol=1e-4, atol=1e-4)
    for (k, v), (pk, pv) in zip(after.kv, prefix):  # the known prefix comes back as it went in
        assert torch.equal(k[:, :, :known], pk) and torch.equal(v[:, :, :known], pv)


@pytest.mark.cluster  # two processes and one ~40-60 s build of the kernel on 2 cores
def test_two_processes_build_the_kernel_once(tmp_path):
    code = "import logging, sys\nlogging.basicConfig(level=logging.INFO)\n"
    code += "from disagg.model.paged_attention import load\nprint(load())\n"
    env = {**os.environ, "DISAGG_CACHE_DIR": str(tmp_path)}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, **pipes) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [out.strip() for out, _ in outs] == ["True", "True"], [err[-2000:] for _, err in outs]
    assert "waiting for another process" in "".join(err for _, err in outs)
    (built,) = [p for p in (tmp_path / "torch_extensions").iterdir() if p.is_dir()]
    assert (built / f"{built.name}.so").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_run_natively(dtype):
    """bfloat16 and float16 models: weights prepacked where oneDNN packs that dtype on this CPU (float16 needs
    AVX512-FP16 or AVX-NE-CONVERT), HF's own otherwise; the step runs and greedy tokens match HF's slab here."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64)).eval()
    model = model.to(dtype)
    native = NativeModel(model)
    out = prefill(model, [[5, 6, 7, 8, 9]])[0]
    joiners = [("a", out.kv, int(out.logits.argmax()))]
    paged = PagedDecodeBatch(native, dtype, torch.device("cpu"))
    slab = DecodeBatch(2, 4, 16, dtype, torch.device("cpu"))
    paged.add_many(joiners)
    slab.add_many(joiners)
    head = LmHead(model)
    for _ in range(4):
        expected = head.logits(slab.step_hidden(model)).argmax(-1).tolist()
        assert head.logits(paged.step_hidden()).argmax(-1).tolist() == expected
        slab.set_last_tokens(expected)
        paged.set_last_tokens(expected)
