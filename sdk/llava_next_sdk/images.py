"""Turn what a user calls an image into an :class:`~llava_next_sdk.types.ImagePart`, off the event loop;
and the one normaliser of image sources that llava-next-plugin's image loader uses too.

Accepted sources, and what they become:

- ``http(s)://`` URL            -> ``ImagePart(url=...)``, passed through (the model side fetches it);
- ``data:image/...;base64,`` URL -> ``ImagePart(url=...)`` after its header and payload are checked;
- a path (``str``, ``os.PathLike``, ``file://`` URL) -> ``ImagePart(data=<file bytes>)``;
- ``bytes`` / ``bytearray`` / ``memoryview`` of an image file, or a binary file object (anything with
  ``read()``, e.g. ``open(path, "rb")`` or ``io.BytesIO``; read from its current position) -> ``ImagePart(data=...)``;
- a ``PIL.Image.Image``         -> ``ImagePart(image=...)``: kept decoded (see below);
- a numpy array ``(H, W)`` or ``(H, W, 1|3|4)``: uint8, bool, uint16 (scaled by 1/257) or float in [0, 1]
  (:func:`array_to_image`) -> ``ImagePart(image=...)``.

Decoded images stay decoded: the in-process transport hands them to the processor as they are, and the
HTTP transport encodes them once, losslessly (:func:`encode_for_wire`, off the event loop). Both refuse one
whose PNG would be over :data:`MAX_IMAGE_BYTES` (a server's limit per image) by the same check,
:func:`check_png_size`, so a decoded image a server would refuse is refused in-process too. So that both
see the same pixels, a decoded image is prepared here the way PNG would store it (:func:`prepare_image`):
fully loaded, turned upright by its EXIF orientation, and converted by :func:`to_rgb` when its mode is one
PNG cannot hold (CMYK, I, F...).

Files and bytes are checked to be decodable images here, so a bad image fails the same way (an
:class:`~llava_next_sdk.errors.InvalidImageError` naming its index) before any transport is involved.
File reads, decoding and encoding run in a worker thread (``anyio.to_thread``), never on the loop.

The functions that read files, bytes, arrays and PIL images (:func:`read_image_file`,
:func:`read_file_object`, :func:`decode_image_bytes`, :func:`array_to_image`, :func:`upright`,
:func:`to_rgb`, :func:`gray_to_uint8`) are shared with llava-next-plugin's ``load_image`` and image
processors, so a source gives the same pixels, or the same error, on both sides. numpy is imported only
for numpy arrays and high-bit-depth grey images (the SDK does not depend on it).
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
import re
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import anyio

from .errors import InvalidImageError
from .types import ChatMessage, ChatRequest, ImagePart
from .wire import decode_data_url

__all__ = [
    "MAX_IMAGE_BYTES",
    "PNG_MODES",
    "array_to_image",
    "as_image_list",
    "bomb_message",
    "check_image_bytes",
    "check_png_size",
    "decode_image_bytes",
    "describe_source",
    "encode_for_wire",
    "encode_png",
    "encode_png_within",
    "encoded_for_wire",
    "gray_to_uint8",
    "load_pixels",
    "png_size_bound",
    "prepare_image",
    "read_file_object",
    "read_image_file",
    "to_image_part",
    "to_image_parts",
    "to_rgb",
    "unsupported_source_message",
    "upright",
]

_MEDIA_TYPES = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",  # a phone's multi-picture JPEG (Ultra HDR, gain maps): a JPEG file that PIL names MPO
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}
_SOURCES = (
    "a path, an http(s) URL, a data URL, bytes, a binary file object, a PIL image or a numpy array (H, W) / (H, W, C)"
)
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")
_URL_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://")
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/]{100,}={0,2}")
_EXIF_ORIENTATION = 0x0112


def _is_numpy_array(source: Any) -> bool:
    return type(source).__module__ == "numpy" and type(source).__name__ == "ndarray"


def _is_pil_image(source: Any) -> bool:
    return any(c.__module__.startswith("PIL.") and c.__name__ == "Image" for c in type(source).__mro__)


def as_image_list(images: Any) -> list[Any]:
    """A user's ``images`` argument as a list: ``None`` -> ``[]``, a list/tuple as is, anything else
    (one image, a numpy array included) -> ``[images]``."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


