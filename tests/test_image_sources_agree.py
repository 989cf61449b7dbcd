"""One image-source normaliser: every kind of source gives the same RGB pixels, or the same error, whether it
goes through the SDK (``to_image_part``, then what the local and the HTTP transports hand the model) or through
the plugin's ``load_image``; and the image processors convert PIL images with the same RGB conversion."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import torch
from llava_next_sdk.errors import InvalidImageError
from llava_next_sdk.images import describe_source, encode_for_wire, to_image_part
from llava_next_sdk.types import ChatMessage, ChatRequest
from PIL import Image
from transformers.image_transforms import convert_to_rgb as reference_convert_to_rgb

from llava_next_plugin.errors import ImageError
from llava_next_plugin.image_processing import pil_to_rgb_image, to_rgb_array
from llava_next_plugin.images import load_image
from llava_next_plugin.validation import Limits, load_request_images

INDEX = 2
RNG_SEED = 11


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _noise(mode: str = "RGB", seed: int = 0) -> Image.Image:
    values = np.random.default_rng(seed).integers(0, 256, (7, 9, 4), dtype=np.uint8)
    return Image.fromarray(values, "RGBA").convert(mode)


def pil_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(RNG_SEED)
    wide = rng.integers(0, 65536, (7, 9), dtype=np.uint16)
    palette = _noise("RGB", 1).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent = palette.copy()
    transparent.info["transparency"] = 3
    rotated = _noise("RGB", 2)
    exif = rotated.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    rotated.save(buffer, "JPEG", exif=exif.tobytes())
    return {
        "RGB": _noise("RGB"),
        "RGBA": _noise("RGBA"),
        "RGBa": _noise("RGBA").convert("RGBa"),
        "LA": _noise("LA"),
        "PA": palette.convert("PA"),
        "L": _noise("L"),
        "1": _noise("L").convert("1"),
        "P": palette,
        "P with transparency": transparent,
        "I;16": Image.fromarray(wide),
        "I (16-bit values)": Image.fromarray(wide.astype(np.int32)),
        "I (8-bit values)": Image.fromarray((wide // 300).astype(np.int32)),
        "I (negative)": Image.fromarray(wide.astype(np.int32) - 65535),
        "F in [0, 1]": Image.fromarray(rng.random((7, 9), dtype=np.float32)),
        "F in [0, 255]": Image.fromarray((rng.random((7, 9)) * 255).astype(np.float32)),
        "F beyond 255": Image.fromarray((rng.random((7, 9)) * 1000).astype(np.float32)),
        "CMYK": _noise("CMYK"),
        "YCbCr": _noise("YCbCr"),
        "HSV": _noise("RGB").convert("HSV"),
        "EXIF-rotated JPEG": Image.open(io.BytesIO(buffer.getvalue())),
        "empty": Image.new("RGB", (0, 5)),
    }


ARRAY_SHAPES = {"HW": (7, 9), "HW1": (7, 9, 1), "HWC3": (7, 9, 3), "HWC4": (7, 9, 4), "HW2": (7, 9, 2)}
ARRAY_SHAPES |= {"CHW1": (1, 7, 9), "CHW3": (3, 7, 9), "CHW4": (4, 7, 9)}
DTYPES = ("uint8", "uint16", "bool", "float32", "float64", "int64")


def _array(dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(shape) > 0.5
    if dtype.startswith("float"):
        return rng.random(shape).astype(dtype)
    return rng.integers(0, 65536 if dtype == "uint16" else 256, shape).astype(dtype)


def arrays() -> dict[str, np.ndarray]:
    out = {
        f"{dtype} {name}": _array(dtype, shape, seed)
        for seed, (dtype, (name, shape)) in enumerate((d, s) for d in DTYPES for s in ARRAY_SHAPES.items())
    }
    out["float beyond 1"] = np.random.default_rng(3).random((7, 9, 3)) * 2
    out["float with NaN"] = np.full((7, 9), np.nan)
    out["empty array"] = np.zeros((0, 4, 3), np.uint8)
    out["4-D array"] = np.zeros((2, 7, 9, 3), np.uint8)
    return out


ENCODED = (
    "path str",
    "pathlib",
    "file URL",
    "bytes",
    "bytearray",
    "memoryview",
    "file object",
    "BytesIO",
    "data URL",
    "16-bit PNG",
    "missing file",
    "a folder",
    "junk bytes",
    "empty bytes",
    "truncated PNG",
    "a BytesIO at its end",
    "an int",
    "a torch tensor",
)


def encoded_sources(tmp_path: Path) -> dict[str, Callable[[], Any]]:
    """Encoded sources, as factories (a file object is consumed by reading it)."""
    data = _png(_noise("RGBA", 4))
    path = tmp_path / "picture.png"
    path.write_bytes(data)
    (tmp_path / "folder").mkdir(exist_ok=True)
    truncated = _png(Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)))[:-200]
    sources: dict[str, Callable[[], Any]] = {
        "path str": lambda: str(path),
        "pathlib": lambda: path,
        "file URL": lambda: path.as_uri(),
        "bytes": lambda: data,
        "bytearray": lambda: bytearray(data),
        "memoryview": lambda: memoryview(data),
        "file object": lambda: open(path, "rb"),  # noqa: SIM115 (read and closed by the code under test's caller)
        "BytesIO": lambda: io.BytesIO(data),
        "data URL": lambda: "data:image/png;base64," + base64.b64encode(data).decode(),
        "16-bit PNG": lambda: _png(pil_images()["I;16"]),
        "missing file": lambda: str(tmp_path / "nope.png"),
        "a folder": lambda: tmp_path / "folder",
        "junk bytes": lambda: b"not an image at all",
        "empty bytes": lambda: b"",
        "truncated PNG": lambda: truncated,
        "a BytesIO at its end": lambda: _at_end(io.BytesIO(data)),
        "an int": lambda: 12345,
        "a torch tensor": lambda: torch.zeros((3, 7, 9), dtype=torch.uint8),
    }
    assert tuple(sources) == ENCODED
    return sources


def _at_end(file: io.BytesIO) -> io.BytesIO:
    file.read()
    return file


def through_plugin(source: Any) -> np.ndarray | ImageError:
    try:
        return np.asarray(load_image(source, INDEX))
    except ImageError as error:
        return error


def through_sdk(source: Any) -> tuple[np.ndarray, np.ndarray] | InvalidImageError:
    """The pixels the model gets from the SDK's part: handed over decoded (local) and sent over HTTP."""
    try:
        part = anyio.run(lambda: to_image_part(source, index=INDEX))
    except InvalidImageError as error:
        return error
    request = ChatRequest((ChatMessage("user", (part,)),))
    limits = Limits(allowed_url_domains=None)
    (local,) = load_request_images(request, limits)
    (remote,) = load_request_images(encode_for_wire(request), limits)
    return np.asarray(local), np.asarray(remote)


