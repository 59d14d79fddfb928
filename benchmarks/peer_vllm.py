"""The peer comparison (issue 23): vLLM's CPU engine against `disagg up`, both driven by `vllm bench serve`.

HF `generate()` is not what a user would run instead of this project; vLLM is. This harness serves the same
weights (a seeded dummy distilgpt2 saved as a folder, or the bundled SmolLM2 converted by disagg's loader) with
one server at a time in one invocation: `vllm serve FOLDER` (tuned per vLLM's CPU docs, and optionally with its
defaults), then `disagg up` with its default flags. Each server gets one discarded warm-up round (the first round
after a start is slower) and then the same `vllm bench serve` command per concurrency: same tokenizer, same seed,
hence the same prompts. The record (JSON, Markdown, PNG) holds every server's metrics and the ratios disagg/vLLM,
only ever from pairs measured in this invocation.

vLLM lives in a venv of its own (`bash benchmarks/peer_vllm_install.sh`): it pins an older transformers.

    python -m benchmarks.peer_vllm --model distilgpt2 --dtype float32 --quick   # smoke run, ~5 minutes
    python -m benchmarks.peer_vllm --model smollm2-135m-instruct --dtype bfloat16 --concurrency 1,32,64
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.matmul_floor import measure_floor
from benchmarks.peer_record import DISAGG, ratios, summarize, write_record
from benchmarks.peer_servers import Server, running
from disagg.tools.cluster import free_port

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_VLLM_VENV = REPO / ".venv-vllm"
DEFAULT_CACHE = pathlib.Path.home() / ".cache" / "disagg" / "peer"
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
DUMMY_SEED = 0  # disagg's `--load-format dummy` seeds torch with 0 (load_model's default)


@dataclass(frozen=True)
class PeerModel:
    """One model as both servers see it: a folder vLLM loads, and the flags that make `disagg up` load the same."""

    name: str  # the served model name on both servers, and in the result file names
    folder: pathlib.Path  # weights, config and tokenizer files: vLLM's model and both benchmarks' tokenizer
    disagg_flags: tuple[str, ...]


@dataclass
class Workload:
    """What `vllm bench serve` sends: random prompts of a fixed length, a fixed number of tokens back."""

    concurrencies: list[int]
    num_prompts: int  # 0: max(16, 2 x concurrency) per concurrency
    input_len: int = 128
    output_len: int = 64
    seed: int = 0

    def prompts_for(self, concurrency: int) -> int:
        return self.num_prompts or max(16, 2 * concurrency)


def prepare_model(name: str, cache: pathlib.Path) -> PeerModel:
    """The model folder vLLM serves, holding exactly the weights `disagg up` builds from its own flags.

    distilgpt2 has no real weights here: `disagg --load-format dummy` builds them seeded, and the same model is
    saved once under `cache` (with GPT-2's tokenizer). The bundled SmolLM2 is the folder disagg's loader converts
    it to. Any other folder is served as it is by both."""
    from disagg.model.loading import BUNDLED_MODEL, bundled_model_folder

    if name == BUNDLED_MODEL:
        return PeerModel(name, bundled_model_folder(), ("--model", name))
    if name == "distilgpt2":
        folder = cache / f"distilgpt2-dummy-seed{DUMMY_SEED}"
        if not (folder / "model.safetensors").exists():
            save_dummy_model(name, folder)
        return PeerModel(name, folder, ("--model", name, "--load-format", "dummy"))
    folder = pathlib.Path(name).resolve()
    if not (folder / "config.json").exists():
        raise SystemExit(f"--model must be distilgpt2, {BUNDLED_MODEL} or a model folder; {name!r} is none")
    return PeerModel(folder.name, folder, ("--model", str(folder)))


def save_dummy_model(name: str, folder: pathlib.Path) -> None:
    """Save disagg's seeded dummy model (float32; each server casts to --dtype) and its tokenizer to `folder`,
    and check that the saved weights reload bit for bit."""
    import torch

    from disagg.model.loading import load_model

    lm = load_model(name, load_format="dummy", dtype="float32", seed=DUMMY_SEED)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    lm.model.save_pretrained(tmp)
    lm.tokenizer.save_pretrained(tmp)
    # Spelled out for vLLM's older transformers: the class both versions know, and the model's context.
    config_path = tmp / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config["model_max_length"] = lm.context_length
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    reloaded = load_model(str(tmp), dtype="float32")
    expected, saved = lm.model.state_dict(), reloaded.model.state_dict()
    mismatched = [k for k in expected if not torch.equal(expected[k], saved[k])]
    if mismatched or expected.keys() != saved.keys():
        raise RuntimeError(f"the saved dummy model differs from disagg's: {mismatched or 'keys'}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    if not folder.exists():
        tmp.rename(folder)


def vllm_servers(venv: pathlib.Path, model: PeerModel, dtype: str, settings: Sequence[str]) -> list[Server]:
    """`vllm serve` per setting: `tuned` as vLLM's CPU docs advise (no core kept back for the API server, one
    OpenMP thread per core, tcmalloc and Intel OpenMP preloaded), `default` as it comes."""
    servers = []
    for setting in settings:
        port = free_port()
        argv = [str(venv / "bin" / "vllm"), "serve", str(model.folder), "--served-model-name", model.name]
        argv += ["--dtype", dtype, "--max-model-len", "1024", "--host", "127.0.0.1", "--port", str(port)]
        env = {"VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}
        if setting == "tuned":
            env |= {
                "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                "OMP_NUM_THREADS": str(os.cpu_count() or 1),
                "LD_PRELOAD": f"{TCMALLOC}:{venv / 'lib' / 'libiomp5.so'}",
            }
        elif setting != "default":
            raise SystemExit(f"--vllm-settings takes tuned and default, got {setting!r}")
        servers.append(Server(f"vllm_{setting}", argv, env, port))
    return servers


def disagg_server(model: PeerModel, dtype: str, openmp: str = "intel", env: str = "") -> Server:
    """`disagg up` with its default flags: only the model, its dtype and the ports. `openmp`: "intel", the
    workers' default runtime (disagg/tools/launch.py), or "gnu" (DISAGG_OPENMP=gnu), a server of its own name.
    `env`: "NAME=VALUE ..." for an A/B of the environment, a server named after it (disagg_name_value)."""
    port = free_port()
    argv = [str(pathlib.Path(sys.executable).parent / "disagg"), "up", *model.disagg_flags, "--dtype", dtype]
    argv += ["--port", str(free_port()), "--http-port", str(port)]
    if openmp not in ("intel", "gnu"):
        raise SystemExit(f"--disagg-openmp takes intel and gnu, got {openmp!r}")
    settings = dict(item.split("=", 1) for item in env.split())
    if any(not name.isidentifier() for name in settings):
        raise SystemExit(f"--disagg-env takes NAME=VALUE settings, got {env!r}")
    name = (
        DISAGG + ("_gnu_openmp" if openmp == "gnu" else "") + "".join(f"_{k}_{v}".lower() for k, v in settings.items())
    )
    if openmp == "gnu":
        settings["DISAGG_OPENMP"] = "gnu"
    return Server(name, argv, {"HF_HUB_OFFLINE": "1", **settings}, port)


def bench_command(
    venv: pathlib.Path, server: Server, model: PeerModel, workload: Workload, concurrency: int, result: pathlib.Path
) -> list[str]:
    """One `vllm bench serve` round against `server` at `concurrency`, saving its JSON result as `result`."""
    return [
        str(venv / "bin" / "vllm"),
        "bench",
        "serve",
        "--backend",
        "openai",
        "--base-url",
        server.base_url,
        "--model",
        model.name,
        "--tokenizer",
        str(model.folder),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(workload.input_len),
        "--random-output-len",
        str(workload.output_len),
        "--ignore-eos",
        "--seed",
        str(workload.seed),
        "--max-concurrency",
        str(concurrency),
        "--num-prompts",
        str(workload.prompts_for(concurrency)),
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,99",
        "--save-result",
        "--result-dir",
        str(result.parent),
        "--result-filename",
        result.name,
    ]


def measure(
    server: Server,
    venv: pathlib.Path,
    model: PeerModel,
    workload: Workload,
    raw_dir: pathlib.Path,
    start_timeout: float,
) -> None:
    """Start `server`, run the warm-up round and one measured round per concurrency, stop it."""
    with running(server, raw_dir / f"{server.name}.log", start_timeout):
        top = max(workload.concurrencies)
        warmup = bench_command(venv, server, model, workload, top, raw_dir / f"{server.name}_warmup.json")
        warmup[warmup.index("--num-prompts") + 1] = str(top)  # one wave is enough to compile and fill caches
        _bench(warmup, raw_dir / f"{server.name}_warmup.log")
        for concurrency in workload.concurrencies:
            result = raw_dir / f"{server.name}_c{concurrency}.json"
            command = bench_command(venv, server, model, workload, concurrency, result)
            _bench(command, raw_dir / f"{server.name}_c{concurrency}.log")
            run = load_run(server.name, concurrency, workload.prompts_for(concurrency), shlex.join(command), result)
            server.runs.append(run)
            print(f"{server.name} c={concurrency}: {run['metrics']['output_throughput']:.1f} output tok/s", flush=True)


def load_run(server: str, concurrency: int, num_prompts: int, command: str, result: pathlib.Path) -> dict[str, Any]:
    """One measured round as the record keeps it: where and how, and the summary of its saved JSON result."""
    return dict(
        server=server,
        concurrency=concurrency,
        num_prompts=num_prompts,
        bench_command=command,
        raw_result=str(result),
        metrics=summarize(json.loads(result.read_text())),
    )


def assemble_record(
    header: dict[str, Any], servers: Sequence[Server], agreement: dict[str, Any], floor: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`header` (command, date, machine, versions, model, workload) plus every server, run and ratio, and the
    matmul floor of the workload (benchmarks/matmul_floor.py) measured after them."""
    runs = [run for server in servers for run in server.runs]
    return dict(
        header,
        servers=[
            dict(name=s.name, command=shlex.join(s.argv), env=s.env, started_seconds=s.started_seconds) for s in servers
        ],
        runs=runs,
        ratios=ratios(runs),
        agreement=agreement,
        floor=floor or {"measured": False},
    )