# --- the one normaliser of image sources (llava-next-plugin's image loader uses it too) -------------------


def _shortened(text: str, limit: int) -> str:
    """*text* as it is up to *limit* characters, else its first 60 and last 20 around an ellipsis."""
    return text if len(text) <= limit else text[:60] + "..." + text[-20:]


def describe_source(source: Any) -> str:
    """How error messages name an image source: its kind and what identifies it, never an object's repr."""
    if isinstance(source, str):
        text = _shortened(source, 100)
        if source.startswith("data:"):
            return f"data URL {text[:40]!r}... ({len(source)} characters)"
        return f"URL {text!r}" if _URL_SCHEME.match(source) else f"file {text!r}"
    if isinstance(source, os.PathLike):
        return f"file '{os.fspath(source)}'"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"bytes ({len(source)} bytes)"
    if _is_numpy_array(source):
        return f"array of shape {tuple(source.shape)} and dtype {source.dtype}"
    if _is_pil_image(source):
        return f"PIL image ({source.mode}, {source.width}x{source.height})"
    if callable(getattr(source, "read", None)):
        name = getattr(source, "name", None)
        named = f" of {os.fspath(name)!r}" if isinstance(name, (str, os.PathLike)) else ""
        return f"a {type(source).__name__}{named}"
    return f"a {type(source).__module__}.{type(source).__qualname__}"


def unsupported_source_message(source: Any) -> str:
    """The error message for a source of a type no built-in image source reads."""
    hint = ""
    if hasattr(source, "numpy") and hasattr(source, "permute"):
        hint = " (for a torch tensor (C, H, W), pass tensor.permute(1, 2, 0).cpu().numpy())"
    return f"unsupported image source: {describe_source(source)}{hint}; pass {_SOURCES}"


def bomb_message(what: str, detail: str) -> str:
    """The error message for an image past PIL's decompression-bomb limit."""
    return (
        f"{what} is too large ({detail}): PIL.Image.MAX_IMAGE_PIXELS guards against decompression "
        f"bombs; use a smaller image, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust this one"
    )


def _corrupted(what: str, exc: BaseException, index: int | None) -> InvalidImageError:
    detail = _OBJECT_REPR.sub("the data", str(exc))
    return InvalidImageError(
        f"{what} is truncated or corrupted ({type(exc).__name__}: {detail}); re-export or re-download the image",
        index=index,
    )


