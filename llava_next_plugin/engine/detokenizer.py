"""Incremental detokenization with stop strings: token ids in, safe-to-show text deltas out.

Each request has one :class:`TextStream` (state in a few fields, as vLLM's detokenizer keeps it). A token is
decoded with the few tokens before it, so text appears once its characters are complete; a stop string is
found with one automaton per stop string (Knuth-Morris-Pratt), fed each new character once, so the cost is
linear in the text plus the stop strings, however long they are. Text that may be the start of a stop string
is held back until it is known not to be one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

__all__ = ["TextStream", "StopMatcher"]


class StopMatcher:
    """Finds the first completed stop string in text fed character by character.

    ``partial`` is the longest suffix of the text fed so far that is a proper prefix of some stop string
    (what a stream must hold back).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._fail = [self._failure(s) for s in self.stops]
        self._state = [0] * len(self.stops)  # matched prefix length per stop string

    @staticmethod
    def _failure(pattern: str) -> list[int]:
        fail = [0] * len(pattern)
        k = 0
        for i in range(1, len(pattern)):
            while k and pattern[i] != pattern[k]:
                k = fail[k - 1]
            if pattern[i] == pattern[k]:
                k += 1
            fail[i] = k
        return fail

    def feed(self, text: str, offset: int) -> int | None:
        """Feed *text* (which starts at character *offset* of the whole); the start of the first stop string
        completed by it, or ``None``."""
        if not self.stops:
            return None
        for i, char in enumerate(text):
            for n, stop in enumerate(self.stops):
                k, fail = self._state[n], self._fail[n]
                while k and char != stop[k]:
                    k = fail[k - 1]
                if char == stop[k]:
                    k += 1
                if k == len(stop):
                    return offset + i + 1 - len(stop)
                self._state[n] = k
        return None

    @property
    def partial(self) -> int:
        return max(self._state, default=0)


def decoder_of(tokenizer) -> Callable[[list[int]], str]:
    """``tokenizer.decode(ids, skip_special_tokens=True)`` as a function of the ids.

    A transformers tokenizer backed by the ``tokenizers`` library whose ``_decode`` is not overridden and does not
    clean up spaces decodes with its Rust tokenizer alone: that call, without the Python plumbing around it (about
    three quarters of the time of each of the two decodes per generated token), gives the same text.
    """
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    backend = getattr(tokenizer, "_tokenizer", None)
    if (
        isinstance(tokenizer, TokenizersBackend)
        and type(tokenizer)._decode is TokenizersBackend._decode
        and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        and backend is not None
    ):
        return functools.partial(backend.decode, skip_special_tokens=True)
    return functools.partial(tokenizer.decode, skip_special_tokens=True)


class TextStream:
    """Turns generated token ids into text deltas, holding back incomplete characters and partial stops."""

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self._decode_ids = decoder_of(tokenizer)
        self.matcher = StopMatcher(stop)
        self.stop = self.matcher.stops
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] is context already turned into text
        self.read_offset = 0
        self.text = ""  # all stable text so far
        self.fed = 0  # characters of self.text the stop matcher has seen
        self.sent = 0  # characters of self.text already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids)

    def add(self, token_id: int) -> str:
        """Take one token; return the text that became safe to show (may be empty)."""
        self.ids.append(token_id)
        if self.stopped:
            return ""
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end: whatever text remains (after a stop string is cut off)."""
        if not self.stopped:
            full = self._decode(self.ids)
            if full.startswith(self.text):
                self.text = full
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        hit = self.matcher.feed(self.text[self.fed :], self.fed)
        self.fed = len(self.text)
        if hit is not None:
            self.text = self.text[:hit]
            self.stopped = True
            return self._hand_out(len(self.text))
        held = 0 if final else self.matcher.partial
        return self._hand_out(len(self.text) - held)

    def _hand_out(self, upto: int) -> str:
        upto = max(upto, self.sent)
        delta = self.text[self.sent : upto]
        self.sent = upto
        return delta
