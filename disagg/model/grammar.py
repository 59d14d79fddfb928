"""Structured output: a grammar (JSON schema, any JSON object, regex, Lark) as a mask over each step's logits.

llguidance (PyPI `llguidance`) compiles a grammar against the model's tokenizer into a matcher that says, at each
step, which tokens may come next. Each worker that samples compiles a grammar once (`GrammarCompiler`: a matcher in
its start state, cached by spec) and gives every sequence a copy of it (microseconds). A sequence's matcher state
is a function of the grammar and the tokens it accepted, so it never travels: the prefill worker masks the first
token, and a decode worker (or a worker resuming the sequence) rebuilds the state by feeding it the tokens the
handoff already carries. Masking touches only the rows that have a grammar (`mask_rows`).

JSON schemas compile with fixed separators (", " and ": ", no other whitespace) unless the schema's own
`x-guidance` options say otherwise: unbounded whitespace is where small models loop until max_tokens.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import torch

from disagg.errors import InvalidRequest

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

    from disagg.model.loading import LoadedModel

JSON_SCHEMA, JSON_OBJECT, REGEX, LARK = "json_schema", "json_object", "regex", "lark"
GRAMMAR_KINDS = (JSON_SCHEMA, JSON_OBJECT, REGEX, LARK)
# llguidance's JSON compile options used unless a schema's "x-guidance" overrides them (see the module docstring).
JSON_DEFAULTS: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_GRAMMAR_CHARS = 64 * 1024  # a schema, regex or Lark grammar of one request
_ANY_OBJECT = '{"type": "object"}'
_BIT = torch.arange(32, dtype=torch.int32)  # bit i of a mask word is token 32 * word + i


@dataclass(frozen=True)
class GrammarSpec:
    """What constrains a request's output: `kind` (one of GRAMMAR_KINDS) and its text (a JSON schema as JSON, a
    regex, a Lark grammar; empty for json_object). Hashable: the compile cache's key."""

    kind: str
    source: str = ""

    def llguidance_grammar(self) -> str:
        """The grammar in llguidance's own format (not yet checked)."""
        if self.kind == JSON_OBJECT:
            return llguidance.LLMatcher.grammar_from_json_schema(_ANY_OBJECT, defaults=JSON_DEFAULTS)
        if self.kind == JSON_SCHEMA:
            return llguidance.LLMatcher.grammar_from_json_schema(self.source, defaults=JSON_DEFAULTS)
        if self.kind == REGEX:
            return llguidance.LLMatcher.grammar_from_regex(self.source)
        if self.kind == LARK:
            return llguidance.LLMatcher.grammar_from_lark(self.source)
        raise InvalidRequest(f"grammar kind must be one of {', '.join(GRAMMAR_KINDS)}, got {self.kind!r}")


