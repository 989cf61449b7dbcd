"""Request validation, in one place for both fronts of the engine (the SDK's local transport and the server).

A :class:`~llava_next_sdk.types.ChatRequest` arrives already well formed (``llava_next_sdk.wire`` and
``llava_next_sdk.types`` check shapes, parameter names and ranges). What is checked here depends on the
deployment and the model, and happens before anything is queued:

* images per request (:attr:`Limits.max_images_per_request`);
* where images may come from: images decoded in this process (the local transport), ``data:`` URLs and
  encoded bytes always; ``http(s)://`` URLs only for hosts in
  :attr:`Limits.allowed_url_domains` (``None``: any host); never local paths or ``file://`` URLs;
* stop strings: at most :attr:`Limits.max_stop_chars` characters each (their count is bounded by
  ``GenerationParams``);
* prompt text: at most as many characters as the context could hold (the context length times the longest
  token's length), checked *before* anything is tokenized, so a 10 MB prompt is refused at once;
* image size: encoded bytes (:attr:`Limits.max_image_bytes`) and pixels (:attr:`Limits.max_image_pixels`
  per image, :attr:`Limits.max_request_pixels` per request, 413 beyond), read from the headers before any
  pixel is decoded; a :class:`PixelBudget` bounds the pixels decoded at once across requests (429 beyond);
* image URLs: fetched within :attr:`Limits.url_timeout` seconds overall and :attr:`Limits.max_image_bytes`;
* context length: prompt tokens (images expanded) plus ``max_tokens`` (by :meth:`Engine.prepare`).

Every failure is an ``llava_next_sdk.errors`` class that says what was wrong and how to fix it, so the
local transport and the server raise the same errors for the same input. The functions block (decoding,
fetching, tokenizing): call them from a worker thread, through :func:`in_worker_thread`.
"""

from __future__ import annotations

import ctypes
import io
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import anyio
from llava_next_sdk.errors import BadRequestError, ContextLengthExceededError, InvalidImageError, OverloadedError
from llava_next_sdk.images import MAX_IMAGE_BYTES
from llava_next_sdk.types import ChatRequest, GenerationParams, TextPart
from llava_next_sdk.wire import decode_data_url

from .errors import ImageError

if TYPE_CHECKING:
    from .engine import Engine, PreparedRequest, SamplingParams

_T = TypeVar("_T")

__all__ = [
    "Limits",
    "Budget",
    "PixelBudget",
    "check_image_count",
    "check_image_url",
    "check_stop_strings",
    "check_prompt_chars",
    "max_prompt_chars",
    "load_request_images",
    "to_chat_messages",
    "to_sampling_params",
    "prepare_request",
    "in_worker_thread",
]

DEFAULT_TEMPERATURE = 1.0
"""OpenAI's default when a request gives no temperature."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for.

    :param max_images_per_request: images in one request at most.
    :param max_image_pixels: width x height of one image at most.
    :param max_request_pixels: width x height summed over a request's images at most (413 beyond).
    :param max_pixels_in_flight: pixels decoded at once across all requests (the server's
        :class:`PixelBudget`; a request that would exceed it gets 429). At least ``max_request_pixels``.
    :param max_image_bytes: encoded size of one image at most (also the download limit of an image URL).
    :param allowed_url_domains: hosts whose ``http(s)://`` image URLs are fetched (a domain allows its
        subdomains too); ``()`` allows none, ``None`` allows any (in-process use only).
    :param url_timeout: seconds for fetching one image URL, overall (connect, headers and every byte).
    :param max_body_bytes: size of a request body at most (the server's limit).
    :param body_timeout: seconds to receive a request body, overall (the server's limit: a client that sends
        its body slowly must not hold a reading place for ever).
    :param max_stop_chars: characters of one stop string at most.
    :param max_messages: messages of one request at most, content parts of one message at most, and four times
        as many parts in all (parsing and templating a million empty messages, or 4096 messages of 4096 parts,
        took the server's event loop for seconds).
    """

    max_images_per_request: int = 8
    max_image_pixels: int = 4096 * 4096
    max_request_pixels: int = 4096 * 4096
    max_pixels_in_flight: int = 4 * 4096 * 4096
    max_image_bytes: int = MAX_IMAGE_BYTES  # the SDK's: its HTTP transport refuses larger decoded images alike
    allowed_url_domains: tuple[str, ...] | None = ()
    url_timeout: float = 10.0
    max_body_bytes: int = 64 * 1024 * 1024
    body_timeout: float = 60.0
    max_stop_chars: int = 1000
    max_messages: int = 4096

    def __post_init__(self) -> None:
        if self.max_pixels_in_flight < self.max_request_pixels:
            raise ValueError(
                f"max_pixels_in_flight={self.max_pixels_in_flight} is below max_request_pixels="
                f"{self.max_request_pixels}: a request within its own limit could never run"
            )