def _open_image_bytes(data: bytes, what: str, index: int | None) -> Any:
    """*data* opened (lazily) as a PIL image; the errors of :func:`decode_image_bytes`."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InvalidImageError(f"{what} is empty (0 bytes); pass the image file's content", index=index)
    try:
        with warnings.catch_warnings():
            # PIL warns between MAX_IMAGE_PIXELS and twice that; we refuse instead (load_pixels).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(bomb_message(what, str(exc)), index=index) from None
    except UnidentifiedImageError:  # its bytes are never quoted back: they may be another service's answer
        raise InvalidImageError(
            f"{what} is not an image PIL can read (unknown format or corrupted header, "
            f"{len(data)} bytes); pass a PNG, JPEG, WebP, GIF, BMP or TIFF file",
            index=index,
        ) from None
    except Exception as exc:
        raise _corrupted(what, exc, index) from None


def check_image_bytes(data: bytes, what: str = "the bytes", *, index: int | None = None) -> str:
    """Check that *data* is an image file (its header, and what PIL's ``verify()`` reads) without decoding
    its pixels. Its errors are :func:`decode_image_bytes`'s; a truncation ``verify()`` cannot see is caught
    where the image is decoded.

    :param what: how to name the image in error messages (``"file 'cat.png'"``).
    :param index: the image's position in the request, kept on the error.
    :return: the image's media type (``"image/png"``).
    :raises InvalidImageError: for empty, unrecognised, corrupted or too large images.
    """
    image = _open_image_bytes(data, what, index)
    fmt = image.format
    try:
        image.verify()
    except Exception as exc:  # PIL's plugins raise OSError, SyntaxError, ValueError, struct.error...
        raise _corrupted(what, exc, index) from None
    finally:
        image.close()
    return _MEDIA_TYPES.get(fmt or "", f"image/{(fmt or 'png').lower()}")


def decode_image_bytes(data: bytes, what: str = "the bytes", *, index: int | None = None) -> Any:
    """Decode encoded image bytes (PNG, JPEG, WebP, ...) fully, refusing decompression bombs.

    :param what: how to name the image in error messages (``"file 'cat.png'"``).
    :param index: the image's position in the request, kept on the error.
    :return: the decoded PIL image (its first frame), in the file's own mode.
    :raises InvalidImageError: for empty, unrecognised, corrupted, truncated or too large images.
    """
    image = _open_image_bytes(data, what, index)
    load_pixels(image, what, index=index)
    return image


def load_pixels(image: Any, what: str = "the image", *, index: int | None = None, bomb_factor: int = 1) -> None:
    """Decode a lazily opened PIL image now, so that truncation and decompression bombs are caught here.

    :param bomb_factor: refuse past ``bomb_factor x PIL.Image.MAX_IMAGE_PIXELS`` pixels. 1 (the default) for
        images that come from outside; the image processors pass 2, the point where PIL itself refuses to open
        an image, so that they accept what transformers' processors accept (PIL only warns below it).
    :raises InvalidImageError: when the image has too many pixels or cannot be decoded.
    """
    from PIL import Image, ImageFile

    if not (isinstance(image, ImageFile.ImageFile) and image.tile):
        return  # already decoded
    limit = Image.MAX_IMAGE_PIXELS and Image.MAX_IMAGE_PIXELS * bomb_factor
    if limit and image.width * image.height > limit:
        raise InvalidImageError(
            bomb_message(
                what, f"{image.width}x{image.height} = {image.width * image.height:,} pixels, limit {limit:,}"
            ),
            index=index,
        )
    try:
        # PIL's lazy decode is not thread-safe: one opened image shared by requests prepared on several threads
        # gave some of them wrong pixels, or a false "truncated" error. One decode at a time per image object
        # (striped locks: unrelated images rarely wait on each other); the others find it decoded.
        with _LOAD_LOCKS[id(image) % len(_LOAD_LOCKS)]:
            if image.tile:
                image.load()
    except Exception as exc:  # PIL's decoders raise OSError, SyntaxError, ValueError, zlib.error...
        raise _corrupted(what, exc, index) from None


_LOAD_LOCKS = tuple(threading.Lock() for _ in range(64))


def read_image_file(path: str | os.PathLike[str], *, index: int | None = None) -> bytes:
    """The bytes of an image file (``~`` expanded).

    :raises InvalidImageError: when the file is missing, a folder, or unreadable.
    """
    text = os.fspath(path)
    file = Path(os.path.expanduser(text))
    shown = str(file)
    name = f"'{shown}'" if len(shown) <= 200 else f"'{_shortened(shown, 200)}' ({len(shown)} characters)"
    try:
        return file.read_bytes()
    except OSError as exc:
        if isinstance(text, str) and _BASE64_TEXT.fullmatch(text):
            raise InvalidImageError(
                f"a string of {len(text)} base64 characters was read as a file path; pass base64 image data as a "
                "data URL ('data:image/png;base64,' + data) or as the decoded bytes",
                index=index,
            ) from None
        if isinstance(exc, FileNotFoundError):
            where = "" if file.is_absolute() else f" (relative to the working directory {os.getcwd()})"
            raise InvalidImageError(f"file not found: {name}{where}; check the path", index=index) from None
        if isinstance(exc, IsADirectoryError):
            raise InvalidImageError(
                f"{name} is a folder, not an image file; pass the path of an image inside it", index=index
            ) from None
        raise InvalidImageError(
            f"file {name} could not be read ({type(exc).__name__}: {exc.strerror or exc}); check its permissions",
            index=index,
        ) from None


def read_file_object(source: Any, *, index: int | None = None) -> bytes:
    """Everything a binary file object holds from its current position.

    :raises InvalidImageError: when it cannot be read, is open in text mode, or is empty.
    """
    what = describe_source(source)
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
    if not data:
        raise InvalidImageError(f"{what} is empty (read() returned no bytes; is it at its end?)", index=index)
    return bytes(data)


def array_to_image(array: Any, *, index: int | None = None) -> Any:
    """A numpy image as a PIL image, its pixels copied (the caller may reuse the array).

    Accepted: ``(H, W)`` or ``(H, W, C)`` with C in 1, 3, 4 (grey, RGB, RGBA); uint8, bool (0/255), uint16
    (scaled by 1/257) or float in [0, 1] (scaled by 255, rounded). A channels-first ``(C, H, W)`` array is
    refused with the transpose that fixes it.

    :raises InvalidImageError: for any other shape or dtype, an empty array, or floats outside [0, 1].
    """
    import numpy as np
    from PIL import Image

    what = describe_source(array)
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        raise InvalidImageError(f"{what} looks channels-first (C, H, W); pass array.transpose(1, 2, 0)", index=index)
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3, 4))):
        raise InvalidImageError(f"{what} is not an image; expected (H, W) or (H, W, C) with C in 1, 3, 4", index=index)
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidImageError(f"{what} is empty; an image needs at least 1x1 pixels", index=index)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = np.round(array / 257.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InvalidImageError(f"{what} contains NaN or infinite values", index=index)
        if array.min() < 0 or array.max() > 1:
            raise InvalidImageError(
                f"{what} has values in [{array.min():g}, {array.max():g}]; float images "
                f"must lie in [0, 1] (or pass uint8 values 0-255)",
                index=index,
            )
        array = np.round(array * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise InvalidImageError(
            f"{what}: unsupported dtype; use uint8 (0-255), uint16, bool or float in [0, 1]", index=index
        )
    return Image.fromarray(np.array(array, copy=True, order="C"))


# --- the one RGB conversion ---------------------------------------------------------------------------------


def upright(image: Any) -> Any:
    """*image* turned upright by its EXIF orientation (the same object when it already is)."""
    from PIL import ImageOps

    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        return ImageOps.exif_transpose(image)
    return image


def _is_high_depth_gray(mode: str) -> bool:
    return mode in ("I", "F") or mode.startswith("I;")


def to_rgb(
    image: Any,
    what: str = "the image",
    *,
    index: int | None = None,
    bomb_factor: int = 1,
    transparency: str = "white",
) -> Any:
    """A fully decoded, non-empty RGB version of a PIL image (the same object if it already is one).

    The one RGB conversion of both packages: the SDK's decoded images, the plugin's image loader and its
    image processors all use it. Transparency (an alpha band: RGBA, LA, PA; a transparent colour: P, L, or RGB
    with a ``tRNS`` key) is composited onto white, as transformers' processors do (premultiplied RGBa converts
    as it is there too; PIL has no conversion of La to RGB: refused); 16-bit and 32-bit grey (I;16*, I, F) is
    scaled to 8 bits by :func:`gray_to_uint8` rather than clipped; every other mode (CMYK, YCbCr, P, L, 1...)
    converts with PIL's colour conversion. EXIF orientation is not applied here (see :func:`upright`).

    :param what: how to name the image in error messages.
    :param index: the image's position in the request, kept on the error.
    :param bomb_factor: as for :func:`load_pixels`.
    :param transparency: ``"white"`` (composited, as above) or ``"drop"``: alpha and transparent colours ignored,
        as PIL's ``convert("RGB")`` does (what transformers' ``load_image`` gives for a path or URL).
    :raises InvalidImageError: when the image cannot be decoded, is empty, or its mode has no RGB meaning.
    """
    from PIL import Image

    if transparency not in ("white", "drop"):
        raise ValueError(f"transparency={transparency!r}: use 'white' or 'drop'")

    load_pixels(image, what, index=index, bomb_factor=bomb_factor)
    if image.width == 0 or image.height == 0:
        raise InvalidImageError(
            f"{what} is empty ({image.width}x{image.height}); an image needs at least 1x1 pixels", index=index
        )
    mode = image.mode
    if mode == "RGB" and image.info.get("transparency") is None:
        return image
    if _is_high_depth_gray(mode):
        grey = gray_to_uint8(_gray_values(image, index), mode, index=index)
        return Image.fromarray(grey).convert("RGB")
    try:
        bands = image.getbands()
        if transparency == "white" and ("A" in bands or image.info.get("transparency") is not None):
            # as transformers' processors do with PIL images: RGBa, La convert as they are
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise InvalidImageError(
            f"{what} has mode {mode}, which PIL cannot convert to RGB ({exc}); convert it to RGB yourself first",
            index=index,
        ) from None


def _gray_values(image: Any, index: int | None) -> Any:
    try:
        import numpy as np
    except ImportError:  # the SDK alone does not depend on numpy
        raise InvalidImageError(
            f"a {image.mode!r} (high bit depth grey) image needs numpy to be converted: pip install numpy, "
            "or convert it to an 8-bit image first",
            index=index,
        ) from None
    return np.asarray(image)


def gray_to_uint8(values: Any, mode: str, *, index: int | None = None) -> Any:
    """16-bit / 32-bit integer and float grey pixels ``[H, W]`` (a numpy array) as 8-bit grey ``[H, W]`` uint8.

    PIL's own ``convert("RGB")`` clips such images at 255, which turns most 16-bit images white. Here the
    scale is the type's range: ``I;16*`` images (and ``I`` images with values up to 65535) by 255/65535;
    ``I`` images that already fit 0..255 are kept; ``F`` images in [0, 1] by 255, in [0, 255] kept.
    Anything else (negative values, beyond 16 bits) has no 8-bit meaning and is refused.

    :param mode: the PIL mode the values come from (``"I;16"``, ``"I"``, ``"F"``).
    :param index: the image's position in the request, kept on the error.
    :raises InvalidImageError: for values with no 8-bit meaning.
    """
    import numpy as np

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
    raise InvalidImageError(
        f"the {mode!r} image holds values from {low:g} to {high:g}, which map to no 8-bit range: "
        "convert it to an 8-bit RGB image first",
        index=index,
    )


# --- decoded images as an ImagePart holds them, and as PNG ------------------------------------------------


PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16"})
"""PIL modes PNG stores losslessly; a decoded image in another mode is converted by :func:`to_rgb` first."""
PNG_OPTIONS = {"compress_level": 1, "compress_type": 3}
"""How :func:`encode_png` encodes: zlib level 1 with the run-length strategy (``Z_RLE``). For a 1024x768
photo this measured faster and smaller than level 1's default strategy, and several times faster than
the default level 6 (``benchmarks/image_handoff.py``); any PNG decoder reads it."""


def prepare_image(image: Any, *, index: int | None = None) -> Any:
    """A PIL image as an :class:`ImagePart` holds it: decoded, upright, in a mode PNG keeps (module doc).

    :raises InvalidImageError: when it cannot be decoded, is too large or empty, or has no RGB meaning.
    """
    what = describe_source(image)
    load_pixels(image, what, index=index)
    try:
        image = upright(image)
    except (OSError, ValueError, SyntaxError) as exc:  # a corrupt EXIF block
        raise _corrupted(what, exc, index) from None
    if image.mode not in PNG_MODES:
        return to_rgb(image, what, index=index)
    if image.width == 0 or image.height == 0:
        raise InvalidImageError(
            f"{what} is empty ({image.width}x{image.height}); an image needs at least 1x1 pixels", index=index
        )
    return image


def encode_png(image: Any) -> bytes:
    """The PNG file of a decoded image (as :func:`to_image_part` prepared it), losslessly and fast."""
    if image.mode not in PNG_MODES:  # an ImagePart(image=...) built by hand, not prepared
        image = to_rgb(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG", **PNG_OPTIONS)
    return buf.getvalue()


MAX_IMAGE_BYTES = 20 * 2**20
"""The most bytes one encoded image may have: what ``llava-next serve`` accepts by default (its
``--max-image-bytes``). The HTTP transport refuses a decoded image whose PNG is larger before sending it
(``max_image_bytes=``), and the local transport refuses the same image (its ``Limits.max_image_bytes``)."""
_PNG_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "I;16": 2, "RGB": 3, "RGBA": 4}
"""Bytes per pixel of PNG's rows before compression ("1": 1/8, counted as 1); other modes become RGB(A) first."""


