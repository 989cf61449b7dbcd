"""Image sources: every built-in source gives a decoded RGB PIL image; every bad image a clear error."""

from __future__ import annotations

import base64
import gzip
import http.server
import io
import threading
import time
import urllib.parse

import checkpoints
import numpy as np
import pytest
from llava_next_sdk.errors import InvalidImageError
from PIL import Image, PngImagePlugin
from transformers.image_transforms import convert_to_rgb as reference_convert_to_rgb
from transformers.image_utils import load_image as reference_load_image

import llava_next_plugin.images as images
from llava_next_plugin.errors import ImageError, InputError, as_api_error
from llava_next_plugin.images import load_image, load_images


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    values = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(values[..., 0] if channels == 1 else values, mode)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return checkpoints.real_photo("chelsea.png").convert("RGB")


# --- every built-in source ---------------------------------------------------------------------------


def test_path_str_pathlike_and_file_url_give_the_same_pixels_as_the_reference(tmp_path, photo):
    path = tmp_path / "chelsea.png"
    photo.save(path)
    expected = np.asarray(reference_load_image(str(path)))
    for source in (str(path), path, path.as_uri()):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == photo.size
        np.testing.assert_array_equal(np.asarray(image), expected)


def test_bytes_bytearray_memoryview_and_file_objects(photo):
    data = encode(photo, "JPEG", quality=90)
    expected = pixels(Image.open(io.BytesIO(data)))
    for source in (data, bytearray(data), memoryview(data), io.BytesIO(data)):
        np.testing.assert_array_equal(np.asarray(load_image(source)), expected)


def test_data_url_and_bare_base64(photo):
    data = encode(photo.resize((40, 30)))
    encoded = base64.b64encode(data).decode()
    expected = pixels(Image.open(io.BytesIO(data)))
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))  # MIME-style line wrapping
    for source in (f"data:image/png;base64,{encoded}", encoded, f"data:image/png;base64,{wrapped}"):
        np.testing.assert_array_equal(np.asarray(load_image(source)), expected)


def test_data_urls_are_read_alike_by_load_image_and_by_server_requests(photo):
    """One decoder (llava_next_sdk.wire.decode_data_url): what load_image accepts, a request accepts."""
    from llava_next_sdk import wire

    from llava_next_plugin.validation import Limits, load_request_images

    data = encode(photo.resize((40, 30)))
    encoded = base64.b64encode(data).decode()
    expected = pixels(Image.open(io.BytesIO(data)))
    urls = {
        "plain": f"data:image/png;base64,{encoded}",
        "wrapped": "data:image/png;base64," + "\r\n".join(encoded[i : i + 64] for i in range(0, len(encoded), 64)),
        "percent-encoded": f"data:image/png,{urllib.parse.quote(data)}",
        "not an image type": f"data:text/plain;base64,{encoded}",
        "corrupt": "data:image/png;base64,!!!not base64!!!",
    }
    for name, url in urls.items():
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
        outcomes = []
        for read in (
            lambda url=url: load_image(url, index=0),
            lambda body=body: load_request_images(wire.parse_chat_request(body).request, Limits())[0],
        ):
            try:
                outcomes.append(pixels(read()))
            except (ImageError, InvalidImageError) as error:  # load_image's error, or the server's
                outcomes.append(error.message.removeprefix("image 0: "))
        if isinstance(outcomes[0], np.ndarray) and isinstance(outcomes[1], np.ndarray):
            np.testing.assert_array_equal(outcomes[0], expected)
            np.testing.assert_array_equal(outcomes[1], expected)
            assert name in ("plain", "wrapped")
        else:
            assert outcomes[0] == outcomes[1], name
            assert name not in ("plain", "wrapped")


def test_pil_image_in_rgb_is_returned_as_is_and_lazy_files_are_decoded(tmp_path, photo):
    assert load_image(photo) is photo
    path = tmp_path / "lazy.png"
    photo.save(path)
    lazy = Image.open(path)
    np.testing.assert_array_equal(np.asarray(load_image(lazy)), np.asarray(photo))


