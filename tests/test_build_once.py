"""The bundled model's conversion runs once however many workers start together: `build_folder_once` under flock.

Stand-in builds (a file written, a call counted) check the locking in threads (each opens its own lock file
description, as separate processes do) and in processes; one real check converts the bundled GGUF into an empty
cache from two processes at once.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from disagg.model.build_once import TEMPORARY_INFIX, build_folder_once
from disagg.model.loading import BUNDLED_MODEL

MARKER = "done"


def _leftovers(target: pathlib.Path) -> list[str]:
    return sorted(p.name for p in target.parent.glob(target.name + TEMPORARY_INFIX + "*"))


def test_threads_asking_together_build_once_and_share_the_folder(tmp_path):
    target = tmp_path / "cache" / "model"
    builds: list[int] = []
    ready = threading.Barrier(4)

    def build(folder: pathlib.Path) -> None:
        builds.append(threading.get_ident())
        time.sleep(0.3)  # long enough that the other threads arrive while it runs
        (folder / "weights").write_text("w")
        (folder / MARKER).write_text("")

    results: list[pathlib.Path] = []

    def ask() -> None:
        ready.wait()
        results.append(build_folder_once(target, build, MARKER))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(builds) == 1
    assert results == [target] * 4
    assert (target / "weights").read_text() == "w"
    assert _leftovers(target) == []
    assert build_folder_once(target, build, MARKER) == target and len(builds) == 1  # built: not again


_PROCESS = textwrap.dedent("""
    import json, os, pathlib, sys, time
    from disagg.model.build_once import build_folder_once

    target, log = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    def build(folder):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(1.0)
        (folder / "done").write_text(str(os.getpid()))
    print(json.dumps([str(build_folder_once(target, build, "done")), (target / "done").read_text()]))
""")


def test_processes_asking_together_build_once(tmp_path):
    target, log = tmp_path / "model", tmp_path / "builds.log"
    procs = [
        subprocess.Popen([sys.executable, "-c", _PROCESS, str(target), str(log)], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    (builder,) = log.read_text().split()  # one build, by one of them
    assert outputs == [[str(target), builder]] * 3  # each got the folder that one built
    assert _leftovers(target) == []


def test_a_failed_build_leaves_nothing_and_the_next_call_builds(tmp_path):
    target = tmp_path / "model"

    def failing(folder: pathlib.Path) -> None:
        (folder / "partial").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        build_folder_once(target, failing, MARKER)
    assert not target.exists() and _leftovers(target) == []

    with pytest.raises(RuntimeError, match="wrote no done"):  # a build that forgot its marker is not complete
        build_folder_once(target, lambda folder: None, MARKER)
    assert not target.exists() and _leftovers(target) == []

    build_folder_once(target, lambda folder: (folder / MARKER).write_text(""), MARKER)
    assert (target / MARKER).exists()


def test_leftovers_of_a_killed_build_are_cleared(tmp_path):
    """A builder killed mid-build leaves its temporary folder (the kernel frees its lock); an incomplete target
    (not made here: a copy cut short) lacks the marker. The next build replaces both."""
    target = tmp_path / "model"
    (tmp_path / ("model" + TEMPORARY_INFIX + "dead")).mkdir()
    target.mkdir()
    (target / "half").write_text("")
    build_folder_once(target, lambda folder: (folder / MARKER).write_text(""), MARKER)
    assert sorted(p.name for p in target.iterdir()) == [MARKER]
    assert _leftovers(target) == []
    assert os.stat(target).st_mode & 0o755 == 0o755  # readable by other users of a shared cache


@pytest.mark.cluster  # two model-loading processes, ~20-40 s of conversion on 2 cores, 538 MB written
def test_two_processes_convert_the_bundled_model_once(tmp_path):
    code = textwrap.dedent("""
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        from disagg.model.loading import bundled_model_folder
        print(bundled_model_folder())
    """)
    env = {**os.environ, "DISAGG_CACHE_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, **pipes) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    folder = tmp_path / BUNDLED_MODEL
    assert [out.strip() for out, _ in outs] == [str(folder)] * 2
    logs = "".join(err for _, err in outs)
    assert logs.count("converting ") == 1, logs[-4000:]
    assert "waiting for another process" in logs
    assert (folder / "model.safetensors").stat().st_size > 500_000_000
    assert sorted(p.name for p in tmp_path.iterdir()) == [BUNDLED_MODEL, BUNDLED_MODEL + ".lock"]