def png_size_bound(image: Any) -> int:
    """Bytes that :func:`encode_png` of *image* never exceeds, known without encoding it: its rows (one filter byte
    each), grown by deflate's worst case (stored blocks, well under 1/64), its ICC profile and the other chunks."""
    row = image.width * _PNG_BYTES_PER_PIXEL.get(image.mode, 4) + 1
    raw = image.height * row
    return raw + raw // 64 + len(image.info.get("icc_profile") or b"") + 65536


def encode_png_within(image: Any, max_bytes: int | None, *, index: int | None = None) -> bytes:
    """:func:`encode_png` of *image*, refused when it is over *max_bytes* (``None``: no limit).

    :raises InvalidImageError: saying how large the PNG is, the limit, and how to send less.
    """
    data = encode_png(image)
    if max_bytes is not None and len(data) > max_bytes:
        raise InvalidImageError(
            f"the decoded image ({image.mode}, {image.width}x{image.height}) is {len(data)} bytes as PNG (the "
            f"lossless encoding a server receives), over the {max_bytes} bytes ({max_bytes / 2**20:.3g} MiB) allowed "
            "per image (the limit max_image_bytes); downscale it (e.g. image.thumbnail((2048, 2048))), or pass the "
            "image's file (its path or bytes: a JPEG is far smaller) rather than the decoded image",
            index=index,
            param="messages",
        )
    return data