def test_numpy_arrays():
    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(rgb)), rgb)
    gray = rgb[..., 0]
    for source in (gray, gray[..., None]):
        np.testing.assert_array_equal(np.asarray(load_image(source)), np.repeat(gray[..., None], 3, axis=2))
    np.testing.assert_array_equal(np.asarray(load_image(rgb / 255.0)), rgb)  # float in [0, 1]
    np.testing.assert_array_equal(np.asarray(load_image(rgb.astype(np.uint16) * 257)), rgb)  # 16-bit
    mask = np.zeros((2, 3), dtype=bool)
    mask[0, 0] = True
    assert load_image(mask).getpixel((0, 0)) == (255, 255, 255) and load_image(mask).getpixel((1, 0)) == (0, 0, 0)
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)  # fully transparent black -> white, as the reference does
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)


# --- http(s) on a real loopback server -----------------------------------------------------------------


class ImageServer(http.server.BaseHTTPRequestHandler):
    png = b""

    def do_GET(self):  # noqa: N802 (the stdlib's name)
        if self.path == "/cat.png":
            self._send(200, self.png, "image/png")
        elif self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/cat.png")
            self.end_headers()
        elif self.path == "/slow":
            time.sleep(1.5)
            self._send(200, self.png, "image/png")
        elif self.path == "/page":
            self._send(200, b"<html>not an image</html>", "text/html")
        elif self.path == "/gzipped":  # compressed though asked for the file as it is (a bomb's way in)
            type(self).asked_encoding = self.headers.get("Accept-Encoding")
            self._send(200, gzip.compress(self.png), "image/png", {"Content-Encoding": "gzip"})
        else:
            self._send(404, b"no such image", "text/plain")

    def _send(self, status, body, content_type, headers=None):
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server(photo):
    ImageServer.png = encode(photo.resize((64, 48)))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ImageServer)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_url_with_redirect(image_server):
    expected = pixels(Image.open(io.BytesIO(ImageServer.png)))
    for path in ("/cat.png", "/moved"):
        np.testing.assert_array_equal(np.asarray(load_image(image_server + path, timeout=5)), expected)


def test_http_errors_are_clear(image_server, monkeypatch):
    with pytest.raises(ImageError, match=r"^image 2: URL '.*/missing.png' answered HTTP 404 Not Found; check the URL"):
        load_image(image_server + "/missing.png", index=2)
    with pytest.raises(ImageError, match=r"did not answer within 0.3 s .*allow more time"):
        load_image(image_server + "/slow", timeout=0.3)
    with pytest.raises(ImageError, match=r"URL .*/page.* is not an image \(content-type text/html\)"):
        load_image(image_server + "/page")
    with pytest.raises(ImageError, match=r"answered with Content-Encoding 'gzip' though asked for none"):
        load_image(image_server + "/gzipped")
    assert ImageServer.asked_encoding == "identity"
    monkeypatch.setattr(images, "MAX_DOWNLOAD_BYTES", 1000)
    with pytest.raises(ImageError, match=r"serves more than 1,000 bytes, the download limit"):
        load_image(image_server + "/cat.png")


def test_unreachable_url_is_an_invalid_image_not_a_hang():
    with pytest.raises(ImageError, match=r"could not be fetched \(ConnectError"):
        load_image("http://127.0.0.1:9/cat.png", timeout=2)


# --- bad input -------------------------------------------------------------------------------------------


def test_unknown_sources_name_the_index_and_the_accepted_kinds():
    with pytest.raises(
        ImageError,
        match=r"^image 4: unsupported image source: a builtins.int; pass a path, "
        r"an http\(s\) URL, a data URL, bytes, a binary file object, a PIL image or a numpy array",
    ):
        load_image(42, index=4)
    with pytest.raises(ImageError, match=r"no image source handles the URL scheme 's3://'.*register a plugin"):
        load_image("s3://bucket/cat.png")
    error = pytest.raises(ImageError, load_image, object(), 1).value
    assert error.index == 1 and isinstance(error, InputError) and isinstance(error, ValueError)
    assert not hasattr(error, "status")  # model-level: no HTTP in it; the serving layer maps it
    api = as_api_error(error)
    assert isinstance(api, InvalidImageError) and api.status == 400 and api.code == "invalid_image"
    assert api.index == 1 and str(api) == str(error) and api.__cause__ is error


