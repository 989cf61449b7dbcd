"""Image sources: where an image comes from, and the one function everything else reads images with.

:func:`load_image` asks the ``llava_next_load_image`` hook for a PIL image, then makes it usable:
fully decoded (so truncated files fail here, not deep inside preprocessing), turned upright by its EXIF
orientation, non-empty, and RGB. Every failure is an :class:`~llava_next_plugin.errors.ImageError`
naming the image's index, what was wrong, and what to do.

The built-in sources are this module's hookimpl, registered beneath every other plugin (so a plugin
that handles, say, ``https://`` URLs with credentials replaces ours):

- a path (``str`` or ``os.PathLike``, ``~`` expanded) or a ``file://`` URL;
- an ``http://`` / ``https://`` URL, fetched with httpx (``timeout`` seconds per network read and
  :data:`DEFAULT_TOTAL_TIMEOUT` overall, redirects followed, at most :data:`MAX_DOWNLOAD_BYTES`; an answer
  whose content type says it is no image is refused without reading it);
- a ``data:image/...;base64,...`` URL, or a bare base64 string;
- ``bytes`` / ``bytearray`` / ``memoryview``, or a binary file object;
- a ``PIL.Image.Image``;
- a numpy array (H, W) or (H, W, C) with C in 1, 3, 4: uint8, bool, uint16 (scaled by 1/257) or
  float in [0, 1].

Reading files, bytes, file objects and arrays, and the RGB conversion, are the SDK's
(:mod:`llava_next_sdk.images`): the SDK and this loader accept the same sources and give the same pixels
or the same message; the SDK's :class:`~llava_next_sdk.errors.InvalidImageError` becomes our
:class:`~llava_next_plugin.errors.ImageError` here (same message, index kept).

Pictures decoded from bytes respect PIL's decompression-bomb limit ``PIL.Image.MAX_IMAGE_PIXELS``:
larger ones are refused (raise the limit yourself if you trust the source).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
from llava_next_sdk import images as sdk_images
from llava_next_sdk.errors import InvalidImageError, LlavaNextError
from llava_next_sdk.wire import decode_data_url
from PIL import Image

from llava_next_plugin.hooks import first_answer, get_plugin_manager, hookimpl

from .errors import ImageError, as_model_error

__all__ = [
    "DEFAULT_TIMEOUT",
    "DEFAULT_TOTAL_TIMEOUT",
    "MAX_DOWNLOAD_BYTES",
    "decode_image_bytes",
    "fetch_url",
    "gray_to_uint8",
    "load_image",
    "load_images",
    "to_rgb",
]

DEFAULT_TIMEOUT = 10.0
"""Seconds allowed for each network read when an image is fetched from a URL."""

DEFAULT_TOTAL_TIMEOUT = 60.0
"""Seconds allowed for a whole image download (a server that drips bytes cannot hold a fetch longer)."""

MAX_DOWNLOAD_BYTES = 50 * 2**20
"""The largest image download accepted, in bytes (read when each download starts)."""

_URL_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://")
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/=\s]{64,}")
_T = TypeVar("_T")


def _model_level(call: Callable[..., _T], *args: Any, index: int | None = None, **kwargs: Any) -> _T:
    """``call(*args, index=index, **kwargs)``, one of the SDK's image functions, its
    :class:`~llava_next_sdk.errors.InvalidImageError` turned into our :class:`ImageError` (same message, index kept)."""
    try:
        return call(*args, index=index, **kwargs)
    except InvalidImageError as exc:
        raise as_model_error(exc) from exc


class LoadedImage:
    """An image :func:`load_image` has read already (through the image-source hook): handed to it again, it
    comes back as it is, without a second hook call (the command line reads images before loading a model, then
    gives them to the pipeline)."""

    __slots__ = ("image",)

    def __init__(self, image: Image.Image) -> None:
        self.image = image


def load_image(
    source: Any, index: int | None = None, *, timeout: float = DEFAULT_TIMEOUT, transparency: str = "white"
) -> Image.Image:
    """Read one image from any source a plugin understands.

    :param source: a path, URL, data URL, bytes, PIL image, numpy array, or anything a plugin handles.
    :param index: the image's position in the request, named in error messages.
    :param timeout: seconds allowed for each network read.
    :param transparency: ``"white"``: transparent pixels composited onto white (as vLLM, and transformers'
        processors for PIL images); ``"drop"``: alpha ignored, as transformers' ``load_image`` does for a path
        or URL (see :func:`llava_next_sdk.images.to_rgb`).
    :return: a fully decoded RGB PIL image (the same object when *source* already was one).
    :raises ImageError: when the source is unsupported, missing, unreadable, corrupted,
        truncated, empty, too large, or in a mode that has no RGB meaning.
    """
    if isinstance(source, LoadedImage):
        return source.image
    what = describe_source(source)
    try:
        image = _first_image(source, timeout, what, index)
    except ImageError as exc:
        if exc.index is None and index is not None:
            raise ImageError(exc.message, index=index, param=exc.param) from exc
        raise
    except InvalidImageError as exc:  # the SDK's error, raised by a third-party image source
        raise as_model_error(exc, index=index) from exc
    except LlavaNextError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(sdk_images.bomb_message(what, str(exc)), index=index) from exc
    except (OSError, ValueError, SyntaxError) as exc:  # raised inside a third-party image source
        raise ImageError(f"{what} could not be loaded ({type(exc).__name__}: {exc})", index=index) from exc
    if image is None:
        raise ImageError(_unsupported_message(source, what), index=index)
    if not isinstance(image, Image.Image):
        raise ImageError(
            f"an image-source plugin returned {type(image).__name__} for {what} instead of a PIL image; "
            f"fix that plugin's llava_next_load_image",
            index=index,
        )
    return to_rgb(image, what, index=index, transparency=transparency)


#: Errors an image-source plugin may raise as they are: the image's own fault, or one that says what went wrong
_SAYS_WHAT_WENT_WRONG = (LlavaNextError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _first_image(source: Any, timeout: float, what: str, index: int | None) -> Any:
    """The first image-source plugin's answer that is not ``None`` (pluggy's order: the last registered, ours
    last of all), each plugin called on its own so that one failing in an unexpected way is named."""

    def fault(plugin: str | None, exc: Exception) -> Exception:
        if plugin is None:
            return ImageError(
                f"an image-source plugin failed on {what} ({type(exc).__name__}: {exc}); a hook wrapper is "
                "registered, so its name is not known: fix or unregister the plugin (see the traceback)",
                index=index,
            )
        return ImageError(
            f"the image-source plugin {plugin!r} failed on {what} ({type(exc).__name__}: {exc}): fix or "
            "unregister that plugin",
            index=index,
        )

    hook = get_plugin_manager().hook.llava_next_load_image
    return first_answer(hook, {"source": source, "timeout": timeout}, fault, _SAYS_WHAT_WENT_WRONG)


def load_images(sources: Sequence[Any], *, timeout: float = DEFAULT_TIMEOUT) -> list[Image.Image]:
    """:func:`load_image` for each of *sources* (a list or tuple), errors naming the failing index."""
    if not isinstance(sources, (list, tuple)):
        raise ImageError(f"expected a list of images, got {type(sources).__name__}; wrap a single image as [image]")
    return [load_image(source, index, timeout=timeout) for index, source in enumerate(sources)]


def describe_source(source: Any) -> str:
    """A short description of an image source for error messages (the SDK's, so both name it alike)."""
    return sdk_images.describe_source(source)


def _unsupported_message(source: Any, what: str) -> str:
    plugin_hint = "or register a plugin implementing llava_next_load_image for it (see docs/writing-a-plugin.md)"
    if isinstance(source, str) and (match := _URL_SCHEME.match(source.strip())):
        return (
            f"no image source handles the URL scheme '{match.group(1)}://' ({what}); use a path, an "
            f"http(s) or data URL, or bytes, {plugin_hint}"
        )
    return f"{sdk_images.unsupported_source_message(source)}, {plugin_hint}"


# --- the built-in image sources ------------------------------------------------------------------


@hookimpl
def llava_next_load_image(source: Any, timeout: float) -> Image.Image | None:
    """Our built-in sources (see the module docstring); None for anything else."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image_bytes(bytes(source), describe_source(source))
    if isinstance(source, np.ndarray):
        image: Image.Image = _model_level(sdk_images.array_to_image, source)
        return image
    if isinstance(source, os.PathLike):
        return _load_path(source)
    if isinstance(source, str):
        return _load_string(source.strip(), timeout)
    if callable(getattr(source, "read", None)):  # a binary file object
        return decode_image_bytes(_model_level(sdk_images.read_file_object, source), describe_source(source))
    return None


def _load_string(text: str, timeout: float) -> Image.Image | None:
    scheme_match = _URL_SCHEME.match(text)
    scheme = scheme_match.group(1).lower() if scheme_match else ""
    if scheme in ("http", "https"):
        return decode_image_bytes(fetch_url(text, timeout=timeout), describe_source(text))
    if text.startswith("data:"):
        return _decode_data_url(text)
    if scheme == "file":
        return _load_path(urllib.request.url2pathname(urllib.parse.urlparse(text).path))
    if scheme:
        return None  # s3://, gs://...: left to plugins
    if not os.path.exists(os.path.expanduser(text)) and _BASE64_TEXT.fullmatch(text):
        try:
            data = base64.b64decode("".join(text.split()), validate=True)
        except binascii.Error:
            pass
        else:
            return decode_image_bytes(data, f"base64 text ({len(text)} characters)")
    return _load_path(text)


def _load_path(path: str | os.PathLike[str]) -> Image.Image:
    data = _model_level(sdk_images.read_image_file, path)
    return decode_image_bytes(data, describe_source(os.path.expanduser(os.fspath(path))))


def fetch_url(
    url: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int | None = None,
    follow_redirects: bool = True,
    total_timeout: float | None = DEFAULT_TOTAL_TIMEOUT,
) -> bytes:
    """GET an image URL's bytes with httpx, bounded in size and time (the one image fetcher).

    :param timeout: seconds allowed for each network read.
    :param max_bytes: the largest body accepted (checked against ``Content-Length``, then while reading);
        None: :data:`MAX_DOWNLOAD_BYTES`.
    :param follow_redirects: False for the server, where a redirect could lead to a host it does not allow.
    :param total_timeout: seconds for the whole download (None: no overall bound): at that deadline the
        connection is shut down, however slowly its headers or body still arrive.
    :raises ImageError: any answer but HTTP 200, a content type that is no image, too large, too
        slow, or a network error. Nothing of the answer's body is ever quoted back.
    """
    import httpx  # only when a URL is actually fetched

    default_limit = max_bytes is None
    limit = MAX_DOWNLOAD_BYTES if max_bytes is None else max_bytes
    too_large = f"URL {url!r} serves more than {limit:,} bytes, the download limit; use a smaller image" + (
        " or raise the limit (llava_next_plugin.images.MAX_DOWNLOAD_BYTES)" if default_limit else ""
    )
    read_timeout = timeout if total_timeout is None else min(timeout, total_timeout)
    deadline = None if total_timeout is None else time.monotonic() + total_timeout
    too_slow = f"URL {url!r} did not deliver the image within {total_timeout or 0:g} s overall; check the URL"
    chunks: list[bytes] = []
    connections: list[Any] = []  # httpcore's network streams, reported by its trace once connected
    past_deadline = threading.Event()

    def shut_down() -> None:  # wakes a read blocked on a host that drips bytes, so nothing outlasts the deadline
        past_deadline.set()
        for stream in list(connections):
            sock = stream.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def trace(event: str, info: dict) -> None:
        if hasattr(info.get("return_value"), "get_extra_info"):
            connections.append(info["return_value"])
            if past_deadline.is_set():
                shut_down()

    watchdog = None if total_timeout is None else threading.Timer(total_timeout, shut_down)
    if watchdog is not None:
        watchdog.daemon = True
        watchdog.start()
    try:
        with httpx.Client(timeout=read_timeout, follow_redirects=follow_redirects) as client:
            # the file as it is: a compressed answer is decoded a whole read at a time, before its size is known
            headers = {"Accept": "image/*", "Accept-Encoding": "identity"}
            with client.stream("GET", url, headers=headers, extensions={"trace": trace}) as response:
                if response.status_code != 200:
                    hint = (
                        "redirects are not followed: give the final URL"
                        if response.is_redirect and not follow_redirects
                        else "check the URL"
                    )
                    raise ImageError(
                        f"URL {url!r} answered HTTP {response.status_code} {response.reason_phrase}; {hint}"
                    )
                content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
                if content_type and not _may_be_an_image(content_type):
                    raise ImageError(
                        f"URL {url!r} is not an image (content-type {content_type}); "
                        "give the URL of a PNG, JPEG, WebP, GIF, BMP or TIFF file"
                    )
                encoding = response.headers.get("content-encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise ImageError(
                        f"URL {url!r} answered with Content-Encoding {encoding[:40]!r} though asked for none; "
                        "serve the image file as it is"
                    )
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise ImageError(too_large)
                size = 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > limit:
                        raise ImageError(too_large)
                    if deadline is not None and time.monotonic() > deadline:
                        raise ImageError(too_slow)
                    chunks.append(chunk)
    except httpx.InvalidURL as exc:  # not an HTTPError: a URL httpx cannot send (a control character, ...)
        raise ImageError(f"URL {url!r} is malformed ({exc}); check the URL") from exc
    except httpx.HTTPError as exc:
        if past_deadline.is_set():
            raise ImageError(too_slow) from exc
        if isinstance(exc, httpx.TimeoutException):
            raise ImageError(
                f"URL {url!r} did not answer within {read_timeout:g} s ({type(exc).__name__}); "
                "check the URL or allow more time (timeout=; --url-timeout on the command line)"
            ) from exc
        raise ImageError(
            f"URL {url!r} could not be fetched ({type(exc).__name__}: {exc}); check the URL and the network"
        ) from exc
    except BaseException:
        chunks.clear()  # an error's traceback holds this frame: not the bytes read so far too
        raise
    finally:
        if watchdog is not None:
            watchdog.cancel()
    if deadline is not None and time.monotonic() > deadline:
        raise ImageError(too_slow)
    return b"".join(chunks)


def _may_be_an_image(content_type: str) -> bool:
    """Whether a response's media type allows image bytes (``image/*`` or a generic binary type)."""
    return content_type.startswith("image/") or content_type in (
        "application/octet-stream",
        "binary/octet-stream",
        "application/binary",
        "application/x-binary",
    )


def _decode_data_url(url: str) -> Image.Image:
    media_type, data = _model_level(decode_data_url, url)  # the SDK's wire-level check, shared with the server
    return decode_image_bytes(data, f"data URL ({media_type}, {len(data)} bytes)")


# --- decoding and making an image usable ---------------------------------------------------------


def decode_image_bytes(data: bytes, what: str = "the bytes") -> Image.Image:
    """Decode encoded image bytes (PNG, JPEG, WebP, ...) fully, refusing decompression bombs
    (:func:`llava_next_sdk.images.decode_image_bytes`).

    :param what: how to name the image in error messages (``"file 'cat.png'"``).
    :raises ImageError: for empty, unrecognised, corrupted, truncated or too large images.
    """
    image: Image.Image = _model_level(sdk_images.decode_image_bytes, data, what)
    return image


def to_rgb(
    image: Image.Image, what: str = "the image", *, index: int | None = None, transparency: str = "white"
) -> Image.Image:
    """A fully decoded, upright, non-empty RGB version of *image* (the same object if it already is).

    Turned upright by its EXIF orientation (:func:`llava_next_sdk.images.upright`), then converted by the
    one RGB conversion, :func:`llava_next_sdk.images.to_rgb`: transparency composited onto white, 16-bit
    and 32-bit grey scaled to 8 bits (:func:`gray_to_uint8`), other modes by PIL's colour conversion.

    :param what: how to name the image in error messages.
    :param index: the image's position in the request, named in the error.
    :param transparency: ``"white"`` or ``"drop"`` (see :func:`load_image`).
    :raises ImageError: when the image cannot be decoded, is empty, or its mode has no RGB meaning.
    """
    _model_level(sdk_images.load_pixels, image, what, index=index)
    try:
        image = sdk_images.upright(image)
    except (OSError, ValueError, SyntaxError) as exc:  # a corrupt EXIF block
        raise ImageError(f"{what} has unreadable EXIF data ({exc}); re-export the image", index=index) from exc
    rgb: Image.Image = _model_level(sdk_images.to_rgb, image, what, index=index, transparency=transparency)
    return rgb


def gray_to_uint8(values: np.ndarray, mode: str, index: int | None = None) -> np.ndarray:
    """16-bit / 32-bit integer and float grey pixels ``[H, W]`` as 8-bit grey ``[H, W]`` uint8, by the SDK's
    :func:`llava_next_sdk.images.gray_to_uint8` (see there for the scales).

    :raises ImageError: for values with no 8-bit meaning (negative, beyond 16 bits).
    """
    grey: np.ndarray = _model_level(sdk_images.gray_to_uint8, values, mode, index=index)
    return grey
