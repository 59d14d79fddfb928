"""`disagg up`: a local cluster of worker and gateway processes on loopback, started and stopped in order."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from disagg.config import GatewayConfig, TlsOptions, WorkerConfig
from disagg.rpc.channel import open_channel
from disagg.tools import lifeline
from disagg.tools.client import wait_serving

log = logging.getLogger(__name__)

# Seconds a stopped child may take beyond its grace period (its drain) before it is killed: leaving the event loop,
# flushing its last spans and metrics, freeing the model. Exits take well under a second on an idle host.
STOP_MARGIN_SECONDS = 5.0


_handed_out: set[int] = set()  # ports this process has given a child: a child binds its ports only once its model is
# loaded, so until then the kernel may offer one of them again, and two children would be told the same port


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now and not yet handed out by this process."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


@dataclass
class Child:
    name: str
    address: str
    process: subprocess.Popen
    argv: list[str]
    env: dict[str, str]
    metrics_address: str = ""  # host:port of its Prometheus /metrics endpoint ("" when off)

    @property
    def grace_seconds(self) -> float:
        """The drain its SIGTERM starts: its command's last `--grace-seconds`, else DISAGG_GRACE_SECONDS in its
        environment, else the component's default."""
        for i in range(len(self.argv) - 1, -1, -1):
            arg = self.argv[i]
            if arg.startswith("--grace-seconds="):
                return float(arg.partition("=")[2])
            if arg == "--grace-seconds" and i + 1 < len(self.argv):
                return float(self.argv[i + 1])
        if "DISAGG_GRACE_SECONDS" in self.env:
            return float(self.env["DISAGG_GRACE_SECONDS"])
        return GatewayConfig.grace_seconds if "gateway" in self.argv else WorkerConfig.grace_seconds

    def restart(self) -> None:
        """Start the same command again on the same port (after it died or was killed)."""
        if self.process.poll() is None:
            raise RuntimeError(f"{self.name} is still running")
        self.process = _popen(self.argv, self.env)


