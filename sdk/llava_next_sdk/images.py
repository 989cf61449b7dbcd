"""Turn what a user calls an image into an :class:`~llava_next_sdk.types.ImagePart`, off the event loop.

Accepted sources, and what they become:

- ``http(s)://`` URL            -> ``ImagePart(url=...)``, passed through (the model side fetches it);
- ``data:image/...;base64,`` URL -> ``ImagePart(url=...)`` after its header and payload are checked;
- a path (``str``, ``os.PathLike``, ``file://`` URL) -> ``ImagePart(data=<file bytes>)``;
- ``bytes`` / ``bytearray`` / ``memoryview`` of an image file, or a binary file object (anything with
  ``read()``, e.g. ``open(path, "rb")`` or ``io.BytesIO``; read from its current position) -> ``ImagePart(data=...)``;
- a ``PIL.Image.Image``         -> ``ImagePart(image=...)``: kept decoded (see below);
- a numpy array ``[H, W]``, ``[H, W, 1|3|4]`` (uint8, bool, or floats in [0, 1]) -> ``ImagePart(image=...)``.

Decoded images stay decoded: the in-process transport hands them to the processor as they are, and the
HTTP transport encodes them once, losslessly (:func:`encode_for_wire`, off the event loop). So that both
see the same pixels, a decoded image is prepared here the way PNG would store it: fully loaded, turned
upright by its EXIF orientation, and converted to RGB when its mode is one PNG cannot hold (CMYK, I, F...).

Files and bytes are checked to be decodable images here, so a bad image fails the same way (an
:class:`~llava_next_sdk.errors.InvalidImageError` naming its index) before any transport is involved.
File reads, decoding and encoding run in a worker thread (``anyio.to_thread``), never on the loop.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import anyio

from .errors import InvalidImageError
from .types import ChatMessage, ChatRequest, ImagePart
from .wire import decode_data_url

__all__ = ["to_image_part", "to_image_parts", "as_image_list", "encode_png", "encode_for_wire", "encoded_for_wire"]

_MEDIA_TYPES = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}
_SOURCES = "a PIL image, a path, bytes, a binary file object, a numpy array, an http(s) URL or a data URL"
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _is_numpy_array(source: Any) -> bool:
    return type(source).__module__ == "numpy" and type(source).__name__ == "ndarray"


def _is_pil_image(source: Any) -> bool:
    return any(c.__module__.startswith("PIL.") and c.__name__ == "Image" for c in type(source).__mro__)


def as_image_list(images: Any) -> list:
    """A user's ``images`` argument as a list: ``None`` -> ``[]``, a list/tuple as is, anything else
    (one image, a numpy array included) -> ``[images]``."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _check_image_bytes(data: bytes, index: int | None, what: str) -> str:
    """Verify *data* decodes as an image; return its media type."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.verify()
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(f"{what} is too large to decode safely ({exc})", index=index) from None
    except UnidentifiedImageError:  # its message names PIL's internal buffer, not anything the caller passed
        raise InvalidImageError(
            f"{what} is not a readable image (unknown format or corrupt header); pass PNG, "
            "JPEG, WebP, GIF, BMP or TIFF data",
            index=index,
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        detail = _OBJECT_REPR.sub("the data", str(exc)) or type(exc).__name__
        raise InvalidImageError(
            f"{what} is not a readable image ({detail}); pass PNG, JPEG, WebP, GIF, BMP or TIFF data", index=index
        ) from None
    return _MEDIA_TYPES.get(fmt or "", f"image/{(fmt or 'png').lower()}")


PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16"})
"""PIL modes PNG stores losslessly; a decoded image in another mode is converted to RGB first."""
PNG_OPTIONS = {"compress_level": 1, "compress_type": 3}
"""How :func:`encode_png` encodes: zlib level 1 with the run-length strategy (``Z_RLE``). For a 1024x768
photo this measured faster and smaller than level 1's default strategy, and several times faster than
the default level 6 (``benchmarks/image_handoff.py``); any PNG decoder reads it."""
_EXIF_ORIENTATION = 0x0112


def _prepared(image: Any, index: int | None) -> Any:
    """*image* as an :class:`ImagePart` holds it: loaded, upright, in a mode PNG keeps (see the module doc)."""
    from PIL import Image, ImageOps

    try:
        image.load()
        if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(image)
        if image.mode not in PNG_MODES:
            image = image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(f"the PIL image is too large to decode safely ({exc})", index=index) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidImageError(f"the PIL image could not be read ({exc})", index=index) from None
    if image.width == 0 or image.height == 0:
        raise InvalidImageError(f"the PIL image is empty ({image.width}x{image.height})", index=index)
    return image


def encode_png(image: Any) -> bytes:
    """The PNG file of a decoded image (as :func:`to_image_part` prepared it), losslessly and fast."""
    if image.mode not in PNG_MODES:  # an ImagePart(image=...) built by hand, not prepared
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", **PNG_OPTIONS)
    return buf.getvalue()


def _array_image(array: Any, index: int | None) -> Any:
    """A numpy image ``[H, W]`` or ``[H, W, 1|3|4]`` as a PIL image (its pixels copied, not encoded)."""
    import numpy as np
    from PIL import Image

    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise InvalidImageError(
            f"a numpy image must be [H, W] or [H, W, 1|3|4] (channels last), got shape {tuple(array.shape)}",
            index=index,
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidImageError(f"the numpy image is empty (shape {tuple(array.shape)})", index=index)
    if array.dtype == np.uint8:
        pixels = array
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise InvalidImageError(
                "a float numpy image must hold finite values in [0, 1]; scale it or pass uint8", index=index
            )
        pixels = np.round(array * 255).astype(np.uint8)
    elif array.dtype == np.bool_:
        pixels = array.astype(np.uint8) * 255
    else:
        raise InvalidImageError(f"a numpy image must be uint8 or float in [0, 1], got dtype {array.dtype}", index=index)
    return Image.fromarray(np.array(pixels, copy=True, order="C"))  # the user may reuse their array


def _read_path(path: Path, index: int | None) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InvalidImageError(f"no such image file: {str(path)!r}", index=index) from None
    except IsADirectoryError:
        raise InvalidImageError(f"{str(path)!r} is a directory, not an image file", index=index) from None
    except OSError as exc:
        raise InvalidImageError(f"cannot read image file {str(path)!r}: {exc.strerror or exc}", index=index) from None


def _argument(index: int | None) -> str:
    return "the image" if index is None else f"images[{index}]"


def _file_object_name(source: Any, index: int | None) -> str:
    """How an error names a file object: the argument, and the file's name when it has one (never its repr)."""
    name = getattr(source, "name", None)
    kind = type(source).__name__
    return f"{_argument(index)} (a {kind}" + (
        f" of {os.fspath(name)!r})" if isinstance(name, (str, os.PathLike)) else ")"
    )


