"""Children of `disagg up` die with it: SIGKILL of `disagg up` (as an OOM kill would) leaves no gateway or worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from disagg.tools.cluster import free_port
from disagg.tools.lifeline import PARENT_PID_ENV
from tests.processes import alive as _alive
from tests.processes import children_of as _children_of

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")


def _wait_gone(pids: list[int], seconds: float) -> tuple[list[int], float]:
    start = time.monotonic()
    while (alive := [p for p in pids if _alive(p)]) and time.monotonic() - start < seconds:
        time.sleep(0.1)
    return alive, time.monotonic() - start


def _bindable(port: int) -> bool:
    """Whether a server could listen on the port again (SO_REUSEADDR, as gRPC servers bind)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


@pytest.mark.cluster
def test_kill_9_of_disagg_up_leaves_no_child():
    port = free_port()
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "disagg",
            "up",
            "--model",
            "distilgpt2",
            "--load-format",
            "dummy",
            "--threads",
            "1",
            "--port",
            str(port),
            "--http-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    children: list[int] = []
    try:
        lines = []
        for line in up.stdout:
            lines.append(line)
            if "cluster ready" in line:
                break
        assert "cluster ready" in lines[-1], "".join(lines)
        # Keep reading, as a terminal would: the children share this pipe, and a full one would block their logging.
        threading.Thread(target=up.stdout.read, daemon=True).start()
        children = _children_of(up.pid)
        assert len(children) == 3, f"expected gateway, prefill and decode, found {children}"
        assert not _bindable(port)  # the gateway holds it

        up.kill()
        up.wait(10)
        alive, waited = _wait_gone(children, 5.0)
        assert not alive, f"still alive {waited:.1f}s after kill -9 of disagg up: {alive}"
        print(f"all {len(children)} children gone {waited:.2f}s after kill -9 of disagg up")
        assert _bindable(port), f"port {port} still taken after the gateway died"
    finally:
        if up.poll() is None:
            up.kill()
        for pid in children:  # don't leak processes into other tests if the assertion failed
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _orphan_script(use_prctl: bool) -> str:
    """A parent that starts a supervised child (prctl or watchdog only), prints its pid and waits to be killed."""
    child = textwrap.dedent(f"""
        import os, time
        from disagg.tools.lifeline import die_with_parent
        die_with_parent(int(os.environ["{PARENT_PID_ENV}"]), use_prctl={use_prctl}, poll=0.1, hard_exit=1.0)
        time.sleep(60)
    """)
    return textwrap.dedent(f"""
        import os, subprocess, sys, time
        env = {{**os.environ, "{PARENT_PID_ENV}": str(os.getpid())}}
        child = subprocess.Popen([sys.executable, "-c", {child!r}], env=env)
        print(child.pid, flush=True)
        time.sleep(60)
    """)


@pytest.mark.parametrize("use_prctl", [True, False], ids=["prctl", "watchdog"])
def test_supervised_child_dies_with_its_parent(use_prctl: bool):
    """Each mechanism on its own: the kernel's parent-death signal, and the getppid() watchdog (its fallback)."""
    parent = subprocess.Popen([sys.executable, "-c", _orphan_script(use_prctl)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        time.sleep(0.5)  # let the child arm itself
        assert _alive(child)
        parent.kill()
        parent.wait(10)
        alive, waited = _wait_gone([child], 5.0)
        assert not alive, f"child alive {waited:.1f}s after its parent's SIGKILL"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_child_whose_parent_already_died_exits_at_once():
    """The race prctl leaves open (the parent died before the child armed it): the pid check catches it."""
    env = {**os.environ, PARENT_PID_ENV: "1"}  # not our parent: as if the real one had died and we were reparented
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "disagg", "gateway", "--port", "0"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1 and "is gone" in out.stderr, out.stderr
    assert time.monotonic() - start < 30