def _popen(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    """A child in its own session (Ctrl-C reaches only `disagg up`) that still dies with this process."""
    return subprocess.Popen(argv, env={**env, **lifeline.child_env()}, start_new_session=True)


def spawn(name: str, command: list[str], port: int, env: dict[str, str] | None = None, metrics_port: int = 0) -> Child:
    argv = [
        sys.executable,
        "-m",
        "disagg",
        *command,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
    ]
    full_env = {**os.environ, **(env or {})}
    return Child(
        name,
        f"127.0.0.1:{port}",
        _popen(argv, full_env),
        argv,
        full_env,
        f"127.0.0.1:{metrics_port}" if metrics_port else "",
    )


async def wait_healthy(children: list[Child], timeout: float, tls: TlsOptions | None = None) -> None:
    """Until every child answers SERVING; raises if one exits first or the timeout passes."""
    for child in children:
        async with open_channel(child.address, tls) as ch:
            waiter = asyncio.ensure_future(wait_serving(ch, timeout))
            while not waiter.done():
                if child.process.poll() is not None:
                    waiter.cancel()
                    raise RuntimeError(f"{child.name} exited with code {child.process.returncode}")
                await asyncio.wait([waiter], timeout=0.5)
            waiter.result()


def stop(children: Sequence[Child], margin: float = STOP_MARGIN_SECONDS) -> list[Child]:
    """SIGTERM each child in the given order, waiting for each (see `stop_in_stages`); returns those killed."""
    return stop_in_stages([[child] for child in children], margin)


def stop_in_stages(
    stages: Sequence[Sequence[Child]],
    margin: float = STOP_MARGIN_SECONDS,
    force: Callable[[], bool] = lambda: False,
    say: Callable[[str], None] = log.info,
) -> list[Child]:
    """Stop stage after stage (a cluster: the gateway, which drains its streams while the workers still serve
    them, then the workers together): SIGTERM a stage's children, wait for each up to its grace period plus
    `margin`, SIGKILL what is left, then the next stage. Once `force()` is true (a second Ctrl-C), everything still
    running is SIGKILLed at once. Every child has exited (and is reaped) on return; returns those killed."""
    killed: list[Child] = []

    def kill(child: Child, reason: str) -> None:
        say(f"{child.name} (pid {child.process.pid}) {reason}: killing it")
        child.process.kill()
        child.process.wait()
        killed.append(child)

    for stage in stages:
        running = [child for child in stage if child.process.poll() is None]
        if not running:
            continue
        if force():
            for child in running:
                kill(child, "not stopped yet after a second stop signal")
            continue
        say(f"stopping {', '.join(child.name for child in running)}")
        started = time.monotonic()
        for child in running:
            with contextlib.suppress(ProcessLookupError):  # (exited since the poll)
                child.process.send_signal(signal.SIGTERM)
        for child in running:
            deadline = started + child.grace_seconds + margin
            while child.process.poll() is None and time.monotonic() < deadline and not force():
                time.sleep(0.05)
            if child.process.poll() is None:
                waited = f"its grace period plus {margin:g}s"
                kill(child, "still running after " + ("a second stop signal" if force() else waited))
            else:
                say(
                    f"{child.name} (pid {child.process.pid}) exited with code {child.process.returncode} "
                    f"{time.monotonic() - started:.1f}s after SIGTERM"
                )
    return killed


def role_threads(cores: int, workers_of_role: int) -> int:
    """Torch threads of each of `workers_of_role` workers of one role (prefill, decode or aggregated) on a host of
    `cores`: the role's workers split the cores, and each role gets all of them.

    Workers of one role are busy at the same time under load, so they must not oversubscribe the cores; prefill and
    decode mostly take turns (a request is in one phase at a time, and waves of arrivals alternate), and with a
    short OpenMP spin (disagg/tools/launch.py) a worker that waits gives its cores to the other. Measured in
    benchmarks/results/threads_*.md (A/B against 1 thread each).
    """
    return max(1, cores // max(1, workers_of_role))


def with_threads(argv: Sequence[str], threads: int) -> list[str]:
    """`argv` with `--threads threads` unless it already names a thread count other than 0 (0 = choose for me)."""
    argv = list(argv)
    given = [i for i, arg in enumerate(argv) if arg == "--threads" and i + 1 < len(argv)]
    if given and argv[given[-1] + 1] != "0":
        return argv
    return [*argv, "--threads", str(threads)]


class Cluster:
    """N prefill workers, M decode workers and a gateway, all children of this process; or, with
    `aggregated_workers` > 0, that many aggregated workers (`decode --aggregated`, given `decode_args` too) and a
    gateway with `--aggregated` (no prefill or decode workers).

    Workers whose arguments leave `--threads` at 0 get `role_threads` of this host's cores.
    """

    def __init__(
        self,
        worker_args: list[str],
        gateway_args: list[str],
        prefill_workers: int = 1,
        decode_workers: int = 1,
        gateway_port: int = 0,
        prefill_args: Sequence[str] = (),
        decode_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        tls: TlsOptions | None = None,
        metrics: bool = True,
        aggregated_workers: int = 0,
        local_prefill_tokens: int = 0,
    ):
        """`local_prefill_tokens` > 0: conditional disaggregation (decode workers `--local-prefill`, the gateway's
        `--local-prefill-tokens`); 0, the default, sends every prompt to a prefill worker. Both flags are given
        either way, ahead of `decode_args` and `gateway_args` (which may override them), so that a DISAGG_*
        variable in the environment cannot turn on one half of the pair without the other."""
        if not aggregated_workers:
            local = local_prefill_tokens > 0
            decode_args = ["--local-prefill" if local else "--no-local-prefill", *decode_args]
            gateway_args = ["--local-prefill-tokens", str(max(0, local_prefill_tokens)), *gateway_args]
        self._metrics_port = free_port if metrics else (lambda: 0)  # each child serves /metrics on its own port
        if aggregated_workers:
            prefill_workers = decode_workers = 0
        cores = os.cpu_count() or 1

        def role(name: str, command: list[str], count: int) -> list[Child]:
            argv = with_threads(command, role_threads(cores, count))
            return [spawn(f"{name}-{i}", argv, free_port(), env, self._metrics_port()) for i in range(count)]

        self.prefill = role("prefill", ["prefill", *worker_args, *prefill_args], prefill_workers)
        self.decode = role("decode", ["decode", *worker_args, *decode_args], decode_workers)
        self.aggregated = role("aggregated", ["decode", "--aggregated", *worker_args, *decode_args], aggregated_workers)
        self.gateway: Child | None = None
        self._gateway_args = [*gateway_args, "--aggregated", ",".join(c.address for c in self.aggregated)]
        if not aggregated_workers:
            self._gateway_args = [
                *gateway_args,
                "--prefill",
                ",".join(c.address for c in self.prefill),
                "--decode",
                ",".join(c.address for c in self.decode),
            ]
        self._gateway_port = gateway_port or free_port()
        self._env = env
        self.tls = tls  # how to reach the children for health checks, when they serve TLS

    async def start(self, timeout: float = 600.0, stop_on_failure: bool = True) -> str:
        """Wait for the workers, then start the gateway and wait for it; its address. On failure (or cancellation)
        every child is stopped first, unless the caller stops them itself (`stop_on_failure=False`)."""
        try:
            await wait_healthy(self.workers, timeout, self.tls)
            self.gateway = spawn(
                "gateway", ["gateway", *self._gateway_args], self._gateway_port, self._env, self._metrics_port()
            )
            await wait_healthy([self.gateway], timeout, self.tls)
        except BaseException:
            if stop_on_failure:
                self.stop()
            raise
        return self.gateway.address

    @property
    def workers(self) -> list[Child]:
        return self.prefill + self.decode + self.aggregated

    @property
    def children(self) -> list[Child]:
        return ([self.gateway] if self.gateway else []) + self.workers

    def stop(self, force: Callable[[], bool] = lambda: False, say: Callable[[str], None] = log.info) -> list[Child]:
        """The gateway first (it drains its streams, which need the workers), then the workers together; returns the
        children that had to be killed (see `stop_in_stages`)."""
        stages = [[self.gateway] if self.gateway else [], self.workers]
        return stop_in_stages(stages, force=force, say=say)


def worker_args(args: argparse.Namespace, kv_cache: bool) -> list[str]:
    """The model flags of `disagg up` / `disagg bench` (add_model_flags) as the worker command line takes them."""
    return [
        *("--model", args.model, "--load-format", args.load_format, "--dtype", args.dtype, "--device", args.device),
        *("--seed", str(args.seed), "--threads", str(args.threads)),
        "--kv-cache" if kv_cache else "--no-kv-cache",
    ]
