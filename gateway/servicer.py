"""Gateway.Generate: prefill on one worker, relay its KV chunk by chunk to a decode worker, stream tokens back."""

from __future__ import annotations

import grpc

from disagg.config import GatewayConfig
from disagg.errors import ProtocolError, UpstreamError
from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc, worker_pb2
from gateway.validation import to_prefill_request
from gateway.worker_pool import WorkerPool


def _upstream(kind: str, address: str, error: grpc.aio.AioRpcError) -> UpstreamError:
    return UpstreamError(error.code(), f"{kind} worker {address}: {error.details()}")


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, config: GatewayConfig, prefill: WorkerPool, decode: WorkerPool):
        self.config, self.prefill, self.decode = config, prefill, decode

    def _timeout(self, context) -> float:
        remaining = context.time_remaining()
        limit = self.config.request_timeout_seconds
        return limit if remaining is None else min(limit, remaining)

    async def Generate(self, request: gateway_pb2.GenerateRequest, context):
        prefill_request = to_prefill_request(request, self.config)
        request_id = prefill_request.request_id
        metadata = (("x-request-id", request_id),)
        prefill_worker = self.prefill.pick()
        prefill_worker.in_flight += 1
        prefill_call = prefill_worker.stub.Prefill(prefill_request, timeout=self._timeout(context), metadata=metadata)
        decode_call = decode_worker = None
        prompt_tokens = completion_tokens = 0
        try:
            try:
                async for message in prefill_call:
                    kind = message.WhichOneof("event")
                    if kind == "start":
                        prompt_tokens = len(message.start.prompt_token_ids)
                        decode_worker = self.decode.pick()
                        decode_worker.in_flight += 1
                        decode_call = decode_worker.stub.Decode(timeout=self._timeout(context), metadata=metadata)
                    elif decode_call is None:
                        raise ProtocolError(f"prefill worker sent {kind} before SequenceStart")
                    if kind == "first_token":
                        first = message.first_token
                        completion_tokens = 1
                        yield gateway_pb2.GenerateResponse(text=first.text, token_ids=[first.token_id],
                                                           request_id=request_id)
                        if first.finish_reason:
                            decode_call.cancel()
                            yield self._last(first.finish_reason, prompt_tokens, completion_tokens)
                            return
                    await decode_call.write(worker_pb2.DecodeRequest(**{kind: getattr(message, kind)}))
            except grpc.aio.AioRpcError as error:
                raise _upstream("prefill", prefill_worker.address, error) from error
            finally:
                prefill_worker.in_flight -= 1
            try:
                await decode_call.done_writing()
                async for out in decode_call:
                    completion_tokens += len(out.token_ids)
                    if out.finish_reason:
                        yield gateway_pb2.GenerateResponse(
                            text=out.text, token_ids=out.token_ids, finish_reason=out.finish_reason,
                            usage=gateway_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens))
                        return
                    yield gateway_pb2.GenerateResponse(text=out.text, token_ids=out.token_ids)
            except grpc.aio.AioRpcError as error:
                raise _upstream("decode", decode_worker.address, error) from error
            raise ProtocolError(f"decode worker {decode_worker.address} ended the stream without a finish reason")
        finally:
            prefill_call.cancel()
            if decode_call is not None:
                decode_call.cancel()
                decode_worker.in_flight -= 1

    @staticmethod
    def _last(finish_reason: str, prompt_tokens: int, completion_tokens: int) -> gateway_pb2.GenerateResponse:
        return gateway_pb2.GenerateResponse(
            finish_reason=finish_reason,
            usage=gateway_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens))