class Budget:
    """An amount (bytes, pixels) that requests may hold at once, against a bound (thread-safe): :meth:`take` raises
    :class:`OverloadedError` (429, retry later) for a request that does not fit now, rather than make it wait;
    :meth:`give` hands an amount back. *refusal* words the error from ``(held, wanted, capacity)``."""

    def __init__(self, capacity: int, refusal: Callable[[int, int, int], str]) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._refusal = refusal
        self._lock = threading.Lock()

    def take(self, amount: int) -> None:
        with self._lock:
            if self.in_use + amount > self.capacity:
                raise OverloadedError(self._refusal(self.in_use, amount, self.capacity), retry_after=1.0)
            self.in_use += amount

    def give(self, amount: int) -> None:
        with self._lock:
            self.in_use -= amount


class PixelBudget(Budget):
    """The decoded pixels that requests may hold at once while their images are prepared (thread-safe).

    A request takes its images' pixel count (read from their headers) before decoding them and gives it
    back when its images are preprocessed; a request that does not fit now gets :class:`OverloadedError`
    (429, retry later). When the budget falls back to zero after large images, freed memory is handed back
    to the operating system (glibc keeps it otherwise, and the process's RSS stays at its peak).
    """

    TRIM_AFTER_PIXELS = 4096 * 4096
    """Hand memory back to the OS when at least this many pixels were released since the last time."""

    def __init__(self, capacity: int) -> None:
        super().__init__(
            capacity,
            lambda held, wanted, bound: (
                f"the server is decoding {held} image pixels for other requests and this request needs "
                f"{wanted} more, beyond its budget of {bound} pixels in flight; retry shortly"
            ),
        )
        self._released = 0

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        self.take(pixels)
        try:
            yield
        finally:
            with self._lock:
                self.in_use -= pixels
                self._released += pixels
                trim = self.in_use == 0 and self._released >= self.TRIM_AFTER_PIXELS
                if trim:
                    self._released = 0
            if trim:
                _return_free_memory()


