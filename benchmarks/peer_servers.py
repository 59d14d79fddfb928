"""The peer comparison's servers, one at a time: started in a session of their own, ready when their OpenAI API
answers, and stopped with everything they started, so that the next one finds the cores, memory and ports free."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent


@dataclass
class Server:
    """How to start one server: its command, environment changes, and where its OpenAI API answers."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    started_seconds: float = 0.0
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def running(server: Server, log_path: pathlib.Path, timeout: float) -> Iterator[Server]:
    """Start `server` in a session of its own, wait until its /v1/models answers, and stop the whole session."""
    env = os.environ | server.env
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            server.argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO
        )
    try:
        while not _ready(server.base_url + "/v1/models"):
            if process.poll() is not None:
                raise RuntimeError(f"{server.name} exited with {process.returncode} while starting; see {log_path}")
            if time.perf_counter() - started > timeout:
                raise RuntimeError(f"{server.name} not ready after {timeout:.0f} s; see {log_path}")
            time.sleep(1.0)
        server.started_seconds = time.perf_counter() - started
        print(f"{server.name} ready after {server.started_seconds:.0f} s", flush=True)
        yield server
    finally:
        stop(process)


def stop(process: subprocess.Popen, grace: float = 60.0) -> None:
    """SIGINT (both servers shut their children down on it), then SIGTERM, then SIGKILL to the session's group,
    and wait until no process of it is left: the next server must find the cores, memory and ports free."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, grace / 3)):
        if process.poll() is None:
            process.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(wait)
    with contextlib.suppress(ProcessLookupError, PermissionError):  # what the session still holds (orphans)
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + grace
    while live_group_members(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def live_group_members(pgid: int) -> list[int]:
    """The processes of group `pgid` that are not zombies (a killed orphan is one until init reaps it)."""
    members = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _parent, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # ended while we looked
        if state != "Z" and int(group) == pgid:
            members.append(int(stat.parent.name))
    return members
