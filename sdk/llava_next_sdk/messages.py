"""The one chat-message parser, with the one role table, used by every entry point.

The wire format (``wire.parse_chat_request``), the clients' ``chat`` methods, and the model package's
pipeline and prompt formats all read chat messages with :func:`read_messages`, so they accept the same
shapes and refuse the same bad ones with the same message. A message is

- a dict ``{"role": ..., "content": ...}`` whose role is ``system`` (or ``developer``, OpenAI's newer
  name for it), ``user`` or ``assistant``, and whose content is a string, ``None`` (an empty turn), or
  a list of parts:

  - ``{"type": "text", "text": "..."}``;
  - OpenAI's ``{"type": "image_url", "image_url": {"url": ..., "detail": "low" | "high" | "auto"}}``
    (or ``"image_url": <url>``);
  - transformers' ``{"type": "image", "image" | "url" | "path": <source>}``;
  - OpenAI Responses' ``{"type": "input_image", "image_url": <url>, "detail": ...}``;

- or a :class:`~llava_next_sdk.types.ChatMessage` (or an already :class:`ParsedMessage`).

Reading is shape only: no image is read or fetched. Each image part becomes an :class:`ImageRef` holding
its source as given; the caller turns the sources into :class:`~llava_next_sdk.types.ImagePart` objects
its own way (the client reads files off the event loop, the wire keeps URLs, the pipeline loads images at
preprocessing) and :func:`to_chat_messages` puts them in place. A part without a source (transformers'
bare ``{"type": "image"}``, whose image is given elsewhere) is accepted only with ``bare_images=True``.

Errors are :class:`~llava_next_sdk.errors.BadRequestError` (``InvalidImageError`` for an image part
without its image) naming the message and part, e.g. ``messages[1].content[0]: ...``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import BadRequestError, InvalidImageError
from .types import LONE_SURROGATE, ChatMessage, ImagePart, TextPart

__all__ = [
    "ROLE_ALIASES",
    "IMAGE_PART_TYPES",
    "ImageRef",
    "ParsedMessage",
    "read_messages",
    "to_chat_messages",
]

ROLE_ALIASES: Mapping[str, str] = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
"""Every role a message may name -> the role it is (``developer`` is OpenAI's newer name for ``system``)."""

IMAGE_PART_TYPES = ("image_url", "image", "input_image")
"""Content part types that hold an image (OpenAI Chat Completions, transformers, OpenAI Responses)."""

DETAILS = ("low", "high", "auto")
_ROLE_NAMES = "system (or developer), user or assistant"
_PART_SHAPES = (
    "{'type': 'text', 'text': ...}, {'type': 'image_url', 'image_url': {'url': ...}} or {'type': 'image', 'image': ...}"
)


@dataclass(frozen=True, slots=True)
class ImageRef:
    """An image part as the caller wrote it, its source not read yet.

    :param source: what the part gave: a URL or path string, bytes, a PIL image, an array, an
        :class:`ImagePart`...; ``None`` for a bare ``{"type": "image"}`` (only with ``bare_images=True``).
    :param detail: OpenAI's image ``detail`` (``"low"``, ``"high"`` or ``"auto"``).
    :param index: the image's position among all the images of the messages (named in errors).
    :param where: the part's place, e.g. ``"messages[1].content[0]"``.
    """

    source: Any
    detail: str = "auto"
    index: int = 0
    where: str = ""


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    """One message as :func:`read_messages` reads it: a role of :data:`~llava_next_sdk.types.ROLES` and
    its parts in order, text as :class:`~llava_next_sdk.types.TextPart`, images as :class:`ImageRef`."""

    role: str
    content: tuple[TextPart | ImageRef, ...]

    @property
    def images(self) -> tuple[ImageRef, ...]:
        return tuple(p for p in self.content if isinstance(p, ImageRef))

    @property
    def text(self) -> str:
        """The message's text parts joined (images left out)."""
        return "".join(p.text for p in self.content if isinstance(p, TextPart))


def _bad(message: str) -> BadRequestError:
    return BadRequestError(message, param="messages")


def _kind(value: Any) -> str:
    """What a caller's value is, in words that fit JSON and Python callers alike."""
    names = {dict: "an object (dict)", list: "a list", tuple: "a tuple", str: "a string", bool: "a boolean"}
    if value is None:
        return "null (None)"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    if isinstance(value, (list, tuple)) and not value:  # subclasses too: never a KeyError inside an error message
        return "an empty tuple" if isinstance(value, tuple) else "an empty list"
    return names.get(type(value), type(value).__name__)


def _brief(value: Any) -> str:
    """A short repr of a caller's value for an error message (never the whole of it)."""
    if isinstance(value, (Mapping, list, tuple)):
        return _kind(value)
    text = repr(value)
    return text if len(text) <= 60 else text[:50] + "...'"


def _text(text: Any, where: str) -> TextPart:
    if not isinstance(text, str):
        raise _bad(f"{where}: a text part needs a string 'text', got {_kind(text)}")
    if not text.isascii() and LONE_SURROGATE.search(text):
        raise _bad(
            f"{where}: the text holds a lone UTF-16 surrogate (an escape such as \\ud800 without its pair); "
            "send valid Unicode"
        )
    return TextPart(text)


def _detail(value: Any, where: str) -> str:
    if value is None:
        return "auto"
    if value not in DETAILS:
        raise _bad(f"{where}: image detail must be 'low', 'high' or 'auto', got {_brief(value)}")
    return str(value)


def _base64_bytes(data: Any, where: str, index: int) -> bytes:
    """An image part's ``base64`` value as the encoded image's bytes (a data URL is read as data URLs are)."""
    import base64
    import binascii

    if isinstance(data, str) and data[:5].lower() == "data:":
        from .wire import decode_data_url  # the one data-URL decoder

        return decode_data_url(data, index=index, param="messages")[1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise InvalidImageError(
            f"{where}: its 'base64' is not base64 data: give the encoded image file as base64 text",
            index=index,
            param="messages",
        ) from None


def _image_ref(part: Mapping, kind: str, where: str, index: int, bare_images: bool) -> ImageRef:
    detail = part.get("detail")
    if kind == "image":
        source = next((part[key] for key in ("image", "url", "path") if part.get(key) is not None), None)
        if source is None and part.get("base64") is not None:  # transformers' {"type": "image", "base64": ...}
            source = _base64_bytes(part["base64"], where, index)
    else:  # image_url, input_image: {"image_url": url} or {"image_url": {"url": url, "detail": ...}}
        source = part.get("image_url")
        if isinstance(source, Mapping):
            detail = source.get("detail", detail)
            source = source.get("url")
    if isinstance(source, str) and not source:
        source = None
    if detail is None and isinstance(source, ImagePart):  # the part's own detail, unless this part sets one
        detail = source.detail
    if source is None and not bare_images:
        example = "{'url': '...'}" if kind == "image_url" else "'...'"
        needs = (
            "an image part needs its image: {'type': 'image', 'image': <PIL image, path, bytes, array or URL>} "
            "(or 'base64': <encoded image as base64 text>)"
            if kind == "image"
            else f"an {kind} part needs its URL: {{'type': '{kind}', 'image_url': {example}}}"
        )
        raise InvalidImageError(f"{where}: {needs}", index=index, param="messages")
    return ImageRef(source, _detail(detail, where), index, where)


def _read_part(part: Any, where: str, index: int, bare_images: bool) -> TextPart | ImageRef:
    if not isinstance(part, Mapping):
        raise _bad(f"{where}: a content part must be an object such as {_PART_SHAPES}; got {_kind(part)}")
    kind = part.get("type")
    if kind == "text":
        return _text(part.get("text"), where)
    if kind in IMAGE_PART_TYPES:
        return _image_ref(part, kind, where, index, bare_images)
    raise _bad(f"{where}: unsupported content part type {_brief(kind)}; use {_PART_SHAPES}")


def _read_message(message: Any, i: int, first_image: int, bare_images: bool) -> ParsedMessage:
    where = f"messages[{i}]"
    if isinstance(message, (ChatMessage, ParsedMessage)):  # already read: its images numbered anew
        parts: list[TextPart | ImageRef] = []
        image = first_image
        for j, part in enumerate(message.content):
            if isinstance(part, TextPart):
                parts.append(part)
                continue
            if isinstance(part, ImagePart):
                part = ImageRef(part, part.detail, where=f"{where}.content[{j}]")
            parts.append(dataclasses.replace(part, index=image))
            image += 1
        return ParsedMessage(message.role, tuple(parts))
    if not isinstance(message, Mapping):
        raise _bad(f"{where} must be an object {{'role': ..., 'content': ...}}, got {_kind(message)}")
    if "role" not in message:
        raise _bad(f"{where} has no 'role'; use {_ROLE_NAMES}")
    given = message["role"]
    role = ROLE_ALIASES.get(given) if isinstance(given, str) else None
    if role is None:
        raise _bad(f"{where}: unsupported role {_brief(given)}; use {_ROLE_NAMES}")
    for calls in ("tool_calls", "function_call"):  # tools are refused in a request: so are turns that used them
        if message.get(calls):
            raise _bad(
                f"{where} has '{calls}': tools and function calls are not supported; send the assistant turn's "
                "text as its content"
            )
    if "content" not in message:
        raise _bad(f"{where} has no 'content'; give a string or a list of content parts")
    content = message["content"]
    if content is None:  # an empty turn (OpenAI allows null content)
        return ParsedMessage(role, (TextPart(""),))
    if isinstance(content, str):
        return ParsedMessage(role, (_text(content, where),))
    if not isinstance(content, (list, tuple)):
        raise _bad(f"{where}: 'content' must be a string or a list of content parts, got {_kind(content)}")
    read: list[TextPart | ImageRef] = []
    image = first_image
    for j, part in enumerate(content):
        parsed = _read_part(part, f"{where}.content[{j}]", image, bare_images)
        image += isinstance(parsed, ImageRef)
        read.append(parsed)
    return ParsedMessage(role, tuple(read))


def read_messages(messages: Any, *, bare_images: bool = False) -> tuple[ParsedMessage, ...]:
    """Read chat *messages* (see the module doc for the shapes) without reading any image.

    :param messages: a non-empty list of message dicts, :class:`ChatMessage` or :class:`ParsedMessage`.
    :param bare_images: accept image parts without a source (transformers' ``{"type": "image"}``, whose
        image the caller gives separately); their :attr:`ImageRef.source` is ``None``.
    :return: the messages, roles mapped by :data:`ROLE_ALIASES`, images numbered in order from 0.
    :raises BadRequestError: for a malformed message, naming it (``InvalidImageError`` for an image part
        without its image).
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise _bad(
            f"messages must be a non-empty list of {{'role': ..., 'content': ...}} messages, got {_kind(messages)}"
        )
    parsed: list[ParsedMessage] = []
    image = 0
    for i, message in enumerate(messages):
        read = _read_message(message, i, image, bare_images)
        image += len(read.images)
        parsed.append(read)
    return tuple(parsed)


def to_chat_messages(messages: Sequence[ParsedMessage], images: Sequence[ImagePart]) -> tuple[ChatMessage, ...]:
    """*messages* as :class:`ChatMessage` objects, with *images* (one per :class:`ImageRef`, in order) in
    place of their references, each with its reference's ``detail``."""
    refs = [ref for message in messages for ref in message.images]
    if len(refs) != len(images):
        raise ValueError(f"{len(images)} image parts given for {len(refs)} image references")
    parts = iter(images)

    def placed(ref: ImageRef) -> ImagePart:
        part = next(parts)
        return part if part.detail == ref.detail else dataclasses.replace(part, detail=ref.detail)

    return tuple(
        ChatMessage(m.role, tuple(placed(p) if isinstance(p, ImageRef) else p for p in m.content)) for m in messages
    )
