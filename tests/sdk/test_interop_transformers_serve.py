"""Our HTTP transport against real third-party software: ``transformers serve`` hosting a tiny checkpoint.

``transformers serve`` needs transformers' ``serving`` extra (fastapi); it loads the folder with
transformers' own LLaVA-NeXT classes, so the greedy text it returns is also checked against our
in-process transport on the same checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
from llava_next_sdk import AsyncClient, BadRequestError, GenerationResult
from PIL import Image
from served import free_port

pytestmark = pytest.mark.anyio

PROMPT = "What is in the picture?"


def image():
    return Image.new("RGB", (40, 30), (200, 30, 30))


@pytest.fixture(scope="module")
def serve_process(tiny_checkpoint, tmp_path_factory):
    """``transformers serve FOLDER`` started on a free loopback port (not yet waited for)."""
    port = free_port()
    # An existing (empty) hub cache: transformers 5.23's ``/v1/models`` scans it and answers 500 when the
    # folder is missing (5.24 lists an empty cache instead); the model itself loads from FOLDER.
    hub_cache = tmp_path_factory.mktemp("hub-cache")
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_CACHE=str(hub_cache)
    )
    command = [
        sys.executable,
        "-m",
        "transformers.cli.transformers",
        "serve",
        str(tiny_checkpoint),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--log-level",
        "error",
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield process, f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def local_greedy(serve_process, tiny_checkpoint):
    """The greedy answer of our in-process transport on the same checkpoint (the comparison point),
    computed while ``transformers serve`` starts."""
    import anyio

    async def run() -> GenerationResult:
        async with AsyncClient(model=str(tiny_checkpoint)) as client:
            return await client.generate(image(), PROMPT, max_tokens=6, temperature=0)

    return anyio.run(run)


@pytest.fixture(scope="module")
def transformers_serve(serve_process, local_greedy):
    """The ``/v1`` base URL of the running ``transformers serve``, once it answers."""
    process, base_url = serve_process
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"transformers serve exited with {process.returncode}: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(base_url + "/models", timeout=2).status_code == 200:
                return base_url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("transformers serve did not start within 180 s")
        time.sleep(0.5)


async def test_generate_and_stream_against_transformers_serve(transformers_serve, tiny_checkpoint, local_greedy):
    async with AsyncClient(base_url=transformers_serve, model=str(tiny_checkpoint)) as client:
        result = await client.generate(image(), PROMPT, max_tokens=6, temperature=0)
        async with client.stream(image(), PROMPT, max_tokens=6, temperature=0) as stream:
            deltas = [delta async for delta in stream]
    assert result.text and result.finish_reason in ("length", "stop")
    assert "".join(deltas) == stream.result.text == result.text
    assert len(deltas) > 1
    # the same greedy text and prompt length as our own engine on the same weights
    assert result.text == local_greedy.text
    assert result.usage.prompt_tokens == local_greedy.usage.prompt_tokens
    assert result.usage.completion_tokens == 6
    assert result.timings.total_seconds > 0


async def test_chat_and_map_against_transformers_serve(transformers_serve, tiny_checkpoint):
    async with AsyncClient(base_url=transformers_serve, model=str(tiny_checkpoint)) as client:
        chat = await client.chat(
            [{"role": "user", "content": [{"type": "image", "image": image()}, {"type": "text", "text": PROMPT}]}],
            max_tokens=6,
            temperature=0,
        )
        results = await client.map([(image(), PROMPT), (None, "Hello")], concurrency=2, max_tokens=3, temperature=0)
    assert all(isinstance(r, GenerationResult) for r in results), results
    assert results[0].text.startswith(chat.text[:5])
    assert results[1].usage.completion_tokens == 3


async def test_client_side_validation_holds_against_any_endpoint(transformers_serve, tiny_checkpoint):
    async with AsyncClient(base_url=transformers_serve, model=str(tiny_checkpoint)) as client:
        with pytest.raises(BadRequestError, match="top_p"):
            await client.generate(image(), PROMPT, top_p=3)