def _return_free_memory() -> None:
    """Ask glibc to give freed heap pages back to the OS (a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


async def in_worker_thread(function: Callable[..., _T], *args: Any, **options: Any) -> _T:
    """``await anyio.to_thread.run_sync(function, *args, **options)``, with the function's error raised here: how
    both fronts call this module's blocking functions.

    Raised inside anyio's call, an error's traceback holds the frame that holds the future that holds the error: a
    reference cycle, and with it the request (its body, its images) stays in memory until the garbage collector's
    next full pass. Caught in the worker thread and raised here, nothing of the call is in its traceback."""

    def call() -> tuple[Any, Exception | None]:
        try:
            return function(*args), None
        except Exception as error:  # noqa: BLE001  (raised below, in the caller's task)
            return None, error

    value, error = await anyio.to_thread.run_sync(call, **options)
    if error is not None:
        try:
            raise error
        finally:
            del error  # not left in this frame, which its traceback holds
    return value


def check_image_count(request: ChatRequest, limits: Limits) -> None:
    count = len(request.images)
    if count > limits.max_images_per_request:
        raise BadRequestError(
            f"the request has {count} images but at most {limits.max_images_per_request} are allowed per "
            "request; send fewer images or split the request",
            param="messages",
        )


def check_image_url(url: str, index: int, limits: Limits) -> None:
    """Refuse image URLs the deployment does not fetch (any scheme but http(s), hosts not allowed)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (a port that is not a number raises here, as httpx would later)
    except ValueError as exc:
        raise InvalidImageError(
            f"its URL {url[:60]!r} is malformed ({exc}); check the URL, or send the image as a data URL",
            index=index,
            param="messages",
        ) from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise InvalidImageError(
            f"an image URL must be a data: URL or an http(s) URL, got {url[:60]!r}; local paths and file:// URLs "
            "are never read from a request",
            index=index,
            param="messages",
        )
    host = parts.hostname.lower().rstrip(".")
    allowed = limits.allowed_url_domains
    if allowed is not None and not any(host == d or host.endswith("." + d) for d in (a.lower() for a in allowed)):
        hint = (
            ("allow the host with --allow-url-domain " + host)
            if allowed == ()
            else ("allowed hosts: " + ", ".join(allowed))
        )
        raise InvalidImageError(
            f"URLs from {host!r} are not allowed; send the image as a data URL, or {hint}",
            index=index,
            param="messages",
        )


def check_stop_strings(request: ChatRequest, limits: Limits) -> None:
    """Refuse stop strings longer than :attr:`Limits.max_stop_chars` (their count is checked on parsing)."""
    for i, stop in enumerate(request.params.stop or ()):
        if len(stop) > limits.max_stop_chars:
            raise BadRequestError(
                f"stop[{i}] is {len(stop)} characters long; at most {limits.max_stop_chars} characters are allowed "
                f"per stop string (the limit max_stop_chars), so shorten it",
                param="stop",
            )


def max_prompt_chars(engine: Engine) -> int:
    """The most prompt characters that could fit *engine*'s context (:attr:`Engine.max_prompt_chars`)."""
    return engine.max_prompt_chars


def check_prompt_chars(engine: Engine, request: ChatRequest) -> None:
    """Refuse a prompt whose text cannot fit the context, before any of it is tokenized."""
    chars = sum(len(p.text) for m in request.messages for p in m.content if isinstance(p, TextPart))
    bound = max_prompt_chars(engine)
    if chars > bound:
        raise ContextLengthExceededError(
            f"the messages hold {chars} characters of text, more than the model's context length of "
            f"{engine.max_context} tokens can hold (at most {bound} characters); send a shorter prompt",
            param="messages",
        )


def fetch_image(url: str, index: int, limits: Limits) -> bytes:
    """GET an image URL that :func:`check_request` allowed: no redirects (they could lead anywhere), bounded size
    and overall time (blocks: the server runs each URL of a request on a worker thread of its own)."""
    from .images import fetch_url

    try:
        return fetch_url(
            url,
            timeout=limits.url_timeout,
            total_timeout=limits.url_timeout,
            max_bytes=limits.max_image_bytes,
            follow_redirects=False,
        )
    except ImageError as error:
        message = error.message
    # raised outside the except block: no __context__ holding the fetch's frames (and what they read)
    raise InvalidImageError(message, index=index, param="messages")


def _image_size(source, index: int, limits: Limits) -> tuple[int, int]:
    """``(width, height)`` of an image source, its limits checked: a decoded image's own size, or what an
    encoded image's header says (0, 0 when unreadable: decoding says why)."""
    from PIL import Image

    if isinstance(source, bytes):
        if len(source) > limits.max_image_bytes:
            raise InvalidImageError(
                f"the image is {len(source)} bytes; at most {limits.max_image_bytes} are allowed",
                index=index,
                param="messages",
            )
        try:
            width, height = Image.open(io.BytesIO(source)).size  # reads the header only
        except Image.DecompressionBombError:  # PIL's own ceiling, far above ours: our message, our flag
            raise InvalidImageError(
                f"the image is larger than PIL opens ({Image.MAX_IMAGE_PIXELS} pixels); at most "
                f"{limits.max_image_pixels} are allowed, so downscale it",
                index=index,
                param="messages",
            ) from None
        except Exception:
            width = height = 0
    else:
        width, height = source.size
    if width * height > limits.max_image_pixels:
        raise InvalidImageError(
            f"the image is {width}x{height} = {width * height} pixels; at most {limits.max_image_pixels} are "
            "allowed, so downscale it",
            index=index,
            param="messages",
        )
    return width, height


