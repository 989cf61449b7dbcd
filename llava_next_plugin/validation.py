"""Request validation, in one place for both fronts of the engine (the SDK's local transport and the server).

A :class:`~llava_next_sdk.types.ChatRequest` arrives already well formed (``llava_next_sdk.wire`` and
``llava_next_sdk.types`` check shapes, parameter names and ranges). What is checked here depends on the
deployment and the model, and happens before anything is queued:

* images per request (:attr:`Limits.max_images_per_request`);
* where images may come from: ``data:`` URLs and encoded bytes always; ``http(s)://`` URLs only for hosts in
  :attr:`Limits.allowed_url_domains` (``None``: any host); never local paths or ``file://`` URLs;
* image size: encoded bytes (:attr:`Limits.max_image_bytes`) and pixels (:attr:`Limits.max_image_pixels`),
  read from the header before the pixels are decoded;
* context length: prompt tokens (images expanded) plus ``max_tokens`` (by :meth:`Engine.prepare`).

Every failure is an ``llava_next_sdk.errors`` class that says what was wrong and how to fix it, so the
local transport and the server raise the same errors for the same input. The functions block (decoding,
fetching, tokenizing): call them from a worker thread.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from llava_next_sdk.errors import BadRequestError, InvalidImageError
from llava_next_sdk.types import ChatRequest, GenerationParams, TextPart
from llava_next_sdk.wire import decode_data_url

if TYPE_CHECKING:
    from .engine import Engine, PreparedRequest, SamplingParams

__all__ = ["Limits", "check_image_count", "check_image_url", "load_request_images", "to_chat_messages",
           "to_sampling_params", "prepare_request"]

DEFAULT_TEMPERATURE = 1.0
"""OpenAI's default when a request gives no temperature."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for.

    Args:
        max_images_per_request: images in one request at most.
        max_image_pixels: width x height of one image at most.
        max_image_bytes: encoded size of one image at most.
        allowed_url_domains: hosts whose ``http(s)://`` image URLs are fetched (a domain allows its
            subdomains too); ``()`` allows none, ``None`` allows any (in-process use only).
        url_timeout: seconds for fetching one image URL.
        max_body_bytes: size of a request body at most (the server's limit).
    """

    max_images_per_request: int = 8
    max_image_pixels: int = 4096 * 4096
    max_image_bytes: int = 20 * 1024 * 1024
    allowed_url_domains: tuple[str, ...] | None = ()
    url_timeout: float = 10.0
    max_body_bytes: int = 64 * 1024 * 1024


def check_image_count(request: ChatRequest, limits: Limits) -> None:
    count = len(request.images)
    if count > limits.max_images_per_request:
        raise BadRequestError(
            f"the request has {count} images but at most {limits.max_images_per_request} are allowed per "
            "request; send fewer images or split the request", param="messages")


def check_image_url(url: str, index: int, limits: Limits) -> None:
    """Refuse image URLs the deployment does not fetch (any scheme but http(s), hosts not allowed)."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise InvalidImageError(
            f"image URLs must be data: URLs or http(s) URLs, got {url[:60]!r}; local paths and file:// URLs "
            "are never read from a request", index=index, param="messages")
    host = parts.hostname.lower().rstrip(".")
    allowed = limits.allowed_url_domains
    if allowed is not None and not any(host == d or host.endswith("." + d) for d in (a.lower() for a in allowed)):
        hint = ("allow the host with --allow-url-domain " + host) if allowed == () else (
            "allowed hosts: " + ", ".join(allowed))
        raise InvalidImageError(
            f"image URLs from {host!r} are not allowed; send the image as a data URL, or {hint}",
            index=index, param="messages")


def _fetch(url: str, index: int, limits: Limits) -> bytes:
    """GET an allowed image URL: no redirects (they could lead anywhere), bounded size and time."""
    from .images import fetch_url

    try:
        return fetch_url(url, timeout=limits.url_timeout, max_bytes=limits.max_image_bytes, follow_redirects=False)
    except InvalidImageError as error:
        raise InvalidImageError(error.message, index=index, param="messages") from None


def _decode(data: bytes, index: int, limits: Limits):
    """An RGB PIL image from encoded bytes, its pixel count checked before the pixels are decoded."""
    from PIL import Image

    from .images import decode_image_bytes, to_rgb

    if len(data) > limits.max_image_bytes:
        raise InvalidImageError(f"the image is {len(data)} bytes; at most {limits.max_image_bytes} are allowed",
                                index=index, param="messages")
    try:
        width, height = Image.open(io.BytesIO(data)).size  # reads the header only
    except Exception:
        width = height = 0  # undecodable: decode_image_bytes says why
    if width * height > limits.max_image_pixels:
        raise InvalidImageError(
            f"the image is {width}x{height} = {width * height} pixels; at most {limits.max_image_pixels} are "
            "allowed, so downscale it", index=index, param="messages")
    try:
        return to_rgb(decode_image_bytes(data, "the image"), "the image")
    except InvalidImageError as error:
        raise InvalidImageError(error.message, index=index, param="messages") from None


def load_request_images(request: ChatRequest, limits: Limits) -> list:
    """Every image of *request* as an RGB PIL image, in order, under the deployment's source policy."""
    check_image_count(request, limits)
    images = []
    for index, part in enumerate(request.images):
        if part.data is not None:
            data = part.data
        elif part.is_data_url:
            _, data = decode_data_url(part.url, index=index)
        else:
            check_image_url(part.url, index, limits)
            data = _fetch(part.url, index, limits)
        images.append(_decode(data, index, limits))
    return images


def to_chat_messages(request: ChatRequest) -> list[dict]:
    """The request's messages in transformers' chat format (``{"type": "image"}`` where each image was)."""
    return [{"role": m.role,
             "content": [{"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"}
                         for p in m.content]}
            for m in request.messages]


def to_sampling_params(params: GenerationParams) -> "SamplingParams":
    from .engine import SamplingParams

    return SamplingParams(
        max_tokens=params.max_tokens,
        temperature=DEFAULT_TEMPERATURE if params.temperature is None else params.temperature,
        top_p=1.0 if params.top_p is None else params.top_p,
        stop=tuple(params.stop or ()),
        seed=params.seed)


def prepare_request(engine: "Engine", request: ChatRequest, limits: Limits) -> "PreparedRequest":
    """Check *request* against *limits* and the model, and turn it into the engine's input (blocking).

    Raises:
        BadRequestError: too many images.
        InvalidImageError: an image from a forbidden source, too large, or undecodable (names its index).
        ContextLengthExceededError: the prompt plus ``max_tokens`` exceeds the model's context.
    """
    images = load_request_images(request, limits)
    if not any(m.role == "user" for m in request.messages):
        raise BadRequestError("the request needs at least one user message", param="messages")
    return engine.prepare(to_chat_messages(request), images, to_sampling_params(request.params),
                          image_detail=[part.detail for part in request.images])
