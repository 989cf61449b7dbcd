"""Milliseconds per image from the user's decoded image to the RGB image the processor gets.

    python benchmarks/image_handoff.py               # a 1024x768 photo, as PIL and as a uint8 array
    python benchmarks/image_handoff.py --repeats 20

Cases, each for a PIL image and a numpy array ``[H, W, 3]`` of the same photo (skimage's astronaut,
resized to 1024x768):
  sdk      the SDK turns the user's image into an ``ImagePart`` (``llava_next_sdk.images``)
  local    the local transport's image step (``validation.load_request_images``) on that part
  http     what the HTTP transport adds before sending (``llava_next_sdk.images.encode_for_wire``), with
           the payload size, and the server's decode of it
  png      PNG settings compared on the same photo (encode time, size); ``llava_next_sdk.images.PNG_OPTIONS``
           is the one the HTTP transport uses
The minimum of ``--repeats`` runs is reported (the steadier figure on a shared machine).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import checkpoints  # noqa: E402
from llava_next_sdk import images as sdk_images  # noqa: E402
from llava_next_sdk.types import ChatMessage, ChatRequest, GenerationParams, ImagePart  # noqa: E402

from llava_next_plugin.validation import Limits, load_request_images  # noqa: E402


def best_ms(work: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    result = work()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - started)
    return min(times) * 1e3, result


def request_of(part: ImagePart) -> ChatRequest:
    return ChatRequest((ChatMessage("user", (part,)),), GenerationParams())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    photo = checkpoints.real_photo("astronaut.png").convert("RGB").resize((1024, 768))
    limits = Limits(allowed_url_domains=None)
    encode_for_wire = getattr(sdk_images, "encode_for_wire", None)
    for kind, source in (("PIL", photo), ("numpy", np.asarray(photo))):
        sdk_ms, part = best_ms(lambda source=source: sdk_images._encode_sync(source, 0), args.repeats)
        local_ms, (rgb,) = best_ms(lambda part=part: load_request_images(request_of(part), limits), args.repeats)
        assert np.array_equal(np.asarray(rgb), np.asarray(photo)), "the local path changed the pixels"
        line = f"{kind:6s} sdk {sdk_ms:7.1f} ms  local {local_ms:7.1f} ms  in-process total {sdk_ms + local_ms:7.1f} ms"
        if encode_for_wire is not None:
            http_ms, wire = best_ms(lambda part=part: encode_for_wire(request_of(part)), args.repeats)
            (wire_part,) = wire.images
            server_ms, (decoded,) = best_ms(lambda wire=wire: load_request_images(wire, limits), args.repeats)
            assert np.array_equal(np.asarray(decoded), np.asarray(rgb)), "local and remote disagree"
            line += (
                f"  | http encode {http_ms:7.1f} ms ({len(wire_part.url) / 1e6:.2f} MB base64), "
                f"server decode {server_ms:7.1f} ms"
            )
        print(line)
    for options in (
        {"compress_level": 6},
        {"compress_level": 1},
        {"compress_level": 1, "compress_type": 3},
        {"compress_level": 0},
    ):

        def encode(options=options) -> bytes:
            buffer = io.BytesIO()
            photo.save(buffer, format="PNG", **options)
            return buffer.getvalue()

        ms, data = best_ms(encode, max(1, args.repeats // 2))
        chosen = "  <- PNG_OPTIONS" if options == getattr(sdk_images, "PNG_OPTIONS", None) else ""
        print(f"png {options}: encode {ms:7.1f} ms, {len(data) / 1e6:.2f} MB{chosen}")


if __name__ == "__main__":
    main()
