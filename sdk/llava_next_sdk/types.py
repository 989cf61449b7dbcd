"""The SDK's value types: what goes into a request and what comes out, wire-neutral.

Both transports (in-process and HTTP) and the server speak in these types; only ``wire.py`` knows
how they look as OpenAI Chat Completions JSON.

    ChatRequest(messages=(ChatMessage, ...), params=GenerationParams, model=str | None)
    ChatMessage(role, content=(TextPart | ImagePart, ...))
    GenerationResult(text, finish_reason, usage=Usage, timings=Timings, model, id)

Nothing here does I/O or imports anything heavy.
"""

from __future__ import annotations

import base64
import dataclasses
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import BadRequestError, UnsupportedParameterError

#: A lone UTF-16 surrogate (``\ud800`` without its pair): no valid Unicode, and no JSON encoder sends it.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")

__all__ = [
    "TextPart",
    "ImagePart",
    "ContentPart",
    "ChatMessage",
    "GenerationParams",
    "ChatRequest",
    "Usage",
    "Timings",
    "GenerationResult",
    "ROLES",
    "FINISH_REASONS",
]

ROLES = ("system", "user", "assistant")
"""Message roles we accept (OpenAI's chat roles without tools)."""

FINISH_REASONS = ("stop", "length", "cancelled")
"""``stop``: an end-of-sequence token or a stop string; ``length``: ``max_tokens`` (or the context)
ran out; ``cancelled``: the request was cancelled before it finished (local streams only)."""


@dataclass(frozen=True, slots=True)
class TextPart:
    """A piece of text in a message."""

    text: str

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise BadRequestError(f"a text part must hold a str, got {type(self.text).__name__}", param="messages")


@dataclass(frozen=True, slots=True)
class ImagePart:
    """An image in a message. Exactly one field is set:

    - ``url``: an ``http(s)://`` URL (fetched by whoever runs the model, subject to its URL policy)
      or a ``data:image/<type>;base64,...`` URL;
    - ``data``: the bytes of an encoded image file (PNG, JPEG, ...), as read from a path or given as bytes;
    - ``image``: a decoded ``PIL.Image.Image``, as the user gave it (a numpy array becomes one), already
      in a mode PNG stores losslessly and upright (``llava_next_sdk.images`` prepares it).

    A decoded image is not encoded until it must leave the process: the in-process transport uses it as it
    is, the HTTP transport encodes it once (lossless PNG, :func:`llava_next_sdk.images.encode_for_wire`),
    so both see the very same pixels.
    """

    url: str | None = None
    data: bytes | None = None
    media_type: str = "image/png"
    """The MIME type of ``data`` (ignored for ``url`` and ``image``)."""
    image: Any = None
    """An image decoded in this process (PIL), handed to an in-process model as it is."""
    detail: str = "auto"
    """OpenAI's ``detail``: ``"low"`` (the base view only: one tile's tokens, 576 on llava-v1.6-mistral),
    ``"high"`` or ``"auto"`` (full anyres)."""

    def __post_init__(self) -> None:
        if sum(value is not None for value in (self.url, self.data, self.image)) != 1:
            raise BadRequestError("an image part needs exactly one of url=, data= or image=", param="messages")
        if self.detail not in ("low", "high", "auto"):
            raise BadRequestError(
                f"image detail must be 'low', 'high' or 'auto', got {self.detail!r}", param="messages"
            )

    @property
    def is_data_url(self) -> bool:
        return self.url is not None and self.url[:5].lower() == "data:"

    def as_url(self) -> str:
        """The image as a URL for the wire: ``url`` itself, else a base64 data URL (``image`` is encoded
        as PNG here, which takes a while: the HTTP transport does it beforehand, off the event loop)."""
        if self.url is not None:
            return self.url
        if self.data is None:
            from .images import encode_png

            return f"data:image/png;base64,{base64.b64encode(encode_png(self.image)).decode('ascii')}"
        return f"data:{self.media_type};base64," + base64.b64encode(self.data).decode("ascii")


