"""A handed-over prompt as the decode batch's sequences: one, or n > 1 forked from the one received KV cache.

Forking costs nothing extra here: `DecodeBatch.add` copies a sequence's KV into its own slab row, so adding the
same received tensors n times gives n independent sequences; each samples with its own seed-derived parameters.
"""

from __future__ import annotations

from collections.abc import Callable

from disagg.engine.decode import DecodeSequence, TokenEvent
from disagg.errors import InvalidRequest, ProtocolError
from disagg.handoff.receive import Handoff
from disagg.model.grammar import GrammarCompiler
from disagg.model.loading import LoadedModel
from disagg.model.output_stream import new_output
from disagg.model.sampling import for_sequence
from disagg.pb.disagg.v1 import worker_pb2
from disagg.rpc.convert import logprob_to_pb, sampling_from_pb

Deliver = Callable[[TokenEvent | BaseException], None]


def sequence_id(request_id: str, index: int) -> str:
    """The engine's id of sequence `index` (sequence 0 keeps the request's id)."""
    return request_id if index == 0 else f"{request_id}#{index}"


def forked_sequences(
    lm: LoadedModel, handoff: Handoff, deliver_to: Callable[[int], Deliver], grammars: GrammarCompiler
) -> dict[int, DecodeSequence]:
    """index -> sequence for every one of the handoff's n sequences that did not already finish at its first token.
    Under a grammar, each sequence's matcher state is rebuilt from its tokens so far (compile the grammar first,
    off the event loop: `grammars.prepare`)."""
    start = handoff.start
    params = sampling_from_pb(start.sampling)
    if params.max_new_tokens <= 0:
        raise InvalidRequest("sampling.max_new_tokens must be resolved (> 0) before decode")
    context = [*start.prompt_token_ids, *start.generated_token_ids]
    sequences = {}
    for index, first in enumerate(handoff.first_tokens or [handoff.first_token]):
        replayed = [*start.generated_token_ids, first.token_id]
        output = new_output(lm.tokenizer, for_sequence(params, index), lm.eos_token_ids, grammars, replayed)
        if output.finish_reason is None:
            sequences[index] = DecodeSequence(
                sequence_id(start.request_id, index), context, output, handoff.kv, deliver=deliver_to(index)
            )
    if not sequences:
        raise ProtocolError("every sequence already finished at its first token; nothing to decode")
    return sequences


def response_of(index: int, event: TokenEvent) -> worker_pb2.DecodeResponse:
    response = worker_pb2.DecodeResponse(
        token_ids=[event.token], text=event.text, finish_reason=event.finish_reason or "", index=index
    )
    if event.logprobs is not None:
        response.logprobs.append(logprob_to_pb(event.logprobs))
    return response