def check_png_size(image: Any, max_bytes: int | None, *, index: int | None = None) -> None:
    """Refuse a decoded image whose PNG is over *max_bytes*, as the HTTP transport does before sending it
    (:func:`encode_png_within`); encodes only an image whose :func:`png_size_bound` is over the limit."""
    if max_bytes is not None and png_size_bound(image) > max_bytes:
        encode_png_within(image, max_bytes, index=index)


def _encode_sync(source: Any, index: int | None) -> ImagePart:
    """The blocking part of :func:`to_image_part` (runs in a worker thread)."""
    if isinstance(source, ImagePart):
        return source
    if isinstance(source, str):
        lowered = source[:8].lower()
        if lowered.startswith(("http://", "https://")):
            return ImagePart(url=source)
        if lowered.startswith("data:"):
            media_type, data = decode_data_url(source, index=index)
            check_image_bytes(data, f"data URL ({media_type}, {len(data)} bytes)", index=index)
            return ImagePart(url=source)
        if lowered.startswith("file://"):
            source = unquote(urlparse(source).path)
        elif "://" in source[:16]:
            raise InvalidImageError(
                f"unsupported image URL scheme in {source[:40]!r}; use http(s)://, data: or a file path", index=index
            )
        source = Path(source).expanduser()
    if isinstance(source, os.PathLike):
        data = read_image_file(source, index=index)
        return ImagePart(data=data, media_type=check_image_bytes(data, describe_source(source), index=index))
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return ImagePart(data=data, media_type=check_image_bytes(data, describe_source(source), index=index))
    if _is_pil_image(source):
        return ImagePart(image=prepare_image(source, index=index))
    if _is_numpy_array(source):
        return ImagePart(image=array_to_image(source, index=index))
    if callable(getattr(source, "read", None)):
        data = read_file_object(source, index=index)
        return ImagePart(data=data, media_type=check_image_bytes(data, describe_source(source), index=index))
    raise InvalidImageError(unsupported_source_message(source), index=index)


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