def assert_same_outcome(source: Any, again: Any = None) -> None:
    plugin = through_plugin(source)
    sdk = through_sdk(source if again is None else again)
    if isinstance(plugin, ImageError) or isinstance(sdk, InvalidImageError):
        assert isinstance(plugin, ImageError), f"the plugin read it, the SDK said: {sdk}"
        assert isinstance(sdk, InvalidImageError), f"the SDK read it, the plugin said: {plugin}"
        assert plugin.index == sdk.index == INDEX
        if "is truncated or corrupted" in sdk.message:  # PIL's own detail differs: verify() vs load()
            assert "is truncated or corrupted" in plugin.message
            return
        # the plugin adds where plugins come in for sources nobody reads
        assert plugin.message.startswith(sdk.message), (plugin.message, sdk.message)
        assert plugin.message == sdk.message or "register a plugin" in plugin.message[len(sdk.message) :]
        return
    local, remote = sdk
    assert plugin.dtype == np.uint8 and plugin.ndim == 3 and plugin.shape[-1] == 3
    np.testing.assert_array_equal(local, plugin)
    np.testing.assert_array_equal(remote, plugin)


@pytest.mark.parametrize("kind", list(pil_images()))
def test_pil_images_in_every_mode(kind):
    assert_same_outcome(pil_images()[kind], pil_images()[kind])


@pytest.mark.parametrize("kind", list(arrays()))
def test_numpy_arrays_of_every_layout_and_dtype(kind):
    assert_same_outcome(arrays()[kind])


