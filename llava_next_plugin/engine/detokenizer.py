"""Incremental detokenization with stop strings: token ids in, safe-to-show text deltas out.

Each request has one :class:`TextStream` (state in a few fields, as vLLM's detokenizer keeps it). A token is
decoded with the few tokens before it, so text appears once its characters are complete; a stop string is
found with one automaton per stop string (Knuth-Morris-Pratt), fed each new character once, so the cost is
linear in the text plus the stop strings, however long they are. Text that may be the start of a stop string
is held back until it is known not to be one.

Most tokens need no decode at all: a :class:`PieceTable` knows the text a token adds after any token whose own
text is complete (for tokenizers whose decoder only concatenates pieces), and a stream whose text so far is
complete appends it directly; the others (byte pieces, special and added tokens, the first token) decode as above.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence

__all__ = ["TextStream", "StopMatcher", "PieceTable"]


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


def _direct_backend(tokenizer):
    """The tokenizer's Rust tokenizer (``tokenizers``) if decoding with it alone gives the tokenizer's text: a
    transformers tokenizer backed by it whose ``_decode`` is not overridden and does not clean up spaces; else
    ``None``."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    backend = getattr(tokenizer, "_tokenizer", None)
    if (
        isinstance(tokenizer, TokenizersBackend)
        and type(tokenizer)._decode is TokenizersBackend._decode
        and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        and backend is not None
    ):
        return backend
    return None


def decoder_of(tokenizer) -> Callable[[list[int]], str]:
    """``tokenizer.decode(ids, skip_special_tokens=True)`` as a function of the ids: the Rust tokenizer's decode
    when it gives the same text (:func:`_direct_backend`), without the Python plumbing around it (about three
    quarters of the time of each of the two decodes per generated token)."""
    backend = _direct_backend(tokenizer)
    return functools.partial((tokenizer if backend is None else backend).decode, skip_special_tokens=True)


#: Decoders (``tokenizers`` types) that turn each token into a piece of text on its own (bytes joined into
#: characters) and concatenate the pieces. After a token whose text is complete, a token then adds the same text
#: whatever came before. (Others, e.g. ``BPEDecoder``, which treats the last token apart, or ``WordPiece``, which
#: cleans up, are not listed: their streams always decode.)
_PER_TOKEN_DECODERS = frozenset({"Replace", "ByteFallback", "Strip", "Metaspace", "ByteLevel"})


def _appends(decoder: dict | None) -> bool:
    """Whether *decoder* (its serialised form) only concatenates per-token pieces. After a ``Fuse`` (which joins
    the pieces into one text) only a ``Strip`` of at most one leading character may follow: it takes from the
    first piece only, which a window of two or more tokens never hands out; anything else there would act on text
    across tokens (a ``Replace`` of two characters, a strip of the end)."""
    if not decoder:
        return False
    steps = decoder.get("decoders", ()) if decoder.get("type") == "Sequence" else [decoder]
    fused = False
    for step in steps:
        kind = step.get("type")
        if kind == "Fuse":
            fused = True
        elif fused and not (kind == "Strip" and step.get("start", 0) <= 1 and not step.get("stop", 0)):
            return False
        elif kind not in _PER_TOKEN_DECODERS or (kind == "Strip" and step.get("stop", 0)):
            return False
    return True


class PieceTable:
    """The text each token adds after a token whose own text is complete, for tokenizers whose decoder only
    concatenates (``None`` for tokens that need a decode: bytes of a longer character, special and added tokens).

    A token's piece is what it adds after each of two different anchor tokens (``decode([a, t])`` minus
    ``decode([a])``); a token whose two pieces differ, or are empty or hold a replacement character, has none.
    Pieces are found on first use and kept (a few decodes each, once per token id)."""

    def __init__(self, tokenizer) -> None:
        self._decode = decoder_of(tokenizer)
        self._pieces: dict[int, str | None] = {}
        self._added: set[int] = set()
        self._anchors: list[tuple[int, str]] = []
        self.enabled = False
        backend = _direct_backend(tokenizer)
        if backend is not None:
            try:
                decoder = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else None
            except Exception:  # a decoder that does not serialise: always decode
                decoder = None
            self._added = set(getattr(tokenizer, "added_tokens_decoder", {}) or ())
            anchors = [self._anchor(tokenizer, word) for word in ("The", " cat")]
            self._anchors = [(a, self._decode([a])) for a in anchors if a is not None]
            self.enabled = _appends(decoder) and len({a for a, _ in self._anchors}) == 2

    def _anchor(self, tokenizer, word: str) -> int | None:
        ids = tokenizer.encode(word, add_special_tokens=False)
        if not ids or ids[-1] in self._added:
            return None
        text = self._decode([ids[-1]])
        return ids[-1] if text and "\ufffd" not in text else None

    def get(self, token_id: int) -> str | None:
        """The text *token_id* adds after a complete token, or ``None`` (decode it)."""
        try:
            return self._pieces[token_id]
        except KeyError:
            piece = self._pieces[token_id] = self._find(token_id) if self.enabled else None
            return piece

    def _find(self, token_id: int) -> str | None:
        if token_id in self._added:
            return None
        pieces = set()
        for anchor, alone in self._anchors:
            both = self._decode([anchor, token_id])
            if not both.startswith(alone):
                return None
            pieces.add(both[len(alone) :])
        piece = pieces.pop()
        return piece if not pieces and piece and "\ufffd" not in piece else None


class TextStream:
    """Turns generated token ids into text deltas, holding back incomplete characters and partial stops.

    *pieces*: the tokenizer's :class:`PieceTable`, shared by its streams (one is made if not given)."""

    def __init__(self, tokenizer, stop: Sequence[str], pieces: PieceTable | None = None) -> None:
        self.tokenizer = tokenizer
        self._decode_ids = decoder_of(tokenizer)
        self.pieces = pieces if pieces is not None else PieceTable(tokenizer)
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
        ids = self.ids
        if self.stopped:
            ids.append(token_id)
            return ""
        if self.prefix_offset < self.read_offset == len(ids) and self.pieces.enabled:
            # the text so far is complete and its last token's own text too (so the decoder's start, e.g. a
            # leading space removed, is behind): a token with a piece adds exactly that
            piece = self.pieces.get(token_id)
            if piece is not None and self.pieces.get(ids[-1]) is not None:
                ids.append(token_id)
                self.text += piece
                self.prefix_offset, self.read_offset = self.read_offset, len(ids)
                return self._release(final=False)
        ids.append(token_id)
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
