"""`disagg up`: a local cluster of worker and gateway processes on loopback, started and stopped in order."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from disagg.config import TlsOptions
from disagg.rpc.channel import open_channel
from disagg.tools import lifeline
from disagg.tools.client import wait_serving

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Child:
    name: str
    address: str
    process: subprocess.Popen
    argv: list[str]
    env: dict[str, str]
    metrics_address: str = ""  # host:port of its Prometheus /metrics endpoint ("" when off)

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


def stop(children: list[Child], grace: float = 15.0) -> None:
    """SIGTERM each child in the given order (gateway first), waiting for each; SIGKILL stragglers."""
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
            try:
                child.process.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", child.name, grace)
                child.process.kill()
                child.process.wait()


def role_threads(cores: int, workers_of_role: int) -> int:
    """Torch threads of each of `workers_of_role` workers of one role (prefill, decode or aggregated) on a host of
    `cores`: the role's workers split the cores, and each role gets all of them.

    Workers of one role are busy at the same time under load, so they must not oversubscribe the cores; prefill and
    decode mostly take turns (a request is in one phase at a time, and waves of arrivals alternate), and with a
    short OpenMP spin (disagg/tools/launch.py) a worker that waits gives its cores to the other. Measured in
    results/threads_*.md (A/B against 1 thread each).
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
        `--local-prefill-tokens`)."""
        if local_prefill_tokens > 0 and not aggregated_workers:
            decode_args = [*decode_args, "--local-prefill"]
            gateway_args = [*gateway_args, "--local-prefill-tokens", str(local_prefill_tokens)]
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

    async def start(self, timeout: float = 600.0) -> str:
        try:
            await wait_healthy(self.workers, timeout, self.tls)
            self.gateway = spawn(
                "gateway", ["gateway", *self._gateway_args], self._gateway_port, self._env, self._metrics_port()
            )
            await wait_healthy([self.gateway], timeout, self.tls)
        except BaseException:
            self.stop()
            raise
        return self.gateway.address

    @property
    def workers(self) -> list[Child]:
        return self.prefill + self.decode + self.aggregated

    def stop(self) -> None:
        stop(([self.gateway] if self.gateway else []) + self.workers)


def worker_args(args: argparse.Namespace, kv_cache: bool) -> list[str]:
    """The model flags of `disagg up` / `disagg bench` (add_model_flags) as the worker command line takes them."""
    return [
        *("--model", args.model, "--load-format", args.load_format, "--dtype", args.dtype, "--device", args.device),
        *("--seed", str(args.seed), "--threads", str(args.threads)),
        "--kv-cache" if kv_cache else "--no-kv-cache",
    ]
