"""benchmarks/peer_vllm.py (with peer_record.py and peer_servers.py) without vLLM: the record and ratio code over
`vllm bench serve` results saved from a real smoke run (tests/data/peer_vllm/), the commands both servers get, the
server lifecycle on a real process, and the dummy model folder vLLM serves in place of disagg's `--load-format
dummy`."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import sys

import pytest
import torch

from benchmarks import peer_record, peer_servers
from benchmarks import peer_vllm as peer

DATA = pathlib.Path(__file__).resolve().parent / "data" / "peer_vllm"
MODEL = peer.PeerModel("distilgpt2", pathlib.Path("/models/distilgpt2"), ("--model", "distilgpt2"))
VENV = pathlib.Path("/venvs/vllm")


def _server(name: str, runs: list[dict]) -> peer_servers.Server:
    server = peer_servers.Server(name, ["serve", name], {"X": "1"}, 8000, started_seconds=12.5)
    server.runs = runs
    return server


def _smoke_runs() -> tuple[dict, dict]:
    """The two rounds of the committed smoke run (concurrency 4, 8 prompts), as `measure` records them."""
    vllm = peer.load_run("vllm_tuned", 4, 8, "vllm bench serve ...", DATA / "vllm_tuned_c4.json")
    ours = peer.load_run(peer_record.DISAGG, 4, 8, "vllm bench serve ...", DATA / "disagg_c4.json")
    return vllm, ours


def _record(servers: list[peer_servers.Server]) -> dict:
    header = dict(
        command="python -m benchmarks.peer_vllm --quick",
        date="2026-12-07 11:38:20 UTC",
        quick=True,
        note="",
        cpu="AMD EPYC, 2 cores (avx512_bf16)",
        load_average_before=(0.5, 0.4, 0.3),
        versions={"vllm": "0.32.0+cpu", "disagg": "0.1.0"},
        model="distilgpt2",
        model_folder="/models/distilgpt2",
        dtype="float32",
        workload=dict(input_len=128, output_len=64, seed=0),
        wall_seconds=294.0,
    )
    return peer.assemble_record(header, servers, {"measured": False, "why": "the model runs in float32."})


def test_summary_keeps_the_metrics_and_drops_per_request_arrays():
    raw = json.loads((DATA / "disagg_c4.json").read_text())
    summary = peer_record.summarize(raw)
    assert summary["output_throughput"] == raw["output_throughput"]
    assert summary["p50_tpot_ms"] == raw["p50_tpot_ms"] and summary["p99_itl_ms"] == raw["p99_itl_ms"]
    assert summary["completed"] == 8 and summary["failed"] == 0
    assert "latencies" in raw and "latencies" not in summary
    assert set(summary) <= set(peer_record.SUMMARY_KEYS)
    for key, _, _ in peer_record.COLUMNS:  # every table column comes from what the real result holds
        assert key in summary, key


def test_ratios_pair_only_rounds_at_the_same_concurrency():
    vllm, ours = _smoke_runs()
    lonely = dict(vllm, concurrency=32)  # vLLM measured at 32, disagg not: no ratio for 32
    rows = peer_record.ratios([vllm, ours, lonely])
    assert [(r["concurrency"], r["baseline"]) for r in rows] == [(4, "vllm_tuned")]
    row = rows[0]
    assert row["output_throughput"] == pytest.approx(ours["metrics"]["output_throughput"] / 43.2, rel=1e-3)
    assert row["p50_tpot_ms"] == pytest.approx(ours["metrics"]["p50_tpot_ms"] / vllm["metrics"]["p50_tpot_ms"])
    assert set(row) == {"concurrency", "server", "baseline", *(key for key, _, _ in peer_record.COLUMNS)}


def test_ratios_against_each_vllm_setting():
    vllm, ours = _smoke_runs()
    default = dict(vllm, server="vllm_default")
    default["metrics"] = dict(vllm["metrics"], output_throughput=vllm["metrics"]["output_throughput"] / 2)
    rows = peer_record.ratios([vllm, default, ours])
    assert [r["baseline"] for r in rows] == ["vllm_default", "vllm_tuned"]
    assert rows[0]["output_throughput"] == pytest.approx(2 * rows[1]["output_throughput"])


def test_markdown_has_a_table_per_concurrency_with_both_servers_and_the_ratio():
    vllm, ours = _smoke_runs()
    record = _record([_server("vllm_tuned", [vllm]), _server(peer_record.DISAGG, [ours])])
    markdown = peer_record.render_markdown(record)
    assert "## Concurrency 4 (8 prompts)" in markdown
    assert "| vllm_tuned | 8/0 | 43.2 | 70.2 | 114.4 | 1504.4 |" in markdown
    assert "| disagg | 8/0 | 59.9 | 51.4 |" in markdown
    assert "| disagg / vllm_tuned | | **1.39x** | **0.73x** |" in markdown
    assert "`X=1 serve vllm_tuned`" in markdown  # each server's exact command and environment
    assert "vllm 0.32.0+cpu" in markdown and "AMD EPYC" in markdown
    assert "Not measured: the model runs in float32." in markdown


def test_write_record_writes_json_markdown_and_png(tmp_path: pathlib.Path):
    vllm, ours = _smoke_runs()
    record = _record([_server("vllm_tuned", [vllm]), _server(peer_record.DISAGG, [ours])])
    prefix = tmp_path / "out" / "peer_vllm_distilgpt2_float32_quick"
    peer_record.write_record(record, prefix)
    assert json.loads(pathlib.Path(f"{prefix}.json").read_text()) == json.loads(json.dumps(record))
    assert pathlib.Path(f"{prefix}.md").read_text() == peer_record.render_markdown(record)
    assert pathlib.Path(f"{prefix}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_agreement_line_reports_the_measurement():
    agreement = {
        "measured": True,
        "model": "smollm2-135m-instruct",
        "prompts": 8,
        "new_tokens": 32,
        "dtypes": {
            "bfloat16": {
                "matching": 200,
                "total": 256,
                "agreement": 200 / 256,
                "identical_sequences": 3,
                "first_divergence": [5, None],
            }
        },
    }
    line = peer_record.agreement_line(agreement)
    assert "bfloat16 vs float32: 200/256 greedy tokens match (78.1%), 3/8 sequences identical" in line


def test_both_servers_get_the_same_benchmark_but_the_address(tmp_path: pathlib.Path):
    workload = peer.Workload([1, 32], num_prompts=0)
    vllm, disagg = peer.vllm_servers(VENV, MODEL, "float32", ["tuned"])[0], peer.disagg_server(MODEL, "float32")
    a = peer.bench_command(VENV, vllm, MODEL, workload, 32, tmp_path / "a.json")
    b = peer.bench_command(VENV, disagg, MODEL, workload, 32, tmp_path / "b.json")
    differ = [(x, y) for x, y in zip(a, b) if x != y]
    assert differ == [(vllm.base_url, disagg.base_url), ("a.json", "b.json")]
    text = shlex.join(a)
    for flag in ("--seed 0", "--tokenizer /models/distilgpt2", "--ignore-eos", "--max-concurrency 32"):
        assert flag in text
    assert "--num-prompts 64" in text and "--random-input-len 128 --random-output-len 64" in text
    assert workload.prompts_for(1) == 16  # at least 16 prompts, else two waves of the concurrency


def test_vllm_tuned_and_default_settings():
    tuned, default = peer.vllm_servers(VENV, MODEL, "bfloat16", ["tuned", "default"])
    assert tuned.name == "vllm_tuned" and default.name == "vllm_default"
    assert tuned.env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0" and tuned.env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert tuned.env["OMP_NUM_THREADS"] == str(os.cpu_count())
    assert tuned.env["LD_PRELOAD"].split(":") == [peer.TCMALLOC, "/venvs/vllm/lib/libiomp5.so"]
    assert not {"VLLM_CPU_NUM_OF_RESERVED_CPU", "OMP_NUM_THREADS", "LD_PRELOAD"} & set(default.env)
    assert "--served-model-name distilgpt2 --dtype bfloat16" in shlex.join(tuned.argv)
    assert tuned.port != default.port
    with pytest.raises(SystemExit, match="tuned and default"):
        peer.vllm_servers(VENV, MODEL, "float32", ["fast"])


def test_disagg_up_gets_only_model_dtype_and_ports():
    server = peer.disagg_server(peer.PeerModel("distilgpt2", MODEL.folder, ("--model", "distilgpt2")), "bfloat16")
    assert server.argv[1:7] == ["up", "--model", "distilgpt2", "--dtype", "bfloat16", "--port"]
    assert server.argv[8:] == ["--http-port", str(server.port)]
    assert server.name == peer_record.DISAGG and "DISAGG_OPENMP" not in server.env


def test_the_gnu_openmp_variant_is_a_server_of_its_own_with_the_same_flags():
    model = peer.PeerModel("distilgpt2", MODEL.folder, ("--model", "distilgpt2"))
    gnu = peer.disagg_server(model, "float32", "gnu")
    assert gnu.name == "disagg_gnu_openmp" and gnu.env["DISAGG_OPENMP"] == "gnu"
    assert gnu.argv[1:6] == ["up", "--model", "distilgpt2", "--dtype", "float32"]
    with pytest.raises(SystemExit, match="intel and gnu"):
        peer.disagg_server(model, "float32", "llvm")
    spin = peer.disagg_server(model, "float32", env="KMP_BLOCKTIME=0 OMP_NUM_THREADS=2")
    assert spin.name == "disagg_kmp_blocktime_0_omp_num_threads_2" and spin.argv[1:6] == gnu.argv[1:6]
    assert spin.env["KMP_BLOCKTIME"] == "0" and spin.env["OMP_NUM_THREADS"] == "2" and "DISAGG_OPENMP" not in spin.env
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        peer.disagg_server(model, "float32", env="-x=1")


def test_quick_mode_is_one_small_round_against_tuned_vllm():
    quick = peer.parse_args(["--quick"])
    assert (quick.concurrency, quick.num_prompts, quick.vllm_settings) == ("4", 8, "tuned")
    full = peer.parse_args([])
    assert (full.concurrency, full.num_prompts, full.vllm_settings) == ("1,32,64", 0, "tuned,default")


def test_server_lifecycle_on_a_real_process(tmp_path: pathlib.Path):
    """`running` waits for /v1/models, and stopping ends the whole session, children included."""
    (tmp_path / "site" / "v1").mkdir(parents=True)
    (tmp_path / "site" / "v1" / "models").write_text("{}")
    port = peer.free_port()
    child_pid = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, pathlib; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        f"pathlib.Path({str(child_pid)!r}).write_text(str(child.pid)); "
        f"import runpy; sys.argv = ['http.server', '{port}', '--bind', '127.0.0.1', '--directory', "
        f"{str(tmp_path / 'site')!r}]; runpy.run_module('http.server', run_name='__main__')"
    )
    server = peer_servers.Server("fake", [sys.executable, "-c", script], {}, port)
    with peer_servers.running(server, tmp_path / "fake.log", timeout=60) as up:
        assert peer_servers._ready(up.base_url + "/v1/models")
        pid = int(child_pid.read_text())
        group = os.getpgid(pid)
        assert pid in peer_servers.live_group_members(group) and group != os.getpgid(0)  # a session of its own
    assert not peer_servers._ready(server.base_url + "/v1/models")
    assert _gone_or_zombie(pid)  # the child the leader left behind was killed with the session
    assert peer_servers.live_group_members(group) == []


def _gone_or_zombie(pid: int) -> bool:
    """A killed orphan may wait a moment as a zombie for init to reap it: dead either way."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_a_server_that_dies_while_starting_is_reported(tmp_path: pathlib.Path):
    server = peer_servers.Server("broken", [sys.executable, "-c", "raise SystemExit(3)"], {}, peer.free_port())
    starting = peer_servers.running(server, tmp_path / "broken.log", timeout=60)
    with pytest.raises(RuntimeError, match=r"broken exited with 3 while starting; see .*broken.log"):
        starting.__enter__()


def test_dummy_model_folder_holds_disaggs_dummy_weights_and_gpt2s_tokenizer(tmp_path: pathlib.Path):
    from transformers import AutoTokenizer

    from disagg.model.loading import load_model

    model = peer.prepare_model("distilgpt2", tmp_path)
    assert model.disagg_flags == ("--model", "distilgpt2", "--load-format", "dummy")
    tokenizer = AutoTokenizer.from_pretrained(model.folder)  # as vLLM and `vllm bench serve` load it
    prompt = "Q: Explain why batching improves GPU utilization.\nA:"
    assert tokenizer(prompt)["input_ids"] == [48, 25, 48605, 1521, 15458, 278, 19575, 11362, 32121, 13, 198, 32, 25]
    assert json.loads((model.folder / "tokenizer_config.json").read_text())["model_max_length"] == 1024
    served = load_model("distilgpt2", load_format="dummy", dtype="float32").model.state_dict()
    from safetensors.torch import load_file

    saved = load_file(model.folder / "model.safetensors")
    assert set(saved) <= set(served) and "transformer.wte.weight" in saved
    assert all(torch.equal(saved[k], served[k]) for k in saved)
    assert peer.prepare_model("distilgpt2", tmp_path).folder == model.folder  # made once, then reused
