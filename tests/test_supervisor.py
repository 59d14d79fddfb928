"""`disagg up` stops in order and exits last: the gateway drains first, then the workers; what outlives its grace
period plus the margin (or a second signal) is SIGKILLed, and the exit status says so."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import grpc
import pytest

from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc
from disagg.tools.cluster import Child, free_port, stop_in_stages
from disagg.tools.supervisor import EXIT_CLEAN, EXIT_KILLED
from tests.processes import RunningUp, alive, children_of, command_of, start_up

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")

UP_FLAGS = ("--model", "distilgpt2", "--load-format", "dummy", "--threads", "1", "--http-port", "0")
GATEWAY_GRACE = "--gateway-args=--grace-seconds 120"  # long: a stream in flight must be able to finish


class ExitWatch:
    """The order in which processes exit, seen from /proc by a polling thread (no timing is asserted)."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.gone: list[str] = []
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while len(self.gone) < len(self.pids):
            for name, pid in self.pids.items():
                if name not in self.gone and not alive(pid):
                    self.gone.append(name)
            time.sleep(0.01)

    def join(self, timeout: float) -> list[str]:
        self._thread.join(timeout)
        return self.gone


def _roles(up: RunningUp) -> dict[str, int]:
    """{"gateway" | "prefill" | "decode": pid} of the supervisor's children."""
    roles = {command_of(pid)[3]: pid for pid in children_of(up.process.pid)}
    assert sorted(roles) == ["decode", "gateway", "prefill"], roles
    return roles


def _gateway_address(up: RunningUp) -> str:
    line = up.wait_for_line("cluster ready", 0)
    return line.split("gateway on ")[1].split()[0]


class Stream:
    """A Generate stream read on a thread: tokens as they come, then how it ended."""

    def __init__(self, address: str, max_new_tokens: int):
        self.tokens = 0
        self.finish_reason = ""
        self.error: grpc.RpcError | None = None
        self.first_token = threading.Event()
        self._channel = grpc.insecure_channel(address)
        request = gateway_pb2.GenerateRequest(prompt="Hello there", max_new_tokens=max_new_tokens, ignore_eos=True)
        self._call = gateway_pb2_grpc.GatewayStub(self._channel).Generate(request, timeout=300)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self._call:
                self.tokens += len(response.token_ids)
                self.finish_reason = response.finish_reason or self.finish_reason
                if self.tokens:
                    self.first_token.set()
        except grpc.RpcError as error:
            self.error = error
        finally:
            self.first_token.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        self._channel.close()


def _assert_no_child_outlived(up: RunningUp, roles: dict[str, int]) -> None:
    """Right at the supervisor's exit, its children are not only dead but reaped by it: an orphan would still be in
    /proc (alive, or a zombie of its new parent)."""
    assert [name for name, pid in roles.items() if os.path.exists(f"/proc/{pid}")] == []
    assert children_of(up.process.pid) == []


@pytest.mark.cluster
def test_sigterm_drains_the_stream_then_stops_gateway_before_workers():
    up = start_up(*UP_FLAGS, "--port", str(free_port()), GATEWAY_GRACE)
    try:
        roles = _roles(up)
        watch = ExitWatch(roles)
        stream = Stream(_gateway_address(up), max_new_tokens=200)
        assert stream.first_token.wait(120) and stream.error is None
        up.process.send_signal(signal.SIGTERM)
        tokens_at_sigterm = stream.tokens
        stream.join(300)
        status = up.finish(300)
    finally:
        if up.process.poll() is None:
            up.process.kill()
    out = up.output()
    assert status == EXIT_CLEAN, out
    assert tokens_at_sigterm < 200
    assert (stream.error, stream.tokens, stream.finish_reason) == (None, 200, "length"), out  # drained, not cut
    _assert_no_child_outlived(up, roles)
    gone = watch.join(10)
    assert gone[0] == "gateway" and sorted(gone[1:]) == ["decode", "prefill"], gone
    # The supervisor's account says the same, in order: the gateway exited before the workers were signalled.
    said = [line for line in out.splitlines() if line.startswith("disagg up: ")]
    assert said[0] == "disagg up: SIGTERM: stopping the cluster (again to kill it at once)"
    assert said[1] == "disagg up: stopping gateway"
    assert said[2].startswith(f"disagg up: gateway (pid {roles['gateway']}) exited with code 0 ")
    assert said[3] == "disagg up: stopping prefill-0, decode-0"
    assert sorted(line.split(" (pid")[0] for line in said[4:6]) == ["disagg up: decode-0", "disagg up: prefill-0"]
    assert all(" exited with code 0 " in line for line in said[4:6]), said
    assert said[6:] == ["disagg up: cluster stopped"]


