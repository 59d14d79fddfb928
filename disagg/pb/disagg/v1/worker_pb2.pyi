from disagg.v1 import gateway_pb2 as _gateway_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KvTransport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_TRANSPORT_UNSPECIFIED: _ClassVar[KvTransport]
    KV_TRANSPORT_RELAYED: _ClassVar[KvTransport]
    KV_TRANSPORT_DIRECT: _ClassVar[KvTransport]
    KV_TRANSPORT_SHARED_MEMORY: _ClassVar[KvTransport]
KV_TRANSPORT_UNSPECIFIED: KvTransport
KV_TRANSPORT_RELAYED: KvTransport
KV_TRANSPORT_DIRECT: KvTransport
KV_TRANSPORT_SHARED_MEMORY: KvTransport

class WatchKvEventsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchKvEventsResponse(_message.Message):
    __slots__ = ("snapshot", "events")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    snapshot: KvCacheSnapshot
    events: KvCacheEvents
    def __init__(self, snapshot: _Optional[_Union[KvCacheSnapshot, _Mapping]] = ..., events: _Optional[_Union[KvCacheEvents, _Mapping]] = ...) -> None: ...

class KvCacheSnapshot(_message.Message):
    __slots__ = ("instance_id", "model", "model_fingerprint", "block_tokens", "block_keys")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_KEYS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    model: str
    model_fingerprint: str
    block_tokens: int
    block_keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, instance_id: _Optional[str] = ..., model: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., block_tokens: _Optional[int] = ..., block_keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class KvCacheEvents(_message.Message):
    __slots__ = ("stored", "removed")
    STORED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    stored: _containers.RepeatedScalarFieldContainer[bytes]
    removed: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, stored: _Optional[_Iterable[bytes]] = ..., removed: _Optional[_Iterable[bytes]] = ...) -> None: ...

class AggregatedServiceGenerateRequest(_message.Message):
    __slots__ = ("request", "max_uncached_tokens", "min_cached_share")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_UNCACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_CACHED_SHARE_FIELD_NUMBER: _ClassVar[int]
    request: PrefillRequest
    max_uncached_tokens: int
    min_cached_share: float
    def __init__(self, request: _Optional[_Union[PrefillRequest, _Mapping]] = ..., max_uncached_tokens: _Optional[int] = ..., min_cached_share: _Optional[float] = ...) -> None: ...

class AggregatedServiceGenerateResponse(_message.Message):
    __slots__ = ("start", "tokens", "declined", "cached_tokens", "prefill_phases", "prompt_logprobs")
    START_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECLINED_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_PHASES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    start: SequenceStart
    tokens: DecodeResponse
    declined: LocalPrefillDeclined
    cached_tokens: int
    prefill_phases: PrefillPhases
    prompt_logprobs: PromptLogprobs
    def __init__(self, start: _Optional[_Union[SequenceStart, _Mapping]] = ..., tokens: _Optional[_Union[DecodeResponse, _Mapping]] = ..., declined: _Optional[_Union[LocalPrefillDeclined, _Mapping]] = ..., cached_tokens: _Optional[int] = ..., prefill_phases: _Optional[_Union[PrefillPhases, _Mapping]] = ..., prompt_logprobs: _Optional[_Union[PromptLogprobs, _Mapping]] = ...) -> None: ...

class LocalPrefillDeclined(_message.Message):
    __slots__ = ("prompt_tokens", "uncached_tokens", "held_prefix_tokens", "block_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    UNCACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HELD_PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    uncached_tokens: int
    held_prefix_tokens: int
    block_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., uncached_tokens: _Optional[int] = ..., held_prefix_tokens: _Optional[int] = ..., block_tokens: _Optional[int] = ...) -> None: ...

class GetLoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetLoadResponse(_message.Message):
    __slots__ = ("active_sequences", "queued", "kv_bytes", "kv_budget_bytes", "rss_bytes")
    ACTIVE_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    active_sequences: int
    queued: int
    kv_bytes: int
    kv_budget_bytes: int
    rss_bytes: int
    def __init__(self, active_sequences: _Optional[int] = ..., queued: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., kv_budget_bytes: _Optional[int] = ..., rss_bytes: _Optional[int] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "n", "logprobs", "top_logprobs", "grammar", "prompt_logprobs", "priority")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    n: int
    logprobs: bool
    top_logprobs: int
    grammar: _gateway_pb2.Grammar
    prompt_logprobs: int
    priority: int
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ..., n: _Optional[int] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., grammar: _Optional[_Union[_gateway_pb2.Grammar, _Mapping]] = ..., prompt_logprobs: _Optional[int] = ..., priority: _Optional[int] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "prompt_token_ids", "sampling", "apply_chat_template", "generated_token_ids", "default_max_new_tokens", "kv_destination", "messages")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    APPLY_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_DESTINATION_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    apply_chat_template: bool
    generated_token_ids: _containers.RepeatedScalarFieldContainer[int]
    default_max_new_tokens: int
    kv_destination: KvDestination
    messages: _containers.RepeatedCompositeFieldContainer[_gateway_pb2.ChatMessage]
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., apply_chat_template: _Optional[bool] = ..., generated_token_ids: _Optional[_Iterable[int]] = ..., default_max_new_tokens: _Optional[int] = ..., kv_destination: _Optional[_Union[KvDestination, _Mapping]] = ..., messages: _Optional[_Iterable[_Union[_gateway_pb2.ChatMessage, _Mapping]]] = ...) -> None: ...

class KvDestination(_message.Message):
    __slots__ = ("transport", "decode_address", "handle", "prefix_tokens", "prefix_block_tokens")
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    DECODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    transport: KvTransport
    decode_address: str
    handle: str
    prefix_tokens: int
    prefix_block_tokens: int
    def __init__(self, transport: _Optional[_Union[KvTransport, str]] = ..., decode_address: _Optional[str] = ..., handle: _Optional[str] = ..., prefix_tokens: _Optional[int] = ..., prefix_block_tokens: _Optional[int] = ...) -> None: ...

class KvLayout(_message.Message):
    __slots__ = ("dtype", "num_layers", "kv_heads", "seq_len", "head_dim", "model_fingerprint", "total_bytes", "wire_dtype", "transport", "handle", "prefix_tokens", "prefix_block_tokens", "prefix_block_keys")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_BLOCK_KEYS_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    num_layers: int
    kv_heads: int
    seq_len: int
    head_dim: int
    model_fingerprint: str
    total_bytes: int
    wire_dtype: str
    transport: KvTransport
    handle: str
    prefix_tokens: int
    prefix_block_tokens: int
    prefix_block_keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, dtype: _Optional[str] = ..., num_layers: _Optional[int] = ..., kv_heads: _Optional[int] = ..., seq_len: _Optional[int] = ..., head_dim: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., total_bytes: _Optional[int] = ..., wire_dtype: _Optional[str] = ..., transport: _Optional[_Union[KvTransport, str]] = ..., handle: _Optional[str] = ..., prefix_tokens: _Optional[int] = ..., prefix_block_tokens: _Optional[int] = ..., prefix_block_keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class SequenceStart(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "generated_token_ids", "sampling", "kv_layout", "model")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    generated_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    kv_layout: KvLayout
    model: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., generated_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., kv_layout: _Optional[_Union[KvLayout, _Mapping]] = ..., model: _Optional[str] = ...) -> None: ...

class KvChunk(_message.Message):
    __slots__ = ("tensor_index", "offset", "data", "crc32")
    TENSOR_INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    tensor_index: int
    offset: int
    data: bytes
    crc32: int
    def __init__(self, tensor_index: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ...) -> None: ...

class KvSharedMemory(_message.Message):
    __slots__ = ("name", "size", "tensor_crc32")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_CRC32_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    tensor_crc32: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., tensor_crc32: _Optional[_Iterable[int]] = ...) -> None: ...

class FirstToken(_message.Message):
    __slots__ = ("token_id", "text", "finish_reason", "prefill_seconds", "index", "logprob", "cached_tokens", "phases")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PHASES_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    text: str
    finish_reason: str
    prefill_seconds: float
    index: int
    logprob: _gateway_pb2.TokenLogprob
    cached_tokens: int
    phases: PrefillPhases
    def __init__(self, token_id: _Optional[int] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., prefill_seconds: _Optional[float] = ..., index: _Optional[int] = ..., logprob: _Optional[_Union[_gateway_pb2.TokenLogprob, _Mapping]] = ..., cached_tokens: _Optional[int] = ..., phases: _Optional[_Union[PrefillPhases, _Mapping]] = ...) -> None: ...