def test_missing_files_and_folders(tmp_path):
    with pytest.raises(ImageError, match=r"^image 0: file not found: '.*nope.png'; check the path"):
        load_image(tmp_path / "nope.png", index=0)
    with pytest.raises(ImageError, match=r"file not found: 'nope.png' \(relative to the working directory"):
        load_image("nope.png")
    with pytest.raises(ImageError, match=r"is a folder, not an image file"):
        load_image(tmp_path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_truncated_files_are_caught_at_load(tmp_path, fmt):
    data = encode(noise(48, 40), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"^image 3: file '.*' is (truncated or )?corrupted"):
        load_image(path, index=3)
    with pytest.raises(ImageError, match=r"^image 0: "):
        load_image(data[: len(data) // 2], index=0)


def test_corrupted_and_empty_bytes():
    with pytest.raises(ImageError, match=r"bytes \(11 bytes\) is not an image PIL can read") as info:
        load_image(b"hello world")
    assert "hello" not in info.value.message  # bytes that are no image are never quoted back
    with pytest.raises(ImageError, match=r"is empty \(0 bytes\)"):
        load_image(b"")
    with pytest.raises(ImageError, match=r"invalid base64"):
        load_image("data:image/png;base64,!!!not base64!!!")
    with pytest.raises(ImageError, match=r"data URL has no ','"):
        load_image("data:image/png;base64")


def test_zero_size_images_are_refused():
    with pytest.raises(ImageError, match=r"is empty \(0x5\); an image needs at least 1x1 pixels"):
        load_image(Image.new("RGB", (0, 5)), index=0)
    with pytest.raises(ImageError, match=r"array of shape \(0, 4, 3\).* is empty"):
        load_image(np.zeros((0, 4, 3), np.uint8))


def test_bad_arrays_say_how_to_fix_them():
    with pytest.raises(ImageError, match=r"looks channels-first \(C, H, W\); pass array.transpose\(1, 2, 0\)"):
        load_image(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ImageError, match=r"is not an image; expected \(H, W\) or \(H, W, C\)"):
        load_image(np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(ImageError, match=r"values in \[0, 2\]; float images must lie in \[0, 1\]"):
        load_image(np.array([[0.0, 2.0]]))
    with pytest.raises(ImageError, match=r"NaN or infinite"):
        load_image(np.full((2, 2), np.nan))


def test_decompression_bombs_respect_pils_limit(monkeypatch, tmp_path):
    small = encode(noise(40, 40))  # 1,600 pixels
    large = encode(noise(60, 60))  # 3,600 pixels: over twice the limit, where PIL itself raises
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for data in (small, large):
        with pytest.raises(ImageError, match=r"^image 1: bytes .* is too large .*PIL.Image.MAX_IMAGE_PIXELS"):
            load_image(data, index=1)
    path = tmp_path / "bomb.png"
    path.write_bytes(small)
    with pytest.warns(Image.DecompressionBombWarning):  # PIL only warns for the user's own Image.open
        lazy = Image.open(path)
    with pytest.raises(ImageError, match=r"too large \(40x40 = 1,600 pixels, limit 1,000\)"):
        load_image(lazy)  # a lazily opened file is checked before it is decoded
    assert load_image(noise(40, 40)).size == (40, 40)  # an image already in memory is no bomb
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the user's way to lift the limit
    assert load_image(large).size == (60, 60)


def test_load_images_names_the_failing_index(photo):
    good = encode(photo.resize((8, 8)))
    loaded = load_images([good, photo, np.zeros((2, 2, 3), np.uint8)])
    assert [image.size for image in loaded] == [(8, 8), photo.size, (2, 2)]
    with pytest.raises(ImageError, match=r"^image 2: bytes \(3 bytes\) is not an image") as caught:
        load_images([good, good, b"bad"])
    assert caught.value.index == 2
    with pytest.raises(ImageError, match=r"expected a list of images"):
        load_images(good)


# --- modes --------------------------------------------------------------------------------------------------


def test_transparency_is_composited_on_white_like_the_reference():
    rgba = noise(16, 12, "RGBA", seed=3)
    la = noise(16, 12, "RGBA", seed=4).convert("LA")
    palette = noise(16, 12, seed=5).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    keyed = noise(16, 12, seed=6)  # an RGB PNG with a tRNS colour key: its key colour is transparent
    keyed.putpixel((0, 0), (0, 255, 0))
    keyed = Image.open(io.BytesIO(encode(keyed, transparency=(0, 255, 0))))
    assert keyed.mode == "RGB" and keyed.info["transparency"] == (0, 255, 0)
    premultiplied = noise(16, 12, "RGBA", seed=7).convert("RGBa")  # no "A" band: converted as it is, as there
    for image in (rgba, la, palette, keyed, premultiplied):
        expected = reference_convert_to_rgb(image, return_numpy=True)
        np.testing.assert_array_equal(np.asarray(load_image(image)), expected)
    assert np.asarray(load_image(keyed))[0, 0].tolist() == [255, 255, 255]
    # Through a file, too: a PNG with an alpha channel.
    expected = reference_convert_to_rgb(rgba, return_numpy=True)
    np.testing.assert_array_equal(np.asarray(load_image(encode(rgba))), expected)


def test_other_modes_convert_meaningfully():
    rgb = noise(10, 6, seed=6)
    cmyk = rgb.convert("CMYK")
    np.testing.assert_array_equal(np.asarray(load_image(encode(cmyk, "JPEG", quality=100))).shape, (6, 10, 3))
    np.testing.assert_array_equal(np.asarray(load_image(cmyk)), np.asarray(cmyk.convert("RGB")))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    np.testing.assert_array_equal(np.asarray(load_image(palette)), np.asarray(palette.convert("RGB")))
    gray = rgb.convert("L")
    out = np.asarray(load_image(gray))
    assert (out[..., 0] == np.asarray(gray)).all() and (out[..., 0] == out[..., 2]).all()
    bilevel = gray.convert("1")
    assert set(np.unique(np.asarray(load_image(bilevel)))) <= {0, 255}
    ycbcr = rgb.convert("YCbCr")
    np.testing.assert_array_equal(np.asarray(load_image(ycbcr)), np.asarray(ycbcr.convert("RGB")))


def test_sixteen_bit_and_float_gray_are_scaled_not_clipped(tmp_path):
    levels = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    sixteen = Image.fromarray(levels)
    assert sixteen.mode == "I;16"
    path = tmp_path / "depth.png"
    sixteen.save(path)  # a 16-bit PNG, as depth maps and scans come
    for source in (sixteen, path):
        assert [load_image(source).getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), (255, 255, 255)]
    as_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert [load_image(as_float).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    wide = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.int32))  # mode I: the 16-bit range
    assert [load_image(wide).getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]
    negative = Image.fromarray(np.array([[-10, 0, 990]], dtype=np.int32))
    with pytest.raises(ImageError, match="values from -10 to 990.*convert it to an 8-bit RGB image"):
        load_image(negative)


@pytest.mark.parametrize("mode", ["I", "I;16"])
@pytest.mark.parametrize("high", [200, 60000])
def test_grey_images_give_the_same_pixels_loaded_first_or_given_to_the_processor(mode, high):
    from llava_next_plugin import LlavaNextImageProcessor

    ramp = np.linspace(0, high, 40 * 50).reshape(40, 50).round()
    image = Image.fromarray(ramp.astype(np.int32 if mode == "I" else np.uint16))
    assert image.mode == mode
    processor = LlavaNextImageProcessor(
        crop_size={"height": 32, "width": 32},
        size={"shortest_edge": 32},
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
    )
    direct = processor(image)["pixel_values"]
    loaded = processor(load_image(image))["pixel_values"]
    np.testing.assert_array_equal(loaded, direct)


def test_exif_orientation_is_applied_like_the_reference(tmp_path, photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    photo.save(path, "JPEG", exif=exif.tobytes())
    image = load_image(path)
    assert image.size == (photo.height, photo.width)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(reference_load_image(str(path))))


def test_png_text_chunks_and_multi_frame_gifs_load_their_first_frame():
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * 100)
    assert load_image(encode(noise(4, 4), pnginfo=info)).size == (4, 4)
    frames = [Image.new("RGB", (5, 5), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    assert load_image(buffer.getvalue()).getpixel((0, 0)) == (255, 0, 0)


# --- decoded images cross the SDK without a round trip -----------------------------------------------


def decoded_sources() -> dict[str, object]:
    rng = np.random.default_rng(3)
    rgba = Image.fromarray(rng.integers(0, 256, (7, 9, 4), dtype=np.uint8), "RGBA")
    palette = noise(9, 7).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent = palette.copy()
    transparent.info["transparency"] = 3
    rotated = noise(9, 7)
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.info["exif"] = exif.tobytes()
    rotated = Image.open(io.BytesIO(encode(rotated, "JPEG", exif=exif.tobytes())))  # a photo as a camera saves it
    wide = rng.integers(0, 65536, (7, 9), dtype=np.uint16)
    return {
        "RGB": noise(9, 7),
        "RGBA": rgba,
        "L": noise(9, 7, "L"),
        "LA": rgba.convert("LA"),
        "P": palette,
        "P with transparency": transparent,
        "1": noise(9, 7, "L").convert("1"),
        "I;16": Image.fromarray(wide),
        "I": Image.fromarray(wide.astype(np.int32)),
        "F": Image.fromarray(rng.random((7, 9), dtype=np.float32)),
        "CMYK": noise(9, 7).convert("CMYK"),
        "YCbCr": noise(9, 7).convert("YCbCr"),
        "EXIF-rotated JPEG file": rotated,
        "uint8 HW": rng.integers(0, 256, (7, 9), dtype=np.uint8),
        "uint8 HW1": rng.integers(0, 256, (7, 9, 1), dtype=np.uint8),
        "uint8 HWC": rng.integers(0, 256, (7, 9, 3), dtype=np.uint8),
        "uint8 HWC RGBA": rng.integers(0, 256, (7, 9, 4), dtype=np.uint8),
        "float HWC": rng.random((7, 9, 3)),
        "bool HW": rng.random((7, 9)) > 0.5,
    }


@pytest.mark.parametrize("kind", list(decoded_sources()))
def test_a_decoded_image_reaches_the_processor_as_it_would_over_http(kind):
    """The SDK keeps a PIL image or array decoded for the local transport and encodes it only for HTTP; the
    processor gets the same RGB pixels either way (the server decodes the PNG the HTTP transport sends)."""
    from llava_next_sdk.images import _encode_sync, encode_for_wire
    from llava_next_sdk.types import ChatMessage, ChatRequest

    from llava_next_plugin.validation import Limits, load_request_images

    source = decoded_sources()[kind]
    part = _encode_sync(source, 0)
    assert part.image is not None and part.data is None and part.url is None  # nothing encoded yet
    request = ChatRequest((ChatMessage("user", (part,)),))
    limits = Limits(allowed_url_domains=None)
    (local,) = load_request_images(request, limits)
    sent = encode_for_wire(request)
    (remote_part,) = sent.images
    assert remote_part.url.startswith("data:image/png;base64,")
    (remote,) = load_request_images(sent, limits)
    assert local.mode == remote.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(local), np.asarray(remote))
    if kind == "EXIF-rotated JPEG file":
        assert local.size == (7, 9)  # upright on both paths


def test_a_request_without_decoded_images_is_sent_as_it_is():
    from llava_next_sdk.images import encode_for_wire
    from llava_next_sdk.types import ChatMessage, ChatRequest, ImagePart, TextPart

    request = ChatRequest((ChatMessage("user", (ImagePart(data=encode(noise(3, 3))), TextPart("hi"))),))
    assert encode_for_wire(request) is request


def test_a_hand_built_decoded_part_in_a_mode_png_cannot_hold_is_still_sent():
    from llava_next_sdk.images import encode_for_wire
    from llava_next_sdk.types import ChatMessage, ChatRequest, ImagePart

    from llava_next_plugin.validation import Limits, load_request_images

    cmyk = noise(5, 4).convert("CMYK")
    sent = encode_for_wire(ChatRequest((ChatMessage("user", (ImagePart(image=cmyk),)),)))
    (received,) = load_request_images(sent, Limits())
    np.testing.assert_array_equal(np.asarray(received), np.asarray(cmyk.convert("RGB")))