def _bench(command: list[str], log_path: pathlib.Path) -> None:
    with open(log_path, "w") as log:
        done = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=os.environ | {"HF_HUB_OFFLINE": "1"}
        )
    if done.returncode:
        raise RuntimeError(f"vllm bench serve failed ({done.returncode}); see {log_path}")


def cpu_description() -> str:
    """lscpu's model name, cores and the flags that decide CPU matmul speed."""
    try:
        fields = dict(
            line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        )
    except (OSError, ValueError):
        fields = {}
    name = fields.get("Model name", platform.processor()).strip()
    flags = set(fields.get("Flags", "").split())
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{name}, {os.cpu_count()} cores ({', '.join(isa) or 'no AVX2'})"


def versions(venv: pathlib.Path) -> dict[str, str]:
    """disagg (with its commit), vLLM, and the torch and transformers each side runs."""
    probe = "import importlib.metadata as m; print(m.version('vllm'), m.version('torch'), m.version('transformers'))"
    vllm, vllm_torch, vllm_transformers = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    import importlib.metadata as md

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=REPO
    )
    return {
        "disagg": f"{md.version('disagg')} (git {commit.stdout.strip() or '?'}{'+dirty' if dirty.stdout else ''})",
        "vllm": vllm,
        "torch (disagg)": md.version("torch"),
        "transformers (disagg)": md.version("transformers"),
        "torch (vLLM)": vllm_torch,
        "transformers (vLLM)": vllm_transformers,
    }


