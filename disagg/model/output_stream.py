"""From generated token ids to streamed text: incremental detokenization, stop strings and finish reasons.

Both workers use it: prefill for the first token, decode for the rest after replaying the tokens already sent, so
the text a client sees never depends on where a token was made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, cast

from disagg.model.grammar import GrammarCompiler, SequenceGrammar
from disagg.model.sampling import SamplingParams

FINISH_LENGTH, FINISH_STOP, FINISH_EOS = "length", "stop", "eos"


class Detokenizer(Protocol):
    """What OutputStream needs of a tokenizer (a transformers tokenizer, or a test's stand-in)."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str | list[str]: ...


@dataclass
class OutputStream:
    """Output state of one request: its tokens, the text decoded so far and how much of it was sent.

    Text is held back while it ends in an incomplete UTF-8 character (the tokenizer decodes that as U+FFFD) or
    while its tail could still grow into a stop string, so no message ever carries half a character or part of a
    stop string.
    """

    tokenizer: Detokenizer
    params: SamplingParams
    eos_token_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already returned
    _prefix_offset: int = 0
    _read_offset: int = 0
    finish_reason: str | None = None
    # The request's grammar (structured output), advanced by every appended token; it ends the sequence at its
    # end-of-sequence token even with ignore_eos (the grammar allows nothing after it).
    grammar: SequenceGrammar | None = None

    def _decode_new(self) -> str:
        """Text that the newest token completes, or "" while it ends inside a multi-byte character."""
        # a flat list of ids decodes to one str (a list of str only comes from a batch of lists)
        decode = cast("Callable[..., str]", self.tokenizer.decode)
        prefix = decode(self.tokens[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = decode(self.tokens[self._prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self.tokens)
            return full[len(prefix) :]
        return ""

    def _held_back(self) -> int:
        """Length of the longest tail of the unsent text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.params.stop:
            for n in range(min(len(stop) - 1, len(self.text) - self.sent), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def append(self, token: int) -> str:
        """Add one generated token; returns the text that may be sent now (sets `finish_reason` when done)."""
        if self.finish_reason is not None:
            raise RuntimeError("append after the stream finished")
        if self.grammar is not None:
            self.grammar.accept(token)
        self.tokens.append(token)
        if token in self.eos_token_ids and (not self.params.ignore_eos or self.grammar is not None):
            self.finish_reason = FINISH_EOS
        else:
            self.text += self._decode_new()
            stop_at = self._find_stop()
            if stop_at is not None:
                self.finish_reason = FINISH_STOP
                return self._send_until(stop_at)
        if self.finish_reason is None and len(self.tokens) >= self.params.max_new_tokens:
            self.finish_reason = FINISH_LENGTH
        if self.finish_reason is not None:
            return self._send_until(len(self.text))
        return self._send_until(len(self.text) - self._held_back())

    def replay(self, tokens: Iterable[int]) -> None:
        """Restore the state after `tokens` were generated and sent elsewhere (prefill, or a failed worker)."""
        for token in tokens:
            self.append(token)

    def _find_stop(self) -> int | None:
        if not self.params.stop:
            return None
        longest = max(len(s) for s in self.params.stop)
        start = max(0, self.sent - longest + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.params.stop if s) if i >= 0]
        return min(hits) if hits else None

    def _send_until(self, end: int) -> str:
        end = max(end, self.sent)
        chunk, self.sent = self.text[self.sent : end], end
        return chunk


def new_output(
    tokenizer: Detokenizer,
    params: SamplingParams,
    eos_token_ids: frozenset[int],
    grammars: GrammarCompiler,
    replayed: Iterable[int] = (),
) -> OutputStream:
    """A sequence's output stream, under the request's grammar if it has one (from `grammars`: compile it first
    with `grammars.prepare` off the event loop), after the tokens already generated elsewhere (`replayed`: they
    advance the grammar too, which is how a worker that continues a sequence rebuilds its matcher)."""
    output = OutputStream(tokenizer, params, eos_token_ids)
    if params.grammar is not None:
        output.grammar = grammars.start(params.grammar)
    output.replay(replayed)
    return output