class PrefillPhases(_message.Message):
    __slots__ = ("queue_seconds", "forward_seconds", "batch_size", "tokens", "cached_tokens")
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    queue_seconds: float
    forward_seconds: float
    batch_size: int
    tokens: int
    cached_tokens: int
    def __init__(self, queue_seconds: _Optional[float] = ..., forward_seconds: _Optional[float] = ..., batch_size: _Optional[int] = ..., tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class DecodePhases(_message.Message):
    __slots__ = ("kv_transport", "kv_bytes", "kv_chunks", "kv_transfer_seconds", "kv_held_prefix_tokens", "queue_seconds", "kv_load_seconds", "decode_seconds", "steps", "tokens")
    KV_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KV_HELD_PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KV_LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    kv_transport: str
    kv_bytes: int
    kv_chunks: int
    kv_transfer_seconds: float
    kv_held_prefix_tokens: int
    queue_seconds: float
    kv_load_seconds: float
    decode_seconds: float
    steps: int
    tokens: int
    def __init__(self, kv_transport: _Optional[str] = ..., kv_bytes: _Optional[int] = ..., kv_chunks: _Optional[int] = ..., kv_transfer_seconds: _Optional[float] = ..., kv_held_prefix_tokens: _Optional[int] = ..., queue_seconds: _Optional[float] = ..., kv_load_seconds: _Optional[float] = ..., decode_seconds: _Optional[float] = ..., steps: _Optional[int] = ..., tokens: _Optional[int] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("start", "kv_chunk", "first_token", "shared_memory", "prompt_logprobs")
    START_FIELD_NUMBER: _ClassVar[int]
    KV_CHUNK_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    start: SequenceStart
    kv_chunk: KvChunk
    first_token: FirstToken
    shared_memory: KvSharedMemory
    prompt_logprobs: PromptLogprobs
    def __init__(self, start: _Optional[_Union[SequenceStart, _Mapping]] = ..., kv_chunk: _Optional[_Union[KvChunk, _Mapping]] = ..., first_token: _Optional[_Union[FirstToken, _Mapping]] = ..., shared_memory: _Optional[_Union[KvSharedMemory, _Mapping]] = ..., prompt_logprobs: _Optional[_Union[PromptLogprobs, _Mapping]] = ...) -> None: ...

class PromptLogprobs(_message.Message):
    __slots__ = ("logprobs",)
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[_gateway_pb2.TokenLogprob]
    def __init__(self, logprobs: _Optional[_Iterable[_Union[_gateway_pb2.TokenLogprob, _Mapping]]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("start", "kv_chunk", "first_token", "shared_memory", "prompt_logprobs")
    START_FIELD_NUMBER: _ClassVar[int]
    KV_CHUNK_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    start: SequenceStart
    kv_chunk: KvChunk
    first_token: FirstToken
    shared_memory: KvSharedMemory
    prompt_logprobs: PromptLogprobs
    def __init__(self, start: _Optional[_Union[SequenceStart, _Mapping]] = ..., kv_chunk: _Optional[_Union[KvChunk, _Mapping]] = ..., first_token: _Optional[_Union[FirstToken, _Mapping]] = ..., shared_memory: _Optional[_Union[KvSharedMemory, _Mapping]] = ..., prompt_logprobs: _Optional[_Union[PromptLogprobs, _Mapping]] = ...) -> None: ...

class KvPushHeader(_message.Message):
    __slots__ = ("handle", "request_id", "kv_layout")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    handle: str
    request_id: str
    kv_layout: KvLayout
    def __init__(self, handle: _Optional[str] = ..., request_id: _Optional[str] = ..., kv_layout: _Optional[_Union[KvLayout, _Mapping]] = ...) -> None: ...

class PushKvRequest(_message.Message):
    __slots__ = ("header", "kv_chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    KV_CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: KvPushHeader
    kv_chunk: KvChunk
    def __init__(self, header: _Optional[_Union[KvPushHeader, _Mapping]] = ..., kv_chunk: _Optional[_Union[KvChunk, _Mapping]] = ...) -> None: ...

class PushKvResponse(_message.Message):
    __slots__ = ("received_bytes",)
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    received_bytes: int
    def __init__(self, received_bytes: _Optional[int] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("token_ids", "text", "finish_reason", "index", "logprobs", "phases")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PHASES_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: str
    index: int
    logprobs: _containers.RepeatedCompositeFieldContainer[_gateway_pb2.TokenLogprob]
    phases: DecodePhases
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., index: _Optional[int] = ..., logprobs: _Optional[_Iterable[_Union[_gateway_pb2.TokenLogprob, _Mapping]]] = ..., phases: _Optional[_Union[DecodePhases, _Mapping]] = ...) -> None: ...