def greedy_agreement(model: str, dtype: str, enabled: bool) -> dict[str, Any]:
    """disagg's greedy tokens in `dtype` against float32 (`disagg bench dtype`), where that means something."""
    from disagg.model.loading import BUNDLED_MODEL

    if dtype == "float32":
        return {"measured": False, "why": "the model runs in float32."}
    if model != BUNDLED_MODEL:
        return {"measured": False, "why": "dummy weights make greedy agreement meaningless; see the SmolLM2 record."}
    if not enabled:
        return {"measured": False, "why": "skipped (--no-agreement)."}
    from benchmarks.dtype_agreement import measure_dtype_agreement

    return {"measured": True, **measure_dtype_agreement(dtypes=(dtype,), new_tokens=32, model=model)}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peer_vllm", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="distilgpt2", help="distilgpt2 (dummy weights), smollm2-135m-instruct, or a folder"
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--concurrency", default="1,32,64", help="comma-separated --max-concurrency values")
    parser.add_argument("--num-prompts", type=int, default=0, help="per round; 0 = max(16, 2 x concurrency)")
    parser.add_argument(
        "--vllm-settings", default=None, help="tuned,default (the default), or one of them (--quick: tuned)"
    )
    parser.add_argument("--vllm-venv", type=pathlib.Path, default=DEFAULT_VLLM_VENV)
    parser.add_argument("--quick", action="store_true", help="smoke run: concurrency 4, 8 prompts, vLLM tuned only")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="record prefix (default benchmarks/results/...)")
    parser.add_argument(
        "--raw-dir", type=pathlib.Path, default=REPO / "bench_out" / "peer_vllm", help="raw results, logs"
    )
    parser.add_argument("--cache", type=pathlib.Path, default=DEFAULT_CACHE)
    parser.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to start")
    parser.add_argument(
        "--disagg-openmp", default="intel", help="intel (the workers' default), gnu, or both: intel,gnu (an A/B)"
    )
    parser.add_argument(
        "--disagg-env",
        action="append",
        default=[],
        help="another disagg server with these settings, e.g. 'KMP_BLOCKTIME=0' (repeatable; an A/B)",
    )
    parser.add_argument("--agreement", default=True, action=argparse.BooleanOptionalAction, help="bf16 vs fp32 greedy")
    parser.add_argument("--note", default="", help="a line for the record, e.g. that the machine was shared")
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency = "4" if args.concurrency == parser.get_default("concurrency") else args.concurrency
        args.num_prompts = args.num_prompts or 8
        args.vllm_settings = args.vllm_settings or "tuned"
    args.vllm_settings = args.vllm_settings or "tuned,default"
    return args


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not (args.vllm_venv / "bin" / "vllm").exists():
        raise SystemExit(f"no vLLM in {args.vllm_venv}: run bash benchmarks/peer_vllm_install.sh first")
    started = time.perf_counter()
    date = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_before = os.getloadavg()  # other work on these cores shows here (it skews both servers)
    workload = Workload([int(c) for c in args.concurrency.split(",")], args.num_prompts)
    model = prepare_model(args.model, args.cache)
    suffix = "_quick" if args.quick else ""
    prefix = args.out or RESULTS / f"peer_vllm_{model.name}_{args.dtype}{suffix}"
    raw_dir = args.raw_dir / f"{model.name}_{args.dtype}{suffix}"
    raw_dir.mkdir(parents=True, exist_ok=True)

    servers = [
        *vllm_servers(args.vllm_venv, model, args.dtype, args.vllm_settings.split(",")),
        *(disagg_server(model, args.dtype, openmp) for openmp in args.disagg_openmp.split(",")),
        *(disagg_server(model, args.dtype, env=env) for env in args.disagg_env),
    ]
    for server in servers:  # one at a time: each has the whole machine
        measure(server, args.vllm_venv, model, workload, raw_dir, args.start_timeout)
    agreement = greedy_agreement(args.model, args.dtype, args.agreement)  # both servers are down by now
    floor = measure_floor(
        str(model.folder), workload.input_len, workload.output_len, workload.concurrencies, args.dtype
    )
    header = dict(
        command="python -m benchmarks.peer_vllm " + shlex.join(argv),
        date=date,
        quick=args.quick,
        note=args.note,
        cpu=cpu_description(),
        load_average_before=load_before,
        versions=versions(args.vllm_venv),
        model=model.name,
        model_folder=str(model.folder),
        dtype=args.dtype,
        workload=dict(input_len=workload.input_len, output_len=workload.output_len, seed=workload.seed),
        wall_seconds=time.perf_counter() - started,
    )
    record = assemble_record(header, servers, agreement, floor)
    write_record(record, prefix)


if __name__ == "__main__":
    main()