ContentPart = TextPart | ImagePart


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One chat turn. ``content`` is a tuple of parts in order (text and images interleaved as the
    user wrote them); a plain string is accepted and becomes one :class:`TextPart`."""

    role: str
    content: tuple[ContentPart, ...]

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise BadRequestError(
                f"unknown message role {self.role!r}; use one of {', '.join(ROLES)}", param="messages"
            )
        content = self.content
        if isinstance(content, str):
            content = (TextPart(content),)
        else:
            content = tuple(content)
        for part in content:
            if not isinstance(part, (TextPart, ImagePart)):
                raise BadRequestError(
                    f"a message part must be a TextPart or ImagePart, got {type(part).__name__}", param="messages"
                )
        object.__setattr__(self, "content", content)

    @property
    def text(self) -> str:
        """The message's text parts joined (images left out)."""
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    @property
    def images(self) -> tuple[ImagePart, ...]:
        return tuple(p for p in self.content if isinstance(p, ImagePart))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """Sampling parameters, with OpenAI's names and meanings. ``None`` means "the model's default".

    - ``max_tokens``: the most completion tokens to generate (>= 1).
    - ``temperature``: 0 (greedy) to 2; greedy decoding when 0.
    - ``top_p``: nucleus sampling mass in (0, 1].
    - ``stop``: up to 4 strings; generation ends before the first one that appears (not included).
    - ``seed``: 0 to 2**64 - 1; makes sampling repeatable on the same model and hardware.

    Values are checked here, so the client, the local transport and the server reject the same
    bad values with the same :class:`BadRequestError` (naming the parameter in ``param``).
    """

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] | None = None
    seed: int | None = None

    MAX_STOP_STRINGS = 4
    MAX_SEED = 2**64 - 1
    """The largest seed a sampler's random generator takes."""

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> BadRequestError:
            value = repr(getattr(self, name))  # quoted short: a client's megabyte value is not sent back whole
            return BadRequestError(
                f"{name}={value if len(value) <= 60 else value[:50] + '...'} is invalid: {why}", param=name
            )

        if self.max_tokens is not None:
            if not _is_int(self.max_tokens) or self.max_tokens < 1:
                raise bad("max_tokens", "it must be an integer >= 1")
            object.__setattr__(self, "max_tokens", int(self.max_tokens))
        if self.temperature is not None:
            if not _is_number(self.temperature) or not 0 <= self.temperature <= 2:
                raise bad("temperature", "it must be a number from 0 to 2 (0 is greedy)")
            object.__setattr__(self, "temperature", float(self.temperature))
        if self.top_p is not None:
            if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
                raise bad("top_p", "it must be a number in (0, 1]")
            object.__setattr__(self, "top_p", float(self.top_p))
        if self.stop is not None:
            stop = (self.stop,) if isinstance(self.stop, str) else self.stop
            if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
                raise bad("stop", "it must be a non-empty string or a list of non-empty strings")
            if any(not s.isascii() and LONE_SURROGATE.search(s) for s in stop):
                raise bad("stop", "a stop string holds a lone UTF-16 surrogate (such as \\ud800); send valid Unicode")
            if len(stop) > self.MAX_STOP_STRINGS:
                raise bad("stop", f"at most {self.MAX_STOP_STRINGS} stop strings are allowed")
            object.__setattr__(self, "stop", tuple(stop) or None)
        if self.seed is not None:
            if not _is_int(self.seed) or not 0 <= self.seed <= self.MAX_SEED:
                raise bad("seed", f"it must be an integer from 0 to {self.MAX_SEED} (2**64 - 1)")
            object.__setattr__(self, "seed", int(self.seed))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> GenerationParams:
        """Build from keyword arguments; an unknown name raises :class:`UnsupportedParameterError`."""
        unknown = sorted(set(kwargs) - set(cls.names()))
        if unknown:
            raise UnsupportedParameterError(
                f"unsupported generation parameter(s): {', '.join(unknown)}; supported: {', '.join(cls.names())}",
                param=unknown[0],
            )
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The parameters that are set, as plain JSON values (``stop`` as a list)."""
        out = {}
        for name in self.names():
            value = getattr(self, name)
            if value is not None:
                out[name] = list(value) if name == "stop" else value
        return out

    def merged(self, **overrides: Any) -> GenerationParams:
        """A copy with *overrides* applied (``None`` values are ignored)."""
        values = {n: getattr(self, n) for n in self.names()}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return GenerationParams.from_kwargs(values)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A wire-neutral chat completion request, the one thing a transport is handed.

    ``messages`` are validated :class:`ChatMessage` objects whose images are :class:`ImagePart` (a URL,
    encoded bytes, or a decoded image from this process). ``model`` is the model name for endpoints that
    host several (the HTTP transport fills in the client's ``model`` when it is ``None``; the local
    transport ignores it).
    """

    messages: tuple[ChatMessage, ...]
    params: GenerationParams = field(default_factory=GenerationParams)
    model: str | None = None

    def __post_init__(self) -> None:
        messages = tuple(self.messages)
        if not messages:
            raise BadRequestError("a request needs at least one message", param="messages")
        for m in messages:
            if not isinstance(m, ChatMessage):
                raise BadRequestError(f"messages must be ChatMessage objects, got {type(m).__name__}", param="messages")
        object.__setattr__(self, "messages", messages)

    @property
    def images(self) -> tuple[ImagePart, ...]:
        """Every image of the request, in order of appearance (the index used in errors)."""
        return tuple(img for m in self.messages for img in m.images)


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one request. ``prompt_tokens`` includes the image tokens; ``image_tokens``
    is how many of them stand for images (``None`` when the endpoint does not report it)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    image_tokens: int | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Timings:
    """Where the time went, in seconds (``None`` where unknown).

    - ``queue_seconds``: waiting before generation started (reported by our engine/server only);
    - ``time_to_first_token``: from sending the request to the first generated text;
    - ``total_seconds``: from sending the request to the end of the result.
    """

    queue_seconds: float | None = None
    time_to_first_token: float | None = None
    total_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """What a generation produced.

    ``finish_reason`` is one of :data:`FINISH_REASONS` (third-party endpoints may report others).
    ``id`` is the endpoint's or engine's request id, when there is one. ``usage`` is ``None`` when an endpoint
    reported none (a third-party one that leaves it out; ours and the local engine always report it).
    """

    text: str
    finish_reason: str | None
    usage: Usage | None = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    model: str | None = None
    id: str | None = None

    def __str__(self) -> str:
        return self.text