def encode_for_wire(request: ChatRequest, max_image_bytes: int | None = MAX_IMAGE_BYTES) -> ChatRequest:
    """*request* with every decoded image encoded once, as a PNG data URL (blocking: see :func:`encoded_for_wire`).

    Returns *request* itself when it holds no decoded image.

    :raises InvalidImageError: for a decoded image whose PNG is over *max_image_bytes* (``None``: no limit), before
        anything is sent: a server would refuse it after its upload (:func:`encode_png_within`).
    """
    if not any(part.image is not None for part in request.images):
        return request
    indexes = itertools.count()  # the request's images in order, as request.images lists them

    def encoded(part: Any) -> Any:
        if not isinstance(part, ImagePart):
            return part
        index = next(indexes)
        if part.image is not None:
            data = encode_png_within(part.image, max_image_bytes, index=index)
            return ImagePart(url=ImagePart(data=data, media_type="image/png").as_url(), detail=part.detail)
        return part

    messages = tuple(ChatMessage(m.role, tuple(encoded(p) for p in m.content)) for m in request.messages)
    return dataclasses.replace(request, messages=messages)


async def encoded_for_wire(request: ChatRequest, max_image_bytes: int | None = MAX_IMAGE_BYTES) -> ChatRequest:
    """:func:`encode_for_wire` in a worker thread when there is something to encode (transports sending a
    request elsewhere call this first)."""
    if not any(part.image is not None for part in request.images):
        return request
    return await anyio.to_thread.run_sync(encode_for_wire, request, max_image_bytes)
