"""Processes seen from /proc (Linux): whether one runs, and which ones `disagg up` (or a Cluster) started."""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest

from disagg.tools.lifeline import PARENT_PID_ENV


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by whoever inherited it, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children_of(parent_pid: int) -> list[int]:
    """Pids of processes started with this parent pid in their environment (what disagg.cluster passes)."""
    marker = f"{PARENT_PID_ENV}={parent_pid}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def command_of(pid: int) -> list[str]:
    """A process's argv."""
    return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


@dataclass
class RunningUp:
    """A `disagg up` subprocess, its output read on a thread as a terminal would (its children share the pipe, and a
    full one would block their logging)."""

    process: subprocess.Popen
    lines: list[str]
    reader: threading.Thread

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, text: str, timeout: float) -> str:
        """The first line containing `text`, once printed; AssertionError (with the output) if not in time."""
        deadline = time.monotonic() + timeout
        while True:
            found = next((line for line in list(self.lines) if text in line), None)
            if found is not None:
                return found
            if time.monotonic() > deadline or (self.process.poll() is not None and not self.reader.is_alive()):
                break
            time.sleep(0.05)
        raise AssertionError(f"no line with {text!r} from disagg up:\n{self.output()}")

    def finish(self, timeout: float) -> int:
        """Wait for exit and the rest of the output; the exit status."""
        self.process.wait(timeout)
        self.reader.join(timeout)
        return self.process.returncode


def start_up(*flags: str, env: dict[str, str] | None = None, start_timeout: float = 300) -> RunningUp:
    """`disagg up FLAGS...` started, once it printed that the cluster is ready."""
    process = subprocess.Popen(
        [sys.executable, "-m", "disagg", "up", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    lines: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    running = RunningUp(process, lines, reader)
    try:
        running.wait_for_line("cluster ready", start_timeout)
    except BaseException:
        process.kill()
        raise
    return running


def flags_as_started(command: list[str], environment: dict, monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """The flags a `disagg COMMAND...` process (a container's) runs with: DISAGG_* defaults from `environment` only
    (values that are not strings, e.g. Kubernetes' valueFrom, are left out)."""
    from disagg.tools.cli import build_parser  # (imports torch: only the tests that need it)

    for name in [name for name in os.environ if name.startswith("DISAGG_")]:
        monkeypatch.delenv(name)
    for name, value in environment.items():
        if isinstance(value, str | int | float):
            monkeypatch.setenv(name, str(value))
    return build_parser().parse_args(command)
