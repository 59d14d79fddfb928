"""The OpenAI-compatible HTTP front: Starlette on uvicorn, in the gateway's process and event loop.

Every generation goes through the same pipeline as gRPC: `telemetry.observe_generate(servicer.Generate)`, i.e.
the gateway's validation, worker choice, retries and migration, deadlines, stream interval, root span and
metrics. This module only speaks HTTP: the bearer token (the gateway's --auth-token), TLS (its certificates),
JSON bodies (gateway.openai_protocol, gateway.openai_responses), SSE, and the mapping of the pipeline's statuses
to HTTP (one table, in gateway.openai_protocol).

Starlette rather than FastAPI: the handlers are five, the request schema is checked by hand anyway (OpenAI's
error envelope naming the field, not FastAPI's 422 body), and every layer less is CPU left to the model on a
small machine. uvicorn serves it inside the gateway's own asyncio loop (`serve` below), not in a thread or a
second process, so both fronts share one in-flight count and one set of worker channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from disagg import telemetry
from disagg.config import GatewayConfig
from disagg.pb.disagg.v1 import gateway_pb2
from disagg.rpc.interceptors import status_of
from disagg.rpc.streams import ReadAhead
from gateway import openai_protocol as oa
from gateway import openai_responses as bodies
from gateway.servicer import GatewayServicer
from gateway.worker_pool import WorkerPool

log = logging.getLogger(__name__)
TRACE_HEADERS = ("traceparent", "tracestate", "baggage")


class HttpCallContext:
    """What the shared pipeline asks of a call's context, for an HTTP request: the trace headers (as gRPC
    metadata) and the time left (the server's --request-timeout-seconds applies; HTTP has no deadline header)."""

    def __init__(self, request: Request):
        self._metadata = tuple((k, request.headers[k]) for k in TRACE_HEADERS if k in request.headers)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None

    def code(self) -> None:
        return None


def _json(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status, headers, media_type="application/json")


def _error(error: oa.HttpError) -> Response:
    return _json(error.body(), error.status)


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


class OpenAiApi:
    """The routes, over one GatewayServicer (the gRPC front's) and its worker pools."""

    def __init__(self, config: GatewayConfig, servicer: GatewayServicer, prefill: WorkerPool, decode: WorkerPool):
        self.config, self.servicer, self.pools = config, servicer, (prefill, decode)
        self._expected = f"Bearer {config.auth_token}".encode() if config.auth_token else None
        self.generate = telemetry.observe_generate(servicer.Generate)  # same root span and metrics as gRPC
        self.app = Starlette(
            routes=[
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/live", self.live, methods=["GET"]),
                Route("/metrics", self.metrics, methods=["GET"]),
            ],
            exception_handlers={404: self._not_found, 405: self._not_allowed},
        )

    # --- plain routes -----------------------------------------------------------------------------------------

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return _error(oa.HttpError(404, f"no route {request.url.path}", code="not_found"))

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return _error(oa.HttpError(405, f"{request.method} is not allowed on {request.url.path}"))

    async def live(self, request: Request) -> Response:
        return _json({"status": "live"})

    async def health(self, request: Request) -> Response:
        """Readiness: at least one healthy worker of each kind."""
        states = {pool.kind: [w.address for w in pool.workers.values() if w.healthy] for pool in self.pools}
        ready = all(states.values())
        return _json({"status": "ready" if ready else "unavailable", "healthy_workers": states}, 200 if ready else 503)

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(telemetry.registry()), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request) -> Response:
        if (refused := self._refuse_unauthorized(request)) is not None:
            return refused
        name = self.config.served_model_name or "default"
        card = {"id": name, "object": "model", "created": 0, "owned_by": "disagg"}
        return _json({"object": "list", "data": [card]})

    # --- generation -------------------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, oa.parse_completion)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, oa.parse_chat)

    def _refuse_unauthorized(self, request: Request) -> Response | None:
        if self._expected is None:
            return None
        given = request.headers.get("authorization", "").encode()
        if hmac.compare_digest(given, self._expected):
            return None
        return _error(
            oa.HttpError(401, "missing or wrong bearer token", "authentication_error", None, "invalid_api_key")
        )

    async def _body(self, request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.config.max_body_bytes:
            raise oa.HttpError(413, f"request body over {self.config.max_body_bytes} bytes", code="body_too_large")
        raw = bytearray()
        async for piece in request.stream():  # chunked bodies have no length header: count as they come
            raw += piece
            if len(raw) > self.config.max_body_bytes:
                raise oa.HttpError(413, f"request body over {self.config.max_body_bytes} bytes", code="body_too_large")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise oa.HttpError(400, f"the request body is not valid JSON: {exc}") from exc

    async def _generate(self, request: Request, parse: Callable[[Any, str], oa.ParsedRequest]) -> Response:
        if (refused := self._refuse_unauthorized(request)) is not None:
            return refused
        try:
            parsed = parse(await self._body(request), self.config.served_model_name)
        except oa.HttpError as error:
            return _error(error)
        except ClientDisconnect:
            return Response(status_code=499)
        # The pipeline runs in a task of its own (ReadAhead's), start to end: its span context and its cleanup stay
        # in one task whether the answer is streamed or not, and closing it cancels its worker calls.
        responses = ReadAhead(self.generate(parsed.request, HttpCallContext(request)), depth=64)
        try:
            first = await anext(responses)  # errors before any token get their own HTTP status
        except StopAsyncIteration:
            responses.close()
            return _error(oa.HttpError(500, "the generation ended without output", "server_error"))
        except Exception as exc:
            responses.close()
            return _error(self._count(request, exc))
        if parsed.stream:
            return StreamingResponse(
                self._events(request, parsed, first, responses),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache", "x-request-id": first.request_id},
            )
        try:
            return await self._whole(request, parsed, first, responses)
        finally:
            responses.close()

    def _count(self, request: Request, exc: BaseException) -> oa.HttpError:
        code, message = status_of(exc)
        telemetry.count_error(request.url.path, code)
        if code.name == "INTERNAL":
            log.exception("%s failed", request.url.path, exc_info=exc)
        return oa.from_status(code, message)

    async def _whole(
        self,
        request: Request,
        parsed: oa.ParsedRequest,
        first: gateway_pb2.GenerateResponse,
        responses: ReadAhead,
    ) -> Response:
        choices = [bodies.Choice() for _ in range(max(1, parsed.request.n))]
        usage = gateway_pb2.Usage()
        metrics: gateway_pb2.RequestMetrics | None = None

        def add(response: gateway_pb2.GenerateResponse) -> None:
            nonlocal metrics
            parsed.note_prompt_logprobs(response)
            choice = choices[response.index]
            choice.text += response.text
            choice.logprobs.extend(response.logprobs)
            if response.finish_reason:
                choice.finish_reason = response.finish_reason
            if response.HasField("usage"):
                usage.CopyFrom(response.usage)
            if response.HasField("metrics"):
                metrics = response.metrics

        add(first)
        request_id = first.request_id
        # A client that leaves stops the work: watch for it while the generation runs.
        gone = asyncio.create_task(_disconnected(request))
        try:
            async with _cancel_on(gone):
                async for response in responses:
                    add(response)
        except asyncio.CancelledError:
            if gone.done():
                return Response(status_code=499)
            raise
        except Exception as exc:
            return _error(self._count(request, exc))
        finally:
            gone.cancel()
        body = bodies.with_metrics(bodies.whole(parsed, request_id, choices, usage), metrics)
        return _json(body, headers=bodies.metrics_headers(body.get(bodies.METRICS_KEY, {})))

    async def _events(
        self,
        request: Request,
        parsed: oa.ParsedRequest,
        first: gateway_pb2.GenerateResponse,
        responses: ReadAhead,
    ) -> AsyncIterator[bytes]:
        """SSE: one chunk per message, the usage chunk if asked, [DONE]; a failure mid-stream is an error event.
        The request's metrics go in the last chunk: the usage chunk, else the one of the last message."""
        request_id = first.request_id
        choices = [bodies.Choice() for _ in range(max(1, parsed.request.n))]
        started: set[int] = set()
        usage = metrics = None

        def encode(response: gateway_pb2.GenerateResponse) -> bytes:
            nonlocal usage, metrics
            is_first = response.index not in started
            started.add(response.index)
            if response.HasField("usage"):
                usage = response.usage
            own = response.metrics if response.HasField("metrics") else None  # (the last message's)
            if own is not None:
                metrics = own
            body = bodies.chunk(parsed, request_id, response, choices[response.index], is_first)
            return _sse(body if parsed.include_usage else bodies.with_metrics(body, own))

        try:
            yield encode(first)
            async for response in responses:
                yield encode(response)
            if parsed.include_usage and usage is not None:
                yield _sse(bodies.with_metrics(bodies.usage_chunk(parsed, request_id, usage), metrics))
        except Exception as exc:  # the status line is gone: say it in-band, then end the stream properly
            yield _sse(self._count(request, exc).body())
        finally:
            responses.close()  # also when the client left (this task is cancelled): the workers free the KV
        yield DONE


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (for non-streaming answers; SSE responses notice it themselves)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


@contextlib.asynccontextmanager
async def _cancel_on(event_task: asyncio.Task) -> AsyncIterator[None]:
    """Cancel the current task if `event_task` finishes first."""
    current = asyncio.current_task()
    assert current is not None

    def on_done(_: asyncio.Task) -> None:
        if not event_task.cancelled():
            current.cancel()

    event_task.add_done_callback(on_done)
    try:
        yield
    finally:
        event_task.remove_done_callback(on_done)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the gateway's SIGTERM path stops both fronts."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def ssl_options(config: GatewayConfig) -> dict[str, Any]:
    """uvicorn's TLS settings from the gateway's own (--tls-cert/--tls-key; mutual TLS with --tls-ca)."""
    tls = config.tls
    if not tls.tls_cert:
        return {}
    options: dict[str, Any] = {"ssl_certfile": tls.tls_cert, "ssl_keyfile": tls.tls_key}
    if tls.tls_ca:
        options["ssl_ca_certs"] = tls.tls_ca
    if tls.tls_require_client_cert:
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return options


class HttpFront:
    """The running HTTP server: `await start()` once listening, `await stop()` lets open streams end first."""

    def __init__(self, api: OpenAiApi, config: GatewayConfig):
        uv_config = uvicorn.Config(
            api.app,
            host=config.host,
            port=config.http_port,
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=int(config.grace_seconds),
            **ssl_options(config),
        )
        self.server = _EmbeddedServer(uv_config)
        self._task: asyncio.Task | None = None
        self.scheme = "https" if config.tls.tls_cert else "http"

    async def start(self, timeout: float = 30.0) -> None:
        self._task = asyncio.create_task(self.server.serve())
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it (port in use, bad certificate)
                raise OSError("the HTTP server stopped before it started")
            if time.monotonic() > deadline:
                raise TimeoutError("the HTTP server did not start")
            await asyncio.sleep(0.02)
        sockets = [s for server in self.server.servers for s in server.sockets]
        host, port = sockets[0].getsockname()[:2]
        print(f"OpenAI-compatible HTTP API on {self.scheme}://{host}:{port}/v1", flush=True)

    async def stop(self) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(Exception):
            await self._task