def _to_rgb(source, index: int):
    """An RGB PIL image from encoded bytes whose size was checked, or from an image decoded in this process
    (the SDK's local transport hands those over as they are: no encoding round trip)."""
    from .images import decode_image_bytes, to_rgb

    try:
        image = decode_image_bytes(source, "the image") if isinstance(source, bytes) else source
        return to_rgb(image, "the image")
    except ImageError as error:
        raise InvalidImageError(error.message, index=index, param="messages") from None


def remote_image_urls(request: ChatRequest, limits: Limits) -> list[tuple[int, str]]:
    """``(index, url)`` of every ``http(s)://`` image of *request*, in order, each allowed by the deployment's
    source policy (the image count checked first)."""
    check_image_count(request, limits)
    urls = []
    for index, part in enumerate(request.images):
        if part.url is not None and not part.is_data_url:
            check_image_url(part.url, index, limits)
            urls.append((index, part.url))
    return urls


def _request_image_sources(request: ChatRequest, limits: Limits, fetched: Mapping[int, bytes] | None = None) -> list:
    """Every image of *request*, in order, as encoded bytes or an already decoded image (its sources allowed by
    :func:`remote_image_urls` first); URLs are fetched here unless *fetched* has their bytes (by image index)."""
    fetched = fetched or {}
    sources: list = []
    for index, part in enumerate(request.images):
        if part.url is not None:  # an ImagePart holds exactly one of url, data, image
            if part.is_data_url:
                sources.append(decode_data_url(part.url, index=index, param="messages")[1])
            elif index in fetched:
                sources.append(fetched[index])
            else:
                sources.append(fetch_image(part.url, index, limits))
        elif part.data is not None:
            sources.append(bytes(part.data))
        else:
            sources.append(part.image)
    return sources


def _request_pixels(sources: list, limits: Limits) -> int:
    pixels = sum(w * h for w, h in (_image_size(source, i, limits) for i, source in enumerate(sources)))
    if pixels > limits.max_request_pixels:
        raise BadRequestError(
            f"the request's images hold {pixels} pixels together; at most {limits.max_request_pixels} are allowed "
            "per request, so send fewer or smaller images",
            status=413,
            param="messages",
        )
    return pixels


def load_request_images(request: ChatRequest, limits: Limits) -> list:
    """Every image of *request* as an RGB PIL image, in order, under the deployment's source policy."""
    remote_image_urls(request, limits)
    sources = _request_image_sources(request, limits)
    _request_pixels(sources, limits)
    return [_to_rgb(source, index) for index, source in enumerate(sources)]


def to_chat_messages(request: ChatRequest) -> list[dict]:
    """The request's messages in transformers' chat format (``{"type": "image"}`` where each image was)."""
    return [
        {
            "role": m.role,
            "content": [
                {"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"} for p in m.content
            ],
        }
        for m in request.messages
    ]


def to_sampling_params(params: GenerationParams) -> SamplingParams:
    from .engine import SamplingParams

    return SamplingParams(
        max_tokens=params.max_tokens,
        temperature=DEFAULT_TEMPERATURE if params.temperature is None else params.temperature,
        top_p=1.0 if params.top_p is None else params.top_p,
        stop=tuple(params.stop or ()),
        seed=params.seed,
    )


PARTS_PER_MESSAGE = 4
"""Content parts a request may hold in all, per message it may hold (:attr:`Limits.max_messages`)."""