@pytest.mark.cluster
def test_a_second_signal_kills_what_runs_and_the_status_says_so():
    up = start_up(*UP_FLAGS, "--port", str(free_port()), GATEWAY_GRACE)
    try:
        roles = _roles(up)
        stream = Stream(_gateway_address(up), max_new_tokens=900)  # far longer than the test takes to stop it
        assert stream.first_token.wait(120) and stream.error is None
        up.process.send_signal(signal.SIGTERM)
        up.wait_for_line("disagg up: stopping gateway", 30)  # draining: the stream still runs
        up.process.send_signal(signal.SIGINT)  # Ctrl-C: no more waiting
        status = up.finish(60)
        stream.join(60)
    finally:
        if up.process.poll() is None:
            up.process.kill()
    out = up.output()
    assert status == EXIT_KILLED, out
    assert "disagg up: SIGINT again: killing what still runs" in out
    assert "disagg up: cluster stopped; killed: gateway, prefill-0, decode-0 (exit status 3)" in out
    assert stream.error is not None and stream.tokens < 900  # cut: the client sees an error, not a short success
    _assert_no_child_outlived(up, roles)


# Stand-in children for the stop itself: each writes "<event> <time>" lines to a file, so the order of events
# across processes can be read back.
_STAND_IN = textwrap.dedent("""
    import signal, sys, time
    log, behaviour = sys.argv[1], sys.argv[2]
    def note(event):
        with open(log, "a") as f:
            f.write(f"{event} {time.time()!r}\\n")
    def on_term(signum, frame):
        note("sigterm")
        if behaviour == "drains":
            time.sleep(0.5)  # its drain
            note("exit")
            sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)  # "ignores": notes it and keeps running
    note("ready")
    while True:
        time.sleep(0.05)
""")


def _stand_in(tmp_path, name: str, behaviour: str, grace: float) -> Child:
    log = tmp_path / f"{name}.log"
    argv = [sys.executable, "-c", _STAND_IN, str(log), behaviour, "--grace-seconds", str(grace)]
    child = Child(name, "", subprocess.Popen(argv), argv, {})
    deadline = time.monotonic() + 30
    while not (log.exists() and "ready" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return child


def _events(tmp_path, name: str) -> dict[str, float]:
    return {
        event: float(at) for event, at in (line.split() for line in (tmp_path / f"{name}.log").read_text().splitlines())
    }


def test_stages_stop_in_order_and_a_child_past_its_grace_is_killed(tmp_path):
    front = _stand_in(tmp_path, "front", "drains", grace=30)
    stuck = _stand_in(tmp_path, "stuck", "ignores", grace=0.2)
    back = _stand_in(tmp_path, "back", "drains", grace=30)
    said: list[str] = []
    killed = stop_in_stages([[front], [stuck, back]], margin=0.3, say=said.append)
    assert killed == [stuck]
    assert front.process.returncode == 0 and back.process.returncode == 0
    assert stuck.process.returncode == -signal.SIGKILL
    # The second stage was signalled only after the first had exited.
    assert _events(tmp_path, "front")["exit"] < _events(tmp_path, "stuck")["sigterm"]
    assert _events(tmp_path, "front")["exit"] < _events(tmp_path, "back")["sigterm"]
    assert said[0] == "stopping front" and said[2] == "stopping stuck, back"
    assert "stuck (pid" in said[3] and "killing it" in said[3]


def test_forcing_kills_everything_still_running_at_once(tmp_path):
    first = _stand_in(tmp_path, "first", "ignores", grace=60)
    second = _stand_in(tmp_path, "second", "ignores", grace=60)
    forced = threading.Event()
    threading.Timer(0.5, forced.set).start()  # a second Ctrl-C while the first stage drains
    killed = stop_in_stages([[first], [second]], margin=60, force=forced.is_set, say=lambda line: None)
    assert killed == [first, second]
    assert first.process.returncode == second.process.returncode == -signal.SIGKILL
    assert "sigterm" not in _events(tmp_path, "second")  # never asked: killed outright


def test_a_childs_grace_comes_from_its_command_then_its_environment():
    def child(argv: list[str], env: dict[str, str]) -> Child:
        return Child("c", "", subprocess.Popen(["true"]), argv, env)

    assert child(["disagg", "gateway"], {}).grace_seconds == 10.0  # the components' default
    assert child(["decode", "--grace-seconds", "3"], {"DISAGG_GRACE_SECONDS": "7"}).grace_seconds == 3.0
    assert child(["decode", "--grace-seconds=4", "--grace-seconds", "5"], {}).grace_seconds == 5.0  # the last wins
    assert child(["decode"], {"DISAGG_GRACE_SECONDS": "7"}).grace_seconds == 7.0


def test_no_two_children_are_told_the_same_port():
    """A child binds its ports only after loading its model, so the kernel may offer a port again meanwhile (a
    prefill worker's gRPC port once became a decode worker's /metrics port); each port is handed out once."""
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
