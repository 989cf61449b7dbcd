"""Local and remote are the same: one suite, parametrised over the SDK's local transport (the engine in this
process) and its HTTP transport (our server on loopback, with its own engine). For requests run one at a
time both give identical greedy text and usage, and the same bad input raises the same error class."""

from __future__ import annotations

import anyio
import checkpoints
import pytest
from llava_next_sdk import AsyncClient
from llava_next_sdk.errors import (
    BadRequestError,
    ContextLengthExceededError,
    InvalidImageError,
    UnsupportedParameterError,
)

from llava_next_plugin.engine import Engine
from llava_next_plugin.server import create_app, serve_in_thread
from llava_next_plugin.validation import Limits


def local_engine(client: AsyncClient):
    """The engine under a local client (its transport may still stand in for the not-yet-loaded one)."""
    transport = client.transport
    return (getattr(transport, "loaded", None) or transport)._engine


LIMITS = Limits(max_images_per_request=2, max_image_pixels=300 * 300)
TRANSPORTS = ["local", "http"]


def photo(width: int, height: int):
    return checkpoints.real_photo().convert("RGB").resize((width, height))


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    engine = Engine.from_pretrained(str(tiny_checkpoint), model_name="tiny")
    with serve_in_thread(create_app(engine, limits=LIMITS)) as running:
        yield running


@pytest.fixture(scope="module")
def open_client(server, tiny_checkpoint):
    """``open_client(kind)``: a new AsyncClient (inside the running event loop) for that transport."""

    def make(kind: str) -> AsyncClient:
        if kind == "local":
            return AsyncClient(model=str(tiny_checkpoint), request_limits=LIMITS)
        return AsyncClient(base_url=server.url, model="tiny", max_retries=0)

    return make


def run_on_both(open_client, calls, backend: str = "asyncio") -> dict:
    """Run ``await calls(client)`` with each transport, one request at a time; ``{kind: result}``."""
    results = {}
    for kind in TRANSPORTS:

        async def main(kind):
            async with open_client(kind) as client:
                return await calls(client)

        results[kind] = anyio.run(main, kind, backend=backend)
    return results


def same(result):
    return (result.text, result.finish_reason, result.usage)


def test_generate_gives_identical_greedy_text_and_usage(open_client):
    async def calls(client):
        return [
            await client.generate(photo(80, 50), "What is in the picture?", max_tokens=10, temperature=0),
            await client.generate(
                [photo(40, 90), photo(64, 64)], "Compare", max_tokens=6, temperature=0, system="You are terse."
            ),
            await client.generate(None, "No image at all", max_tokens=5, temperature=0),
        ]

    results = run_on_both(open_client, calls)
    assert [same(r) for r in results["local"]] == [same(r) for r in results["http"]]
    first = results["local"][0]
    assert first.usage.completion_tokens == 10 and first.usage.image_tokens > 0
    assert first.usage.prompt_tokens > first.usage.image_tokens
    assert results["local"][2].usage.image_tokens == 0
    for result in results["local"] + results["http"]:
        assert result.timings.total_seconds > 0


def test_streams_give_the_same_deltas_text_and_usage_on_trio(open_client):
    async def calls(client):
        async with client.stream(photo(60, 60), "Stream please", max_tokens=8, temperature=0) as stream:
            deltas = [d async for d in stream]
        return deltas, await stream.until_done()

    results = run_on_both(open_client, calls, backend="trio")
    (local_deltas, local), (http_deltas, remote) = results["local"], results["http"]
    assert "".join(local_deltas) == local.text == "".join(http_deltas) == remote.text
    assert same(local) == same(remote)


def test_chat_with_openai_style_messages_and_stop_strings_match(open_client):
    async def calls(client):
        full = await client.generate(photo(70, 70), "Say something", max_tokens=12, temperature=0)
        stop = full.text[len(full.text) // 2 :][:3]
        messages = [
            {
                "role": "user",
                "content": [{"type": "image", "image": photo(70, 70)}, {"type": "text", "text": "Say something"}],
            }
        ]
        return full, await client.chat(messages, max_tokens=12, temperature=0, stop=[stop])

    results = run_on_both(open_client, calls)
    assert [same(r) for r in results["local"]] == [same(r) for r in results["http"]]
    full, stopped = results["local"]
    assert stopped.finish_reason == "stop" and full.text.startswith(stopped.text) and stopped.text != full.text


BAD_INPUT = {
    "too many images": (BadRequestError, lambda c: c.generate([photo(32, 32)] * 3, "x", max_tokens=2)),
    "an image too large": (InvalidImageError, lambda c: c.generate(photo(400, 400), "x", max_tokens=2)),
    "a URL from a host not allowed": (
        InvalidImageError,
        lambda c: c.generate("http://169.254.169.254/cat.png", "x", max_tokens=2),
    ),
    "max_tokens beyond the context": (
        ContextLengthExceededError,
        lambda c: c.generate(photo(40, 40), "x", max_tokens=9999),
    ),
    "an unsupported parameter": (
        UnsupportedParameterError,
        lambda c: c.generate(photo(40, 40), "x", frequency_penalty=0.5),
    ),
    "a temperature out of range": (BadRequestError, lambda c: c.generate(photo(40, 40), "x", temperature=9)),
    "a seed beyond 64 bits": (BadRequestError, lambda c: c.generate(photo(40, 40), "x", seed=2**70)),
    "bytes that are no image": (InvalidImageError, lambda c: c.generate(b"not an image", "x", max_tokens=2)),
}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_the_same_bad_input_raises_the_same_error_class(open_client, transport, case):
    expected, call = BAD_INPUT[case]

    async def main():
        async with open_client(transport) as client:
            with pytest.raises(BadRequestError) as info:
                await call(client)
            # and the client keeps working after the error
            ok = await client.generate(photo(40, 40), "ok", max_tokens=2, temperature=0)
            return info.value, ok

    error, ok = anyio.run(main)
    assert type(error) is expected, f"{transport}: {type(error).__name__}: {error}"
    assert error.status == 400 and error.message
    assert ok.usage.completion_tokens == 2


def test_the_server_refuses_a_seed_beyond_64_bits_as_a_bad_request_naming_it(server):
    """Sent as raw JSON (the SDK would refuse it before sending): a 400 naming ``seed``, not a 500 retried."""
    import httpx
    from llava_next_sdk import wire

    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "seed": 2**70}
    response = httpx.post(server.url + "/chat/completions", json=body, timeout=60)
    error = wire.parse_error(response.status_code, response.content)
    assert response.status_code == 400 and type(error) is BadRequestError and error.param == "seed"


