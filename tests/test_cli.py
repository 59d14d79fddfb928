"""The commands a user types: `disagg up` then `disagg generate`, and a clean stop on SIGTERM."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest

from disagg.tools.cluster import free_port, role_threads, with_threads
from disagg.tools.launch import WORKER_ENV_DEFAULTS, apply_process_env, openmp_preload, process_env_defaults

PRIMITIVE_CACHES = {
    name: WORKER_ENV_DEFAULTS[name] for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
}


def test_workers_default_to_a_short_openmp_spin_and_keep_the_users_choice():
    short_spin = {"GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "1", **PRIMITIVE_CACHES}
    assert process_env_defaults(["decode", "--port", "1"]) == short_spin
    assert process_env_defaults(["--verbose", "prefill"]) == short_spin
    assert process_env_defaults(["gateway"]) == {} and process_env_defaults(["bench"]) == {}
    env: dict[str, str] = {}
    apply_process_env(["decode"], env)
    assert env == short_spin
    env = {"GOMP_SPINCOUNT": "300000"}
    apply_process_env(["decode"], env)
    assert env == {"GOMP_SPINCOUNT": "300000", "KMP_BLOCKTIME": "1", **PRIMITIVE_CACHES}
    env = {name: "" for name in short_spin}  # "" = the library's own default: the variable is removed
    apply_process_env(["prefill"], env)
    assert env == {}


NEW_MATMUL_SHAPES = """
import torch
from disagg.engine.memory import release_free_memory, rss_bytes
packed = torch.ops.mkldnn._reorder_linear_weight(torch.randn(256, 128), None)  # how the native runner's linears run
def growth(rows):
    release_free_memory()
    before = rss_bytes()
    for m in rows:  # a matmul shape seen for the first time each
        torch.ops.mkldnn._linear_pointwise(torch.randn(m, 128), packed, None, "none", [], "")
    release_free_memory()
    return (rss_bytes() - before) >> 20
growth(range(1, 600))
print(growth(range(600, 1200)))  # after the first 600 shapes: does memory still grow with new shapes?
"""


def test_a_workers_matmul_primitive_caches_are_bounded():
    def growth_mib(env: dict[str, str]) -> int:
        run = subprocess.run(
            [sys.executable, "-c", NEW_MATMUL_SHAPES], env={**os.environ, **env}, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        return int(run.stdout)

    assert growth_mib(PRIMITIVE_CACHES) < 16  # full at 64 shapes: new ones replace old ones
    assert growth_mib({name: "1024" for name in PRIMITIVE_CACHES}) > 100  # the libraries' default keeps growing


def test_workers_preload_intel_openmp_once_unless_told_not_to(tmp_path: pathlib.Path):
    library = tmp_path / "libiomp5.so"
    assert openmp_preload(["decode"], {}, library) is None  # not installed: nothing changes
    library.write_bytes(b"")
    assert openmp_preload(["decode", "--port", "1"], {}, library) == str(library)
    assert openmp_preload(["prefill"], {"LD_PRELOAD": "/x/libtcmalloc.so"}, library) == f"{library}:/x/libtcmalloc.so"
    assert openmp_preload(["prefill"], {"LD_PRELOAD": f"/x/a.so {library}"}, library) is None  # already: no loop
    assert openmp_preload(["decode"], {"DISAGG_OPENMP": "gnu"}, library) is None
    assert openmp_preload(["gateway"], {}, library) is None and openmp_preload(["bench"], {}, library) is None


def test_the_entry_point_sets_the_environment_before_torch_is_imported():
    # OpenMP reads GOMP_SPINCOUNT once, when torch loads it: the launcher must not import torch itself.
    code = "import sys, disagg.tools.launch; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_role_threads_split_the_cores_among_the_workers_of_a_role():
    assert role_threads(2, 1) == 2  # one prefill + one decode worker: each may use both cores
    assert role_threads(16, 2) == 8 and role_threads(16, 3) == 5
    assert role_threads(2, 4) == 1 and role_threads(1, 0) == 1


def test_with_threads_fills_in_only_what_the_user_left_open():
    assert with_threads(["decode"], 2) == ["decode", "--threads", "2"]
    assert with_threads(["decode", "--threads", "0"], 2) == ["decode", "--threads", "0", "--threads", "2"]
    assert with_threads(["decode", "--threads", "0", "--threads", "1"], 2) == [
        "decode",
        "--threads",
        "0",
        "--threads",
        "1",
    ]


@pytest.mark.cluster
def test_up_generate_and_clean_shutdown():
    port = free_port()
    up = subprocess.Popen(
        [
            *(sys.executable, "-m", "disagg", "up", "--model", "distilgpt2", "--load-format", "dummy"),
            *("--port", str(port), "--http-port", "0"),  # (8000, the default, may be taken by a test beside this one)
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        lines = []
        for line in up.stdout:
            lines.append(line)
            if "cluster ready" in line:
                break
        assert "cluster ready" in lines[-1], "".join(lines)
        assert f"127.0.0.1:{port}" in lines[-1]
        # The default flags are the fast configuration: each worker gets this host's cores (one worker per role).
        children = [pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in _children(up.pid)]
        workers = [argv for argv in children if b"prefill" in argv or b"decode" in argv]
        assert len(workers) == 2, children
        for argv in workers:
            assert argv[len(argv) - 1 - argv[::-1].index(b"--threads") + 1] == str(os.cpu_count()).encode(), argv

        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "disagg",
                "generate",
                "--address",
                f"127.0.0.1:{port}",
                "--max-new-tokens",
                "6",
                "--ignore-eos",
                "Hello there",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip()
        summary = out.stderr.strip().splitlines()[-1]
        assert "6 tokens" in summary and "time to first token" in summary and "tokens/s" in summary

        bad = subprocess.run(
            [sys.executable, "-m", "disagg", "generate", "--address", f"127.0.0.1:{port}", ""],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "prompt" in bad.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        rest = up.communicate(timeout=60)[0]
    assert up.returncode == 0, rest
    assert "cluster stopped" in rest
    # Every child is gone: nothing listens on the gateway port any more.
    probe = subprocess.run(
        [sys.executable, "-m", "disagg", "generate", "--address", f"127.0.0.1:{port}", "--timeout", "3", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 1 and "UNAVAILABLE" in probe.stderr


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_up_refuses_a_taken_port_before_starting_anything():
    """A taken --port or --http-port (8000 by default: another server, or a second `disagg up`) is said at once,
    not after the workers spent minutes loading the model for a gateway that cannot bind."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flags in (["--port", str(port), "--http-port", "0"], ["--port", "0", "--http-port", str(port)]):
            out = subprocess.run(
                [sys.executable, "-m", "disagg", "up", "--model", "distilgpt2", "--load-format", "dummy", *flags],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert out.returncode == 1, out
            flag = flags[0] if flags[1] == str(port) else flags[2]
            assert f"port in use: {flag} {port}" in out.stdout, out.stdout
            assert "metrics on" not in out.stdout + out.stderr  # no worker was started