@pytest.mark.parametrize("kind", ENCODED)
def test_paths_bytes_file_objects_urls_and_unsupported_types(tmp_path, kind):
    make = encoded_sources(tmp_path)[kind]
    first, second = make(), make()
    try:
        assert_same_outcome(first, second)
    finally:
        for source in (first, second):
            if hasattr(source, "close") and not isinstance(source, (io.BytesIO, Image.Image, memoryview)):
                source.close()


def test_what_is_accepted_and_refused():
    """The union of what the two normalisers accepted before they were one, nothing more."""
    outcomes = {kind: through_plugin(source) for kind, source in arrays().items()}
    accepted = {kind for kind, outcome in outcomes.items() if isinstance(outcome, np.ndarray)}
    expected = {f"{dtype} {shape}" for dtype in DTYPES[:5] for shape in ("HW", "HW1", "HWC3", "HWC4")}
    assert accepted == expected
    for kind in ("uint8 CHW1", "uint16 CHW3", "float32 CHW4"):
        assert "looks channels-first (C, H, W); pass array.transpose(1, 2, 0)" in outcomes[kind].message
    assert "unsupported dtype" in outcomes["int64 HWC3"].message
    tensor = through_plugin(torch.zeros((3, 7, 9), dtype=torch.uint8))
    assert "tensor.permute(1, 2, 0).cpu().numpy()" in tensor.message


def test_array_pixels_are_scaled_as_documented():
    rng = np.random.default_rng(8)
    wide = rng.integers(0, 65536, (7, 9, 3), dtype=np.uint16)
    np.testing.assert_array_equal(np.asarray(load_image(wide)), np.round(wide / 257).astype(np.uint8))
    unit = rng.random((7, 9, 3))
    np.testing.assert_array_equal(np.asarray(load_image(unit)), np.round(unit * 255).astype(np.uint8))
    rgba = rng.integers(0, 256, (7, 9, 4), dtype=np.uint8)
    expected = reference_convert_to_rgb(Image.fromarray(rgba, "RGBA"), return_numpy=True)
    np.testing.assert_array_equal(np.asarray(load_image(rgba)), expected)


@pytest.mark.parametrize("kind", [k for k in pil_images() if k not in ("EXIF-rotated JPEG", "empty")])
def test_the_processors_convert_pil_images_as_the_loader_does(kind):
    """One RGB conversion: the processor's PIL route, its array route and the loader agree pixel for pixel;
    8-bit modes also agree with transformers' own conversion."""
    image = pil_images()[kind]
    try:
        loaded = np.asarray(load_image(image.copy(), INDEX))
    except ImageError as error:
        with pytest.raises(ImageError) as caught:
            pil_to_rgb_image(image.copy(), INDEX)
        assert caught.value.message == error.message.replace(describe_source(image), f"the {image.mode!r} image")
        return
    np.testing.assert_array_equal(np.asarray(pil_to_rgb_image(image.copy(), INDEX)), loaded)
    np.testing.assert_array_equal(to_rgb_array(image.copy(), INDEX), loaded)
    if image.mode in ("RGB", "RGBA", "LA", "L", "P", "PA", "CMYK", "YCbCr"):
        np.testing.assert_array_equal(reference_convert_to_rgb(image.copy(), return_numpy=True), loaded)


def test_sixteen_bit_arrays_give_the_processor_and_the_loader_the_same_pixels():
    wide = np.random.default_rng(9).integers(0, 65536, (7, 9, 3), dtype=np.uint16)
    np.testing.assert_array_equal(to_rgb_array(wide, 0), np.asarray(load_image(wide)))


@pytest.mark.parametrize("channels", [2, 4])
def test_array_alpha_is_composited_exactly_as_the_processor_did_with_numpy(channels):
    """Every (colour, alpha) pair: arrays with alpha now go through the one (PIL) RGB conversion, and give
    what the processor's own numpy compositing gave, ``round(alpha * colour + (1 - alpha) * 255)``."""
    colour, alpha = np.meshgrid(np.arange(256), np.arange(256))
    grid = np.stack([colour] * (channels - 1) + [alpha], axis=-1).astype(np.uint8)
    a = grid[..., -1:] / 255.0
    expected = np.round(a * grid[..., :-1] + (1 - a) * 255).astype(np.uint8)
    expected = np.repeat(expected, 3, axis=-1) if channels == 2 else expected
    np.testing.assert_array_equal(to_rgb_array(grid, 0), expected)
    if channels == 4:
        np.testing.assert_array_equal(np.asarray(load_image(grid)), expected)
