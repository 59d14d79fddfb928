"""The thread that owns a worker's model: waits for work, gathers a batch within the wait window, runs it.

The gRPC servers are asyncio; the model runs here, off the event loop (torch releases the GIL), and hands results
back through callbacks that the servicers bind to their loop.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Generic, TypeVar

from disagg.config import BatchPolicy
from disagg.engine.memory import release_free_memory
from disagg.engine.queueing import PriorityQueue
from disagg.errors import Overloaded

log = logging.getLogger(__name__)
Job = TypeVar("Job")
IDLE_TRIM_SECONDS = 0.5  # idle this long after work: freed memory goes back to the OS (not between busy steps)


class EngineThread(Generic[Job]):
    """A bounded queue of jobs, in priority order (disagg.engine.queueing), and a daemon thread calling
    `run_once` while there is work.

    Subclasses implement `run_once()` (take what they can from `self.waiting`, run one forward pass) and
    `busy()` (work that is not in the queue, such as a running decode batch).
    """

    name = "engine"

    def __init__(self, policy: BatchPolicy):
        self.policy = policy
        self.waiting: PriorityQueue[Job] = PriorityQueue()
        self.lock = threading.Condition()
        self._stopped = False
        self._worked = False  # ran work since the last trim of freed memory
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)

    @property
    def queued(self) -> int:
        """Jobs waiting for the engine (what a worker reports as its queue)."""
        return len(self.waiting)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self.lock:
            self._stopped = True
            self.lock.notify_all()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self.lock:
            if len(self.waiting) >= self.policy.max_queue:
                raise Overloaded(f"{self.name} queue is full ({self.policy.max_queue} waiting); retry later")
            self.waiting.append(job)
            self.lock.notify_all()

    def busy(self) -> bool:
        return False

    def run_once(self) -> None:
        raise NotImplementedError

    def _wait_for_batch(self) -> bool:
        """Block until there is work; when idle, give the wait window a chance to fill the batch."""
        while True:
            with self.lock:
                if self._stopped or self.waiting or self.busy():
                    break
                if self.lock.wait(IDLE_TRIM_SECONDS if self._worked else None) or not self._worked:
                    continue  # woken (or still idle, already trimmed): look again
                self._worked = False
            release_free_memory()  # a few ms, once per idle spell, outside the lock: submit() never waits for it
        with self.lock:
            self._worked = True
            if self._stopped:
                return False
            if not self.busy() and self.policy.wait_window_ms > 0:
                deadline = time.monotonic() + self.policy.wait_window_ms / 1000
                while (
                    len(self.waiting) < self.policy.max_batch_size
                    and not self._stopped
                    and (left := deadline - time.monotonic()) > 0
                ):
                    self.lock.wait(left)
            return not self._stopped

    def _loop(self) -> None:
        while self._wait_for_batch():
            try:
                self.run_once()
            except Exception:  # a failed step must not kill the worker; run_once reports it to its requests
                log.exception("%s step failed", self.name)