def _read_file_object(source: Any, index: int | None) -> ImagePart:
    what = _file_object_name(source, index)
    try:
        data = source.read()
    except (OSError, ValueError) as exc:  # closed, not readable, not seekable...
        raise InvalidImageError(
            f"{what} could not be read ({type(exc).__name__}: "
            f"{_OBJECT_REPR.sub('the file', str(exc))}); pass a readable file opened in "
            "binary mode ('rb')",
            index=index,
        ) from None
    if isinstance(data, str):
        raise InvalidImageError(f"{what} is open in text mode; open the image with open(path, 'rb')", index=index)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidImageError(
            f"{what}: read() returned {type(data).__name__}, not bytes; pass a binary file object", index=index
        )
    data = bytes(data)
    if not data:
        raise InvalidImageError(f"{what} is empty (read() returned no bytes; is it at its end?)", index=index)
    return ImagePart(data=data, media_type=_check_image_bytes(data, index, what))


def _encode_sync(source: Any, index: int | None) -> ImagePart:
    """The blocking part of :func:`to_image_part` (runs in a worker thread)."""
    if isinstance(source, ImagePart):
        return source
    if isinstance(source, str):
        lowered = source[:8].lower()
        if lowered.startswith(("http://", "https://")):
            return ImagePart(url=source)
        if lowered.startswith("data:"):
            _, data = decode_data_url(source, index=index)
            _check_image_bytes(data, index, "the data URL")
            return ImagePart(url=source)
        if lowered.startswith("file://"):
            source = unquote(urlparse(source).path)
        elif "://" in source[:16]:
            raise InvalidImageError(
                f"unsupported image URL scheme in {source[:40]!r}; use http(s)://, data: or a file path", index=index
            )
        source = Path(source).expanduser()
    if isinstance(source, os.PathLike):
        data = _read_path(Path(source), index)
        return ImagePart(data=data, media_type=_check_image_bytes(data, index, f"file {os.fspath(source)!r}"))
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise InvalidImageError("the image bytes are empty", index=index)
        return ImagePart(data=data, media_type=_check_image_bytes(data, index, "the bytes"))
    if _is_pil_image(source):
        return ImagePart(image=_prepared(source, index))
    if _is_numpy_array(source):
        return ImagePart(image=_array_image(source, index))
    if callable(getattr(source, "read", None)):
        return _read_file_object(source, index)
    raise InvalidImageError(f"unsupported image type {type(source).__name__}; pass {_SOURCES}", index=index)


async def to_image_part(source: Any, *, index: int | None = None) -> ImagePart:
    """Encode one image *source* (see the module doc) in a worker thread."""
    if isinstance(source, ImagePart) or (
        isinstance(source, str) and source[:8].lower().startswith(("http://", "https://"))
    ):
        return _encode_sync(source, index)
    return await anyio.to_thread.run_sync(_encode_sync, source, index)


async def to_image_parts(sources: Sequence[Any], *, start: int = 0) -> list[ImagePart]:
    """Encode several sources (in one worker-thread hop); errors name the image's index from *start*."""
    if all(isinstance(s, ImagePart) for s in sources):
        return list(sources)

    def encode_all() -> list[ImagePart]:
        return [_encode_sync(s, start + i) for i, s in enumerate(sources)]

    return await anyio.to_thread.run_sync(encode_all)


def encode_for_wire(request: ChatRequest) -> ChatRequest:
    """*request* with every decoded image encoded once, as a PNG data URL (blocking: see :func:`encoded_for_wire`).

    Returns *request* itself when it holds no decoded image.
    """
    if not any(part.image is not None for part in request.images):
        return request

    def encoded(part: Any) -> Any:
        if isinstance(part, ImagePart) and part.image is not None:
            return ImagePart(url=part.as_url(), detail=part.detail)
        return part

    messages = tuple(ChatMessage(m.role, tuple(encoded(p) for p in m.content)) for m in request.messages)
    return dataclasses.replace(request, messages=messages)


async def encoded_for_wire(request: ChatRequest) -> ChatRequest:
    """:func:`encode_for_wire` in a worker thread when there is something to encode (transports sending a
    request elsewhere call this first)."""
    if not any(part.image is not None for part in request.images):
        return request
    return await anyio.to_thread.run_sync(encode_for_wire, request)
