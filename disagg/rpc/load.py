"""WorkerLoadService: what a worker reports about its load, for the gateway's choice of worker."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from disagg.engine.memory import rss_bytes
from disagg.pb.disagg.v1 import worker_pb2, worker_pb2_grpc

LoadReport = Callable[[], dict[str, Any]]  # () -> GetLoadResponse fields the servicer keeps


class LoadServicer(worker_pb2_grpc.WorkerLoadServiceServicer):
    """Reports the numbers a worker's servicer keeps (active sequences, queue, KV bytes), plus its RSS."""

    def __init__(self, report: LoadReport):
        self._report = report

    async def GetLoad(
        self, request: worker_pb2.GetLoadRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.GetLoadResponse:
        return worker_pb2.GetLoadResponse(rss_bytes=rss_bytes(), **self._report())