def check_message_count(messages: int, max_messages: int) -> None:
    """Refuse more than *max_messages* messages (the server says it before any pass over them)."""
    if messages > max_messages:
        raise BadRequestError(
            f"the request holds {messages} messages; at most {max_messages} are accepted", param="messages"
        )


def check_part_counts(counts: Sequence[int], max_messages: int) -> None:
    """Refuse a message of more than *max_messages* content parts, or more than :data:`PARTS_PER_MESSAGE` times as
    many in all (4096 messages of 4096 parts held a server's event loop for seconds)."""
    if max(counts, default=0) > max_messages:
        raise BadRequestError(
            f"a message holds {max(counts)} content parts; at most {max_messages} are accepted", param="messages"
        )
    if sum(counts) > PARTS_PER_MESSAGE * max_messages:
        raise BadRequestError(
            f"the messages hold {sum(counts)} content parts in all; at most {PARTS_PER_MESSAGE * max_messages} "
            f"are accepted ({PARTS_PER_MESSAGE} per message on average, of --max-messages {max_messages})",
            param="messages",
        )


def check_request(engine: Engine, request: ChatRequest, limits: Limits) -> list[tuple[int, str]]:
    """The cheap checks of *request*, before any image is fetched or decoded (message and part counts, a user
    message, stop strings, prompt characters, image count, image sources); the :func:`remote_image_urls` to fetch.
    The server counts messages and parts on the raw body too, before parsing it."""
    check_message_count(len(request.messages), limits.max_messages)
    check_part_counts([len(m.content) for m in request.messages], limits.max_messages)
    if not any(m.role == "user" for m in request.messages):
        raise BadRequestError("the request needs at least one user message", param="messages")
    check_stop_strings(request, limits)
    check_prompt_chars(engine, request)
    check_no_placeholder_in_text(engine, request)
    return remote_image_urls(request, limits)


def check_no_placeholder_in_text(engine: Engine, request: ChatRequest) -> None:
    """Refuse message text holding the model's image placeholder (``<image>``): images are parts of their own,
    each placed where its part is, so a placeholder typed in the text would stand for an image that is not there
    (the processor would count one placeholder too many)."""
    placeholder = getattr(engine.processor, "image_token", None) or "<image>"
    for i, message in enumerate(request.messages):
        for part in message.content:
            if isinstance(part, TextPart) and placeholder in part.text:
                raise BadRequestError(
                    f"messages[{i}] has {placeholder!r} in its text, the model's image placeholder; send each image "
                    f"as an image part (its placeholder is added where the part is) and leave {placeholder!r} out "
                    "of the text",
                    param="messages",
                )


def prepare_request(
    engine: Engine,
    request: ChatRequest,
    limits: Limits,
    budget: PixelBudget | None = None,
    *,
    fetched: Mapping[int, bytes] | None = None,
    checked: bool = False,
) -> PreparedRequest:
    """Check *request* against *limits* and the model, and turn it into the engine's input (blocking).

    The cheap checks come first (:func:`check_request`; *checked*: they passed already, as the server runs them
    on its event loop before it fetches the request's images), then the images are fetched (unless *fetched*
    holds their bytes by image index: the server fetches a request's URLs at once, apart from the CPU work) and
    their headers read, and only then are pixels decoded, within *budget* when one is given.

    :raises BadRequestError: no user message, too many images, a stop string too long, or (413) too many pixels.
    :raises InvalidImageError: an image from a forbidden source, too large, or undecodable (names its index).
    :raises ContextLengthExceededError: the prompt plus ``max_tokens`` exceeds the model's context.
    :raises OverloadedError: *budget* has no room for this request's pixels now (429).
    """
    if not checked:
        check_request(engine, request, limits)
    sources = _request_image_sources(request, limits, fetched)
    pixels = _request_pixels(sources, limits)
    with budget.hold(pixels) if budget is not None else nullcontext():
        images = [_to_rgb(source, index) for index, source in enumerate(sources)]
        del sources
        return engine.prepare(
            to_chat_messages(request),
            images,
            to_sampling_params(request.params),
            image_detail=[part.detail for part in request.images],
        )