def test_local_and_served_engines_pick_the_same_device_by_default(tiny_checkpoint):
    """One default (cuda when available, else cpu), in Engine.from_pretrained, for the local client and serve."""
    import argparse

    import torch

    from llava_next_plugin import serve_cli
    from llava_next_plugin.engine import default_device

    assert default_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    # serve hands its --device (None unless given) to Engine.from_pretrained, as the local transport does
    assert serve_cli._configure(argparse.ArgumentParser()).parse_args(["--model", "x"]).device is None

    async def main():
        async with AsyncClient(model=str(tiny_checkpoint), request_limits=LIMITS) as client:
            await client.generate(None, "Hi", max_tokens=1, temperature=0)
            return local_engine(client)

    local = anyio.run(main)
    served = Engine.from_pretrained(str(tiny_checkpoint))
    try:
        assert local.device.type == served.device.type == default_device()
    finally:
        served.shutdown(drain=False)


# Failures of the engine, not of the input: the same class (and status) from both transports.


def _failure_on_both(make_engine, call, *, during=None) -> dict:
    """``{kind: error}``: ``await call(client)`` with each transport, each over a new engine (HTTP through our
    server); with *during*, ``await during(engine)`` runs while the call is in flight."""
    from llava_next_sdk.errors import LlavaNextError

    errors = {}
    for kind in TRANSPORTS:
        engine = make_engine()

        async def main(url, kind, engine):
            options = (
                {"base_url": url, "model": "tiny"}
                if url
                else {"model": "tiny", "engine": engine, "request_limits": LIMITS}
            )
            async with AsyncClient(max_retries=0, **options) as client:
                async with anyio.create_task_group() as group:

                    async def run():
                        try:
                            await call(client)
                        except LlavaNextError as error:
                            errors[kind] = error

                    group.start_soon(run)
                    if during is not None:
                        await during(engine)

        try:
            if kind == "local":
                anyio.run(main, None, kind, engine)
            else:
                with serve_in_thread(create_app(engine, limits=LIMITS, shutdown_engine=False)) as running:
                    anyio.run(main, running.url, kind, engine)
        finally:
            engine.shutdown(drain=False)
    return errors


def test_the_same_engine_failure_raises_the_same_error_class_locally_and_over_http(tiny_checkpoint):
    import faulty_serve
    from llava_next_sdk.errors import OverloadedError, ServerError

    def faulty():
        return faulty_serve.inject_faults(Engine.from_pretrained(str(tiny_checkpoint), model_name="tiny"))

    def full():
        return Engine.from_pretrained(str(tiny_checkpoint), model_name="tiny", max_queue=0)

    async def wait_then_shut_down(engine):
        while engine.batch_size == 0:
            await anyio.sleep(0.02)
        await anyio.to_thread.run_sync(lambda: engine.shutdown(drain=False))

    cases = {
        "out of device memory": (
            faulty,
            lambda c: c.generate(None, faulty_serve.OOM_MARKER, max_tokens=2),
            None,
            OverloadedError,
            503,
        ),
        "the model failed": (
            faulty,
            lambda c: c.generate(None, faulty_serve.RUNTIME_MARKER, max_tokens=2),
            None,
            ServerError,
            500,
        ),
        "the queue is full": (full, lambda c: c.generate(None, "Hi", max_tokens=2), None, OverloadedError, 429),
        "the engine shut down mid-request": (
            lambda: Engine.from_pretrained(str(tiny_checkpoint), model_name="tiny"),
            lambda c: c.generate(None, "Go on", max_tokens=3000, temperature=0),
            wait_then_shut_down,
            ServerError,
            503,
        ),
    }
    for case, (make, call, during, expected, status) in cases.items():
        errors = _failure_on_both(make, call, during=during)
        assert set(errors) == set(TRANSPORTS), case
        for kind, error in errors.items():
            assert type(error) is expected and error.status == status, f"{case}, {kind}: {error!r}"
        assert "RuntimeError" not in errors["http"].message, case
