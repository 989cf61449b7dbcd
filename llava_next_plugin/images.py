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

Pictures decoded from bytes respect PIL's decompression-bomb limit ``PIL.Image.MAX_IMAGE_PIXELS``:
larger ones are refused (raise the limit yourself if you trust the source).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import time
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from llava_next_sdk.errors import InvalidImageError, LlavaNextError
from llava_next_sdk.wire import decode_data_url
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from llava_next_plugin.hooks import get_plugin_manager, hookimpl

from .errors import ImageError

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
_EXIF_ORIENTATION = 0x0112


def load_image(source: Any, index: int | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> Image.Image:
    """Read one image from any source a plugin understands.

    :param source: a path, URL, data URL, bytes, PIL image, numpy array, or anything a plugin handles.
    :param index: the image's position in the request, named in error messages.
    :param timeout: seconds allowed for each network read.
    :return: a fully decoded RGB PIL image (the same object when *source* already was one).
    :raises ImageError: when the source is unsupported, missing, unreadable, corrupted,
        truncated, empty, too large, or in a mode that has no RGB meaning.
    """
    what = describe_source(source)
    try:
        image = get_plugin_manager().hook.llava_next_load_image(source=source, timeout=timeout)
    except ImageError as exc:
        if exc.index is None and index is not None:
            raise ImageError(exc.message, index=index, param=exc.param) from exc
        raise
    except InvalidImageError as exc:  # the SDK's error, raised by a third-party image source
        raise ImageError(exc.message, index=index if exc.index is None else exc.index) from exc
    except LlavaNextError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(_bomb_message(what, str(exc)), index=index) from exc
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
    try:
        return to_rgb(image, what)
    except ImageError as exc:
        raise ImageError(exc.message, index=index) from exc


def load_images(sources: Sequence[Any], *, timeout: float = DEFAULT_TIMEOUT) -> list[Image.Image]:
    """:func:`load_image` for each of *sources* (a list or tuple), errors naming the failing index."""
    if not isinstance(sources, (list, tuple)):
        raise ImageError(f"expected a list of images, got {type(sources).__name__}; wrap a single image as [image]")
    return [load_image(source, index, timeout=timeout) for index, source in enumerate(sources)]


def describe_source(source: Any) -> str:
    """A short description of an image source for error messages."""
    if isinstance(source, str):
        text = source if len(source) <= 100 else source[:60] + "..." + source[-20:]
        if source.startswith("data:"):
            return f"data URL {text[:40]!r}... ({len(source)} characters)"
        return f"URL {text!r}" if _URL_SCHEME.match(source) else f"file {text!r}"
    if isinstance(source, os.PathLike):
        return f"file '{os.fspath(source)}'"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"bytes ({len(source)} bytes)"
    if isinstance(source, np.ndarray):
        return f"array of shape {tuple(source.shape)} and dtype {source.dtype}"
    if isinstance(source, Image.Image):
        return f"PIL image ({source.mode}, {source.width}x{source.height})"
    return f"a {type(source).__module__}.{type(source).__qualname__}"


def _unsupported_message(source: Any, what: str) -> str:
    plugin_hint = "or register a plugin implementing llava_next_load_image for it (see docs/writing-a-plugin.md)"
    if isinstance(source, str) and (match := _URL_SCHEME.match(source.strip())):
        return (
            f"no image source handles the URL scheme '{match.group(1)}://' ({what}); use a path, an "
            f"http(s) or data URL, or bytes, {plugin_hint}"
        )
    hint = ""
    if hasattr(source, "numpy") and hasattr(source, "permute"):
        hint = " (for a torch tensor (C, H, W), pass tensor.permute(1, 2, 0).cpu().numpy())"
    return (
        f"unsupported image source: {what}{hint}; pass a path, an http(s) URL, a data URL, bytes, "
        f"a PIL image or a numpy array (H, W) / (H, W, C), {plugin_hint}"
    )


# --- the built-in image sources ------------------------------------------------------------------


@hookimpl
def llava_next_load_image(source: Any, timeout: float) -> Image.Image | None:
    """Our built-in sources (see the module docstring); None for anything else."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image_bytes(bytes(source), describe_source(source))
    if isinstance(source, np.ndarray):
        return _image_from_array(source)
    if isinstance(source, os.PathLike):
        return _load_path(source)
    if isinstance(source, str):
        return _load_string(source.strip(), timeout)
    if callable(getattr(source, "read", None)):  # a binary file object
        data = source.read()
        if isinstance(data, (bytes, bytearray)):
            return decode_image_bytes(bytes(data), f"file object {getattr(source, 'name', '')!s}".rstrip())
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


def _load_path(path: str | os.PathLike) -> Image.Image:
    file = Path(os.path.expanduser(os.fspath(path)))
    if not file.exists():
        where = "" if file.is_absolute() else f" (relative to the working directory {os.getcwd()})"
        raise ImageError(f"file not found: '{file}'{where}; check the path")
    if file.is_dir():
        raise ImageError(f"'{file}' is a folder, not an image file; pass the path of an image inside it")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ImageError(
            f"file '{file}' could not be read ({type(exc).__name__}: {exc}); check its permissions"
        ) from exc
    return decode_image_bytes(data, f"file '{file}'")


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
    :param total_timeout: seconds for the whole download (None: no overall bound). Checked as bytes arrive,
        so the fetch ends at most one read timeout after it.
    :raises ImageError: any answer but HTTP 200, a content type that is no image, too large, too
        slow, or a network error. Nothing of the answer's body is ever quoted back.
    """
    import httpx  # only when a URL is actually fetched

    default_limit = max_bytes is None
    max_bytes = MAX_DOWNLOAD_BYTES if default_limit else max_bytes
    too_large = f"URL {url!r} serves more than {max_bytes:,} bytes, the download limit; use a smaller image" + (
        " or raise the limit (llava_next_plugin.images.MAX_DOWNLOAD_BYTES)" if default_limit else ""
    )
    read_timeout = timeout if total_timeout is None else min(timeout, total_timeout)
    deadline = None if total_timeout is None else time.monotonic() + total_timeout
    too_slow = f"URL {url!r} did not deliver the image within {total_timeout:g} s overall; check the URL"
    chunks: list[bytes] = []
    try:
        with httpx.Client(timeout=read_timeout, follow_redirects=follow_redirects) as client:
            with client.stream("GET", url, headers={"Accept": "image/*"}) as response:
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
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise ImageError(too_large)
                size = 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise ImageError(too_large)
                    if deadline is not None and time.monotonic() > deadline:
                        raise ImageError(too_slow)
                    chunks.append(chunk)
    except httpx.TimeoutException as exc:
        raise ImageError(
            f"URL {url!r} did not answer within {read_timeout:g} s ({type(exc).__name__}); "
            f"check the URL or pass a larger timeout"
        ) from exc
    except httpx.HTTPError as exc:
        raise ImageError(
            f"URL {url!r} could not be fetched ({type(exc).__name__}: {exc}); check the URL and the network"
        ) from exc
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
    try:
        media_type, data = decode_data_url(url)
    except InvalidImageError as exc:  # the SDK's wire-level check, shared with the server
        raise ImageError(exc.message) from exc
    return decode_image_bytes(data, f"data URL ({media_type}, {len(data)} bytes)")


def _image_from_array(array: np.ndarray) -> Image.Image:
    what = describe_source(array)
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        raise ImageError(f"{what} looks channels-first (C, H, W); pass array.transpose(1, 2, 0)")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3, 4))):
        raise ImageError(f"{what} is not an image; expected (H, W) or (H, W, C) with C in 1, 3, 4")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"{what} is empty; an image needs at least 1x1 pixels")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = np.round(array / 257.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError(f"{what} contains NaN or infinite values")
        if array.min() < 0 or array.max() > 1:
            raise ImageError(
                f"{what} has values in [{array.min():g}, {array.max():g}]; float images "
                f"must lie in [0, 1] (or pass uint8 values 0-255)"
            )
        array = np.round(array * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ImageError(f"{what}: unsupported dtype; use uint8 (0-255), uint16, bool or float in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(array))


# --- decoding and making an image usable ---------------------------------------------------------


def decode_image_bytes(data: bytes, what: str = "the bytes") -> Image.Image:
    """Decode encoded image bytes (PNG, JPEG, WebP, ...) fully, refusing decompression bombs.

    :param what: how to name the image in error messages (``"file 'cat.png'"``).
    :raises ImageError: for empty, unrecognised, corrupted, truncated or too large images.
    """
    if not data:
        raise ImageError(f"{what} is empty (0 bytes); pass the image file's content")
    try:
        with warnings.catch_warnings():
            # PIL warns between MAX_IMAGE_PIXELS and twice that; we refuse instead (below).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError(_bomb_message(what, str(exc))) from exc
    except UnidentifiedImageError as exc:  # its bytes are never quoted back: they may be another service's answer
        raise ImageError(
            f"{what} is not an image PIL can read (unknown format or corrupted header, "
            f"{len(data)} bytes); pass a PNG, JPEG, WebP, GIF, BMP or TIFF file"
        ) from exc
    except Exception as exc:
        raise ImageError(
            f"{what} is corrupted ({type(exc).__name__}: {exc}); re-export or re-download the image"
        ) from exc
    _load_pixels(image, what)
    return image


def _load_pixels(image: Image.Image, what: str) -> None:
    """Decode a lazily opened image now, so truncation and bombs are caught here."""
    if not (isinstance(image, ImageFile.ImageFile) and image.tile):
        return  # already decoded
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.width * image.height > limit:
        raise ImageError(
            _bomb_message(
                what, f"{image.width}x{image.height} = {image.width * image.height:,} pixels, limit {limit:,}"
            )
        )
    try:
        image.load()
    except Exception as exc:  # PIL's decoders raise OSError, SyntaxError, ValueError, zlib.error...
        raise ImageError(
            f"{what} is truncated or corrupted ({type(exc).__name__}: {exc}); re-export or re-download the image"
        ) from exc


def _bomb_message(what: str, detail: str) -> str:
    return (
        f"{what} is too large ({detail}): PIL.Image.MAX_IMAGE_PIXELS guards against decompression "
        f"bombs; use a smaller image, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust this one"
    )


def to_rgb(image: Image.Image, what: str = "the image") -> Image.Image:
    """A fully decoded, upright, non-empty RGB version of *image* (the same object if it already is).

    Transparency (RGBA, LA, PA, P with a transparent colour) is composited onto white, as transformers'
    processors do; 16-bit and 32-bit grayscale (I;16, I, F) is scaled to 8 bits rather than clipped
    (:func:`gray_to_uint8`);
    CMYK, YCbCr, LAB, HSV, P, L and 1 convert with PIL's colour conversion.
    """
    _load_pixels(image, what)
    if image.width == 0 or image.height == 0:
        raise ImageError(f"{what} is empty ({image.width}x{image.height}); an image needs at least 1x1 pixels")
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        return _high_depth_gray_to_rgb(image)
    try:
        if image.has_transparency_data:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageError(
            f"{what} has mode {image.mode}, which PIL cannot convert to RGB ({exc}); convert it to RGB yourself first"
        ) from exc


def _high_depth_gray_to_rgb(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale as 8-bit RGB, by :func:`gray_to_uint8`."""
    return Image.fromarray(gray_to_uint8(np.asarray(image), image.mode)).convert("RGB")


def gray_to_uint8(values: np.ndarray, mode: str, index: int | None = None) -> np.ndarray:
    """16-bit / 32-bit integer and float grey pixels ``[H, W]`` as 8-bit grey ``[H, W]`` uint8.

    The one conversion every route uses (:func:`to_rgb` and the image processors), so a grey image
    gives the same pixels whether it is loaded first or given to the processor directly. PIL's own
    ``convert("RGB")`` clips such images at 255, which turns most 16-bit images white. Here the scale
    is the type's range: ``I;16*`` images (and ``I`` images with values up to 65535) by 255/65535;
    ``I`` images that already fit 0..255 are kept; ``F`` images in [0, 1] by 255, in [0, 255] kept.
    Anything else (negative values, beyond 16 bits) has no 8-bit meaning and is refused.
    """
    values = np.asarray(values)
    if values.size == 0:
        return values.astype(np.uint8)
    low, high = float(values.min()), float(values.max())
    if mode == "F":
        if low >= 0 and high <= 1:
            return np.round(values.astype(np.float64) * 255).astype(np.uint8)
        if low >= 0 and high <= 255:
            return np.round(values).astype(np.uint8)
    elif low >= 0 and (mode.startswith("I;16") or high > 255) and high <= 65535:
        return np.round(values.astype(np.float64) * (255 / 65535)).astype(np.uint8)
    elif low >= 0 and high <= 255:
        return values.astype(np.uint8)
    raise ImageError(
        f"the {mode!r} image holds values from {low:g} to {high:g}, which map to no 8-bit range: "
        "convert it to an 8-bit RGB image first",
        index=index,
    )