def json_schema_spec(schema: Any) -> GrammarSpec:
    """A JSON schema (a dict, or its JSON text) as a spec, its text compact so that schemas that differ only in
    whitespace share one compiled grammar (keys keep their order: properties are generated in it). InvalidRequest
    when it is not a JSON object."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise InvalidRequest(f"json_schema is not valid JSON: {exc}") from exc
    if not isinstance(schema, dict):
        raise InvalidRequest(f"json_schema must be a JSON object, got {type(schema).__name__}")
    return GrammarSpec(JSON_SCHEMA, json.dumps(schema, separators=(",", ":")))


def check_grammar(spec: GrammarSpec, tokenizer: llguidance.LLTokenizer | None = None) -> str:
    """The spec's llguidance grammar, checked (with the tokenizer when given, else without: the gateway has none);
    InvalidRequest naming the kind and what is wrong otherwise."""
    if len(spec.source) > MAX_GRAMMAR_CHARS:
        raise InvalidRequest(f"{spec.kind} has {len(spec.source)} characters, the limit is {MAX_GRAMMAR_CHARS}")
    if spec.kind in (REGEX, LARK) and not spec.source:
        raise InvalidRequest(f"{spec.kind} must not be empty")
    try:
        grammar = spec.llguidance_grammar()
    except (ValueError, TypeError, RuntimeError) as exc:  # the JSON compiler raises on some schemas
        raise InvalidRequest(f"{spec.kind}: {exc}") from exc
    error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
    if error:
        raise InvalidRequest(f"{spec.kind}: {error.strip()}")
    return grammar


class GrammarViolation(InvalidRequest):
    """A token the grammar does not allow where it stands (a resumed sequence's tokens, or a sampling bug)."""


class SequenceGrammar:
    """One sequence's matcher: the tokens it allows next, and the tokens it accepted (advancing its state)."""

    def __init__(self, spec: GrammarSpec, matcher: llguidance.LLMatcher, vocab_size: int):
        self.spec, self.matcher, self.vocab_size = spec, matcher, vocab_size

    def accept(self, token: int) -> None:
        """Advance past `token`; GrammarViolation if the grammar does not allow it here."""
        if not self.matcher.consume_token(token):
            raise GrammarViolation(f"token {token} is not allowed by the request's {self.spec.kind} here")

    @property
    def finished(self) -> bool:
        """The grammar is complete: nothing may follow but the end-of-sequence token."""
        return self.matcher.is_stopped()

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens as bits into `bitmask[row]` (int32, [rows, words])."""
        target = bitmask[row]
        self.matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * target.element_size())
        if self.matcher.is_error():
            raise GrammarViolation(f"the request's {self.spec.kind}: {self.matcher.get_error()}")


def allowed_tokens(grammars: Sequence[SequenceGrammar], vocab_size: int) -> torch.Tensor:
    """[len(grammars), vocab_size] bool: the tokens each grammar allows next."""
    words = (vocab_size + 31) // 32
    bitmask = torch.zeros((len(grammars), words), dtype=torch.int32)
    for row, grammar in enumerate(grammars):
        grammar.fill_mask(bitmask, row)
    bits = (bitmask.unsqueeze(-1) >> _BIT) & 1  # [rows, words, 32]
    return bits.reshape(len(grammars), words * 32)[:, :vocab_size].bool()


@torch.inference_mode()  # (the engines' logits are inference tensors)
def mask_rows(logits: torch.Tensor, rows: Sequence[int], grammars: Sequence[SequenceGrammar]) -> None:
    """In place: in each of `logits`' `rows` ([rows, vocab]), the tokens its grammar forbids get -inf. The other
    rows are not read or written."""
    if not rows:
        return
    allowed = allowed_tokens(grammars, logits.shape[-1]).to(logits.device)
    index = torch.tensor(list(rows), dtype=torch.long, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


def model_grammars(lm: LoadedModel) -> GrammarCompiler:
    """The compiler for a loaded model's tokenizer and logits (one per worker process). The model is read when the
    first grammar needs it, not here: a servicer is built alike whether or not grammars are ever used."""
    return GrammarCompiler.deferred(lambda: (lm.tokenizer, int(lm.config.get_text_config(decoder=True).vocab_size)))


class GrammarCompiler:
    """A worker's grammars: llguidance's view of the model's tokenizer (built once, ~1 s: `warm` builds it ahead),
    and each spec compiled once into a matcher in its start state, kept (least recently used out) and copied for
    every sequence that uses it. Thread-safe."""

    def __init__(self, tokenizer: Any, vocab_size: int, capacity: int = 256):
        """`tokenizer`: the model's (a fast HF tokenizer); `vocab_size`: the width of the model's logits."""
        self.tokenizer, self.vocab_size, self.capacity = tokenizer, vocab_size, capacity
        self._load: Callable[[], tuple[Any, int]] | None = None  # (tokenizer, vocab_size), for `deferred`
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[GrammarSpec, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0  # specs compiled (a cache miss each)

    @classmethod
    def deferred(cls, load: Callable[[], tuple[Any, int]], capacity: int = 256) -> GrammarCompiler:
        """A compiler whose tokenizer and vocabulary width come from `load()`, called once, on first use."""
        compiler = cls(None, 0, capacity)
        compiler._load = load
        return compiler

    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                if self._load is not None:
                    self.tokenizer, self.vocab_size = self._load()
                vocab = max(self.vocab_size, len(self.tokenizer))
                self._ll_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=vocab)
            return self._ll_tokenizer

    def warm(self) -> threading.Thread:
        """Build the tokenizer view on a daemon thread (a worker's start), so the first grammar does not wait."""
        thread = threading.Thread(target=self.ll_tokenizer, name="grammar-tokenizer", daemon=True)
        thread.start()
        return thread

    def prepare(self, spec: GrammarSpec) -> None:
        """Compile `spec` now if it is not cached (the first one also builds the tokenizer view: call it off an
        event loop); InvalidRequest for a bad grammar."""
        self._template(spec)

    def _template(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        with self._lock:
            if (found := self._compiled.get(spec)) is not None:
                self._compiled.move_to_end(spec)
                return found
        tokenizer = self.ll_tokenizer()
        matcher = llguidance.LLMatcher(tokenizer, check_grammar(spec, tokenizer), log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"{spec.kind}: {matcher.get_error()}")
        with self._lock:
            self.compiles += 1
            self._compiled[spec] = matcher
            while len(self._compiled) > self.capacity:
                self._compiled.popitem(last=False)
        return matcher

    def start(self, spec: GrammarSpec, accepted: Sequence[int] = ()) -> SequenceGrammar:
        """A sequence's grammar after the tokens it already `accepted` (none for a new sequence); InvalidRequest
        for a bad grammar, GrammarViolation for tokens it does not allow."""
        grammar = SequenceGrammar(spec, self._template(spec).deep_copy(), self.vocab_size)
        for position, token in enumerate(accepted):
            if not grammar.matcher.consume_token(token):
                raise GrammarViolation(f"token {token} at output position {position} is not allowed by the {spec.kind}")
        return grammar
