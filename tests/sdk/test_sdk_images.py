"""The SDK's image sources: binary file objects are read like bytes, and every error about an image names
its index (``image i:``) and the kind of source, never an object's repr (``<_io.BytesIO object at 0x...>``)."""

from __future__ import annotations

import io
import random
import re
import subprocess
import sys

import anyio
import pytest
from llava_next_sdk import AsyncClient, InvalidImageError
from llava_next_sdk.images import check_png_size, encode_png, png_size_bound, to_image_part
from PIL import Image

REPR = re.compile(r"object at 0x")


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


def encode(source, index=0):
    return anyio.run(lambda: to_image_part(source, index=index))


def test_a_binary_file_object_is_read_like_its_bytes(tmp_path):
    path = tmp_path / "red.png"
    path.write_bytes(png())
    with open(path, "rb") as file:
        assert encode(file).data == encode(io.BytesIO(png())).data == png()


def test_a_phones_multi_picture_jpeg_is_sent_as_the_jpeg_it_is(tmp_path):
    """PIL names a JPEG with extra pictures (Ultra HDR, gain maps) MPO; on the wire it is image/jpeg."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))])
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO" and buffer.getvalue()[:3] == b"\xff\xd8\xff"
    path = tmp_path / "photo.jpg"
    path.write_bytes(buffer.getvalue())
    part = encode(path)
    assert part.data == buffer.getvalue() and part.media_type == "image/jpeg"


BAD = {
    "bytes that are no image": (
        lambda tmp: io.BytesIO(b"not an image"),
        r"^image 1: a BytesIO is not an image PIL can read",
    ),
    "a closed file": (lambda tmp: _closed(tmp), r"^image 1: a BufferedReader of '.*x.png' could not be read"),
    "a file open in text mode": (
        lambda tmp: _text(tmp),
        r"^image 1: a TextIOWrapper of '.*x.png' is open in text",
    ),
    "a file at its end": (lambda tmp: _at_end(), r"^image 1: a BytesIO is empty"),
    "raw bytes that are no image": (lambda tmp: b"not an image", r"^image 1: bytes \(12 bytes\) is not an image PIL"),
}


def _closed(tmp):
    (tmp / "x.png").write_bytes(png())
    file = open(tmp / "x.png", "rb")
    file.close()
    return file


def _text(tmp):
    (tmp / "x.png").write_text("not binary")
    return open(tmp / "x.png")


def _at_end():
    file = io.BytesIO(png())
    file.read()
    return file


@pytest.mark.parametrize("case", list(BAD))
def test_errors_name_the_argument_never_an_objects_repr(tmp_path, case):
    make, says = BAD[case]
    source = make(tmp_path)
    with pytest.raises(InvalidImageError) as info:
        encode(source, index=1)
    assert re.search(says, info.value.message), info.value.message
    assert not REPR.search(info.value.message) and info.value.index == 1


def test_base64_text_given_as_an_image_is_not_read_as_a_path_and_the_error_stays_short():
    import base64

    data = base64.b64encode(png() * 50).decode()
    with pytest.raises(InvalidImageError, match="base64 characters was read as a file path") as info:
        encode(data, index=0)
    assert "data:image/png;base64," in info.value.message and len(info.value.message) < 300


def test_the_client_names_the_argument_before_sending_anything():
    async def main():
        async with AsyncClient(base_url="http://127.0.0.1:9/v1", max_retries=0) as client:
            with pytest.raises(InvalidImageError) as info:
                await client.generate([png(), io.BytesIO(b"junk")], "What?")
            return info.value

    error = anyio.run(main)
    assert error.message.startswith("image 1: a BytesIO is not an image") and not REPR.search(error.message)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "CMYK"])
def test_the_png_size_bound_is_never_below_the_png_so_no_image_over_the_limit_is_let_through(mode):
    """Noise (what compresses least), in every mode PNG keeps and one it does not (encoded as RGB)."""
    size = (301, 203)
    image = Image.frombytes(mode, size, random.Random(0).randbytes(size[0] * size[1] * 4))
    encoded = len(encode_png(image))
    assert encoded <= png_size_bound(image)
    check_png_size(image, encoded)  # at the limit: kept
    with pytest.raises(InvalidImageError, match=rf"image 3: .* is {encoded} bytes as PNG.*over the {encoded - 1} "):
        check_png_size(image, encoded - 1, index=3)


WITHOUT_NUMPY = """
import sys
sys.modules["numpy"] = sys.modules["torch"] = None  # the SDK alone depends on neither
import anyio
from PIL import Image
from llava_next_sdk import InvalidImageError
from llava_next_sdk.images import to_image_part

part = anyio.run(lambda: to_image_part(Image.new("CMYK", (3, 2)), index=0))
print(part.image.mode)
try:
    anyio.run(lambda: to_image_part(Image.new("F", (3, 2)), index=1))
except InvalidImageError as error:
    print(error.message)
"""


def test_without_numpy_pil_images_work_and_high_depth_grey_says_what_it_needs():
    result = subprocess.run([sys.executable, "-c", WITHOUT_NUMPY], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    mode, message = result.stdout.splitlines()
    assert mode == "RGB"
    assert message == (
        "image 1: a 'F' (high bit depth grey) image needs numpy to be converted: pip install numpy, "
        "or convert it to an 8-bit image first"
    )
