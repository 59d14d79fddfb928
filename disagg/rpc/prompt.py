"""A PrefillRequest as the model sees it: the prompt's token ids (plain, chat-rendered, or given) and the
resolved sampling parameters (max_new_tokens filled in, the context checked). Every worker that prefills a
request (prefill, aggregated) turns it into work the same way, and so does the gateway's KV-aware router, which
tokenizes only to look the prompt's blocks up (`request_token_ids` with its own copy of the tokenizer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from disagg.errors import InvalidRequest
from disagg.model.sampling import SamplingParams
from disagg.pb.disagg.v1 import worker_pb2
from disagg.rpc.convert import sampling_from_pb, sampling_to_pb

if TYPE_CHECKING:
    from transformers import BatchEncoding, PreTrainedTokenizerBase

    from disagg.model.loading import LoadedModel


@dataclass(frozen=True)
class ResolvedRequest:
    """What a worker prefills: the prompt's ids, the tokens generated before a resume, the resolved sampling."""

    request_id: str
    prompt: list[int]
    generated: list[int]
    params: SamplingParams

    @property
    def input_ids(self) -> list[int]:
        return [*self.prompt, *self.generated]

    def sequence_start(self, model: str, kv_layout: worker_pb2.KvLayout | None = None) -> worker_pb2.SequenceStart:
        """The SequenceStart that opens this request's stream (no layout: the cache never leaves the worker)."""
        return worker_pb2.SequenceStart(
            request_id=self.request_id,
            prompt_token_ids=self.prompt,
            generated_token_ids=self.generated,
            sampling=sampling_to_pb(self.params),
            model=model,
            kv_layout=kv_layout,
        )


def resolve_request(lm: LoadedModel, request: worker_pb2.PrefillRequest) -> ResolvedRequest:
    """Tokenize and resolve a request (INVALID_ARGUMENT for what this model cannot run)."""
    prompt = prompt_token_ids(lm, request)
    generated = list(request.generated_token_ids)
    params = resolve_params(lm, request, len(prompt) + len(generated))
    if params.n > 1 and generated:
        raise InvalidRequest("a sequence with n > 1 cannot be resumed")
    return ResolvedRequest(request.request_id, prompt, generated, params)


def prompt_token_ids(lm: LoadedModel, request: worker_pb2.PrefillRequest) -> list[int]:
    """The request's prompt as this model's token ids; given ids must be in its vocabulary (INVALID_ARGUMENT)."""
    ids = request_token_ids(lm.tokenizer, lm.name, request)
    if request.prompt_token_ids:
        vocab = int(lm.model.config.vocab_size)
        if (high := max(ids)) >= vocab or min(ids) < 0:
            bad = high if high >= vocab else min(ids)
            raise InvalidRequest(f"prompt_token_ids has id {bad}, outside the vocabulary 0..{vocab - 1}")
    return ids


def request_token_ids(tokenizer: PreTrainedTokenizerBase, model: str, request: worker_pb2.PrefillRequest) -> list[int]:
    """The prompt's token ids: given, a conversation rendered with the chat template, or the prompt encoded."""
    if request.prompt_token_ids:
        return list(request.prompt_token_ids)
    if request.messages:
        return chat_token_ids(tokenizer, model, [{"role": m.role, "content": m.content} for m in request.messages])
    if not request.prompt:
        raise InvalidRequest("prompt must not be empty")
    if request.apply_chat_template:
        return chat_token_ids(tokenizer, model, [{"role": "user", "content": request.prompt}])
    return tokenizer.encode(request.prompt)


def chat_token_ids(tokenizer: PreTrainedTokenizerBase, model: str, messages: list[dict[str, str]]) -> list[int]:
    """The conversation rendered with the model's chat template, ending with the assistant's turn to speak."""
    if not tokenizer.chat_template:
        raise InvalidRequest(f"model {model!r} has no chat template (messages / apply_chat_template)")
    try:
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    except Exception as exc:  # a template may refuse a conversation (roles out of order, ...): the client's fault
        raise InvalidRequest(f"messages: the chat template refused them: {exc}") from exc
    return list(cast("BatchEncoding", rendered)["input_ids"])  # return_dict=True: a BatchEncoding


def resolve_params(lm: LoadedModel, request: worker_pb2.PrefillRequest, context_tokens: int) -> SamplingParams:
    """Fill in max_new_tokens and check that the request fits the model's context."""
    params = sampling_from_pb(request.sampling)
    room = lm.context_length - context_tokens + len(request.generated_token_ids)
    if room <= 0:
        raise InvalidRequest(
            f"prompt of {context_tokens} tokens leaves no room in the model's context of {lm.context_length} tokens"
        )
    if params.max_new_tokens == 0:
        default = request.default_max_new_tokens or 16
        return SamplingParams(**{**params.__dict__, "max_new_tokens": min(default, room)})
    if params.max_new_tokens > room:
        raise InvalidRequest(
            f"prompt ({context_tokens - len(request.generated_token_ids)} tokens) + max_new_tokens "
            f"({params.max_new_tokens}) exceeds the model's context of {lm.context_length} tokens"
        )
    return params
