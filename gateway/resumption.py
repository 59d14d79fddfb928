"""Attempts of one request until one finishes it: a failed worker's request resumes elsewhere, a refused one goes
to another worker.

When a worker fails (UNAVAILABLE, or it cancelled the call while shutting down) the request resumes elsewhere: a
prefill worker recomputes prompt + the tokens already sent, a decode worker continues from there, and the client's
stream goes on with no token lost or repeated. A decode worker that refuses a sequence (its KV budget) is not
failing: the request goes to another one, and the client gets RESOURCE_EXHAUSTED only when every healthy one
refused.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from disagg import telemetry
from disagg.errors import NoWorkerAvailable
from disagg.kv.transports import DIRECT
from disagg.pb.disagg.v1 import gateway_pb2
from gateway.progress import Progress
from gateway.routes import Routes
from gateway.worker_calls import Deadline, HeldPrefixLost, WorkerFailed, WorkerRefused

log = logging.getLogger(__name__)
# One try of a request on one of the paths (disaggregated_attempt, aggregated_attempt, conditional_attempt).
Attempt = Callable[[Routes, Progress, Deadline], AsyncIterator[gateway_pb2.GenerateResponse]]


async def resuming(
    routes: Routes, attempt: Attempt, progress: Progress, deadline: Deadline
) -> AsyncGenerator[gateway_pb2.GenerateResponse, None]:
    """The responses of `attempt`, tried again after each refusal or failure it can survive."""
    failures = 0
    while True:
        progress.begin_attempt()
        try:
            async for response in attempt(routes, progress, deadline):
                yield response
            return
        except WorkerRefused as refused:
            elsewhere = refused.worker.kind == "aggregated" or (
                refused.worker.kind == "decode" and routes.transport == DIRECT
            )
            if not elsewhere:
                routes.pool(refused.worker).note_refusal(refused.worker)
                raise
            # direct: the prefill pushed the KV to that worker and cannot redirect it; prefill again for another;
            # aggregated: it refused before any work. Not a failure: bounded by the workers, each refuses a request
            # once.
            routes.refused(progress, refused)
        except HeldPrefixLost as lost:  # (once: only a decline sets progress.held, and only the first)
            telemetry.record_held_prefix(lost.outcome, lost.tokens)
            log.info("request %s: %s; handing it over whole", progress.request.request_id, lost)
            if lost.refused is not None:
                routes.refused(progress, lost.refused)
        except WorkerFailed as failure:
            routes.pool(failure.worker).mark_failed(failure.worker)
            failures += 1
            if progress.n > 1 and progress.sent_any:  # n sequences from one prefill: none resumes alone
                raise NoWorkerAvailable(f"n > 1 request cannot resume after its first tokens: {failure}") from failure
            if failures >= routes.config.max_attempts:
                raise NoWorkerAvailable(f"request failed on {failures} workers; last: {failure}") from failure
            log.warning(
                "request %s: %s; resuming after %d tokens",
                progress.request.request_id,
                failure,
                len(progress.generated),
            )
            progress.refusals.clear()  # later: the workers that refused may have room now
