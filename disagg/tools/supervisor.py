"""`disagg up`'s supervisor: start a cluster, watch it, and on SIGINT/SIGTERM stop it in order and exit last.

The stop is the cluster's (`Cluster.stop`): the gateway first, which drains its streams while the workers still
serve them, then the workers, each given its grace period plus a margin before it is SIGKILLed. The supervisor
exits only once every child has exited and been reaped, with a status that says how the stop went:

- `EXIT_CLEAN` (0): every child exited on its own after SIGTERM;
- `EXIT_START_FAILED` (1): the cluster did not start (a child exited, a port was taken, the start timed out);
- `EXIT_KILLED` (3): some child had to be SIGKILLed (past its grace period plus the margin, or a second signal).

Signals are handled from the first moment, with Python-level handlers that only count them, because every way the
supervisor can die early takes its children's drain with it (their parent-death signal, `lifeline`, then ends
them): the default SIGTERM action during a minutes-long model load, an asyncio loop that restores the default
handlers when it closes (a second SIGTERM during the stop), a KeyboardInterrupt raised in the middle of the stop.
A second signal is the user insisting: what still runs is SIGKILLed at once, and the supervisor still exits last.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import AsyncIterator, Callable
from types import FrameType

from disagg.tools.cluster import Child, Cluster

EXIT_CLEAN = 0
EXIT_START_FAILED = 1
EXIT_KILLED = 3
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def say(line: str) -> None:
    """A line for the terminal (stdout, beside the children's logs); a terminal that went away is not an error."""
    with contextlib.suppress(OSError):
        print(f"disagg up: {line}", flush=True)


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP as requests, counted: the first asks for the orderly stop, a second for SIGKILL."""

    def __init__(self) -> None:
        self.received = 0
        self._wake: Callable[[], object] | None = None  # sets the running event loop's stop event

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received += 1
        name = signal.Signals(signum).name
        if self.received == 1:
            say(f"{name}: stopping the cluster (again to kill it at once)")
        elif self.received == 2:
            say(f"{name} again: killing what still runs")
        if self._wake is not None:
            with contextlib.suppress(RuntimeError):  # (the loop is closing)
                self._wake()

    @property
    def forced(self) -> bool:
        return self.received >= 2

    @contextlib.asynccontextmanager
    async def waiting(self) -> AsyncIterator[asyncio.Event]:
        """An event set on the first signal (or already set), for the running event loop."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        if self.received:
            event.set()
        self._wake = lambda: loop.call_soon_threadsafe(event.set)
        try:
            yield event
        finally:
            self._wake = None


def port_taken(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could not listen on `port` now (as servers bind: SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


async def _serve(
    cluster: Cluster, signals: StopSignals, start_timeout: float, announce: Callable[[Cluster, str], None]
) -> bool:
    """Start the cluster, announce it, and watch it until the first stop signal; False if that came first."""
    async with signals.waiting() as stopping:
        starting = asyncio.ensure_future(cluster.start(start_timeout, stop_on_failure=False))
        stop_waiter = asyncio.ensure_future(stopping.wait())
        await asyncio.wait([starting, stop_waiter], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return False
        stop_waiter.cancel()
        address = starting.result()  # (raises the start's failure)
        announce(cluster, address)
        exited: set[str] = set()
        while not stopping.is_set():
            for child in cluster.children:
                if child.name not in exited and child.process.poll() is not None:
                    exited.add(child.name)
                    say(f"{child.name} exited on its own with code {child.process.returncode}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 1.0)
        return True


def supervise(
    make_cluster: Callable[[], Cluster],
    announce: Callable[[Cluster, str], None],
    start_timeout: float,
    ports: dict[str, int],
) -> int:
    """Run a cluster until SIGINT/SIGTERM/SIGHUP, stop it in order, and return the exit status (module docstring).

    `ports` ({flag: port}, 0 = none) must be free before any child starts: a taken one would otherwise be found
    only by the gateway, after the workers spent minutes loading the model."""
    signals = StopSignals()
    signals.install()  # first: a signal from here on stops the children, it does not orphan them
    taken = [f"{flag} {port}" for flag, port in ports.items() if port and port_taken(port)]
    if taken:
        say(f"port in use: {', '.join(taken)} (choose another port, or 0 where that turns the server off)")
        return EXIT_START_FAILED
    cluster = make_cluster()
    status = EXIT_CLEAN
    try:
        asyncio.run(_serve(cluster, signals, start_timeout, announce))
    except Exception as error:  # any failure to start: said in one line, then the orderly stop
        say(f"the cluster did not start: {error}")
        status = EXIT_START_FAILED
    finally:
        killed: list[Child] = cluster.stop(force=lambda: signals.forced, say=say)
    if killed:
        say(f"cluster stopped; killed: {', '.join(child.name for child in killed)} (exit status {EXIT_KILLED})")
        return EXIT_KILLED
    say("cluster stopped")
    return status
