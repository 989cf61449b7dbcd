"""The SDK over HTTP against small third-party-like OpenAI endpoints on loopback (asyncio and trio)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import importlib.metadata
import io
import json
import re
import socket
import threading
import time
import warnings

import anyio
import llava_next_sdk
import numpy as np
import pytest
import served
from llava_next_sdk import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    ContextLengthExceededError,
    GenerationResult,
    InvalidImageError,
    LlavaNextError,
    NotFoundError,
    OverloadedError,
    ServerError,
    UnsupportedParameterError,
)
from PIL import Image

pytestmark = pytest.mark.anyio


def client_for(base_url: str, **kwargs) -> AsyncClient:
    kwargs.setdefault("backoff_base", 0.01)
    return AsyncClient(base_url=base_url, model="standin-model", **kwargs)


def image_urls(body: dict) -> list[str]:
    return [
        part["image_url"]["url"]
        for m in body["messages"]
        if isinstance(m["content"], list)
        for part in m["content"]
        if part["type"] == "image_url"
    ]


def decode_png(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


# ------------------------------------------------------------------------------------------ results


async def test_generate_returns_a_typed_result(standin):
    url, record = standin.endpoint("ok")
    async with AsyncClient(base_url=url, model="standin-model", api_key="sk-test") as client:
        result = await client.generate(
            Image.new("RGB", (8, 6), "red"), "What is it?", max_tokens=5, temperature=0, top_p=0.5, stop=["\n"], seed=3
        )
    assert isinstance(result, GenerationResult)
    assert result.text == "echo[1]: What is it?"
    assert result.finish_reason == "stop"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.image_tokens) == (17, 4, 10)
    assert result.usage.total_tokens == 21
    assert result.timings.total_seconds > 0
    assert result.id == "chatcmpl-standin"
    body = record.bodies[0]
    assert body["model"] == "standin-model"
    assert {k: body[k] for k in ("max_tokens", "temperature", "top_p", "stop", "seed")} == {
        "max_tokens": 5,
        "temperature": 0.0,
        "top_p": 0.5,
        "stop": ["\n"],
        "seed": 3,
    }
    assert "stream" not in body
    assert record.headers[0]["authorization"] == "Bearer sk-test"
    # The User-Agent names the installed SDK's version, read from the package (not written twice).
    assert record.headers[0]["user-agent"] == f"llava-next-sdk/{llava_next_sdk.__version__}"
    assert llava_next_sdk.__version__ == importlib.metadata.version("llava-next-sdk")


async def test_every_image_source_is_sent_as_the_same_pixels_or_url(standin, tmp_path):
    url, record = standin.endpoint("ok")
    pixels = np.random.default_rng(0).integers(0, 256, (12, 9, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    path = tmp_path / "picture.png"
    path.write_bytes(png.getvalue())
    data_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    sources = [
        Image.fromarray(pixels),
        pixels,
        pixels.astype(np.float32) / 255,
        png.getvalue(),
        str(path),
        path,
        "https://example.com/cat.jpg",
        data_url,
    ]
    async with client_for(url) as client:
        result = await client.generate(sources, "Compare them.")
    assert result.text == f"echo[{len(sources)}]: Compare them."
    sent = image_urls(record.bodies[0])
    for i in (0, 1, 2, 3, 4, 5, 7):
        np.testing.assert_array_equal(decode_png(sent[i]), pixels, err_msg=f"image {i}")
    assert sent[6] == "https://example.com/cat.jpg"
    assert sent[7] == data_url
    # images come first, then the prompt, in one user turn
    content = record.bodies[0]["messages"][0]["content"]
    assert [p["type"] for p in content] == ["image_url"] * len(sources) + ["text"]


async def test_images_are_read_and_encoded_off_the_event_loop(standin, tmp_path):
    import threading

    loop_thread = threading.current_thread()
    encoded_on = []

    class RecordingImage(Image.Image):
        """A PIL image that notes which thread encodes it."""

        def save(self, *args, **kwargs):
            encoded_on.append(threading.current_thread())
            return super().save(*args, **kwargs)

    image = RecordingImage()
    image.__dict__.update(Image.new("RGB", (6, 4), "green").__dict__)
    url, record = standin.endpoint("ok")
    async with client_for(url) as client:
        await client.generate(image, "hi")
    assert encoded_on and loop_thread not in encoded_on
    assert decode_png(image_urls(record.bodies[0])[0])[0, 0].tolist() == [0, 128, 0]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("/no/such/picture.png", "file not found"),
        (b"not an image at all", "is not an image PIL can read"),
        (np.zeros((4, 4, 3), dtype=np.float32) + 2, "must lie in [0, 1]"),
        (np.zeros((3, 4, 4, 2), dtype=np.uint8), "expected (H, W) or (H, W, C)"),
        ("data:text/plain;base64,aGVsbG8=", "not an image"),
        ("ftp://example.com/x.png", "unsupported image URL scheme"),
        (12345, "unsupported image source: a builtins.int"),
    ],
)
async def test_a_bad_image_fails_before_anything_is_sent_and_names_its_index(standin, bad, message):
    url, record = standin.endpoint("ok")
    async with client_for(url) as client:
        with pytest.raises(InvalidImageError, match=re.escape(message)) as info:
            await client.generate([Image.new("RGB", (4, 4)), bad], "hi")
    assert info.value.index == 1
    assert info.value.message.startswith("image 1:")
    assert isinstance(info.value, ValueError)
    assert record.count == 0


async def test_unknown_and_invalid_parameters_are_rejected_before_sending(standin):
    url, record = standin.endpoint("ok")
    async with client_for(url) as client:
        with pytest.raises(UnsupportedParameterError, match="frequency_penalty.*supported: max_tokens") as info:
            await client.generate(None, "hi", frequency_penalty=1.0)
        assert info.value.param == "frequency_penalty"
        with pytest.raises(BadRequestError, match="temperature=5") as info:
            await client.generate(None, "hi", temperature=5)
        assert info.value.param == "temperature"
        with pytest.raises(BadRequestError, match="max_tokens"):
            await client.generate(None, "hi", max_tokens=0)
        with pytest.raises(BadRequestError, match="prompt must be a str"):
            await client.generate(None, None)
    assert record.count == 0


async def test_chat_takes_openai_content_parts(standin):
    url, record = standin.endpoint("ok")
    async with client_for(url) as client:
        result = await client.chat(
            [
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                        {"type": "image", "image": Image.new("RGB", (5, 5), "blue")},
                        {"type": "text", "text": "Describe both."},
                    ],
                },
            ],
            max_tokens=8,
        )
    assert result.text == "echo[2]: Describe both."
    body = record.bodies[0]
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert image_urls(body)[0] == "https://example.com/a.png"
    assert decode_png(image_urls(body)[1])[0, 0].tolist() == [0, 0, 255]
    with pytest.raises(BadRequestError, match="unsupported role 'tool'"):
        await client_for(url).chat([{"role": "tool", "content": "x"}])


async def test_stream_yields_deltas_then_usage(standin):
    url, record = standin.endpoint("ok")
    async with client_for(url) as client:
        async with client.stream(Image.new("RGB", (4, 4)), "tell me more") as stream:
            deltas = [delta async for delta in stream]
    assert deltas == ["echo[1]:", " tell", " me", " more"]
    assert stream.result.text == "echo[1]: tell me more" == stream.text
    assert stream.finish_reason == "stop"
    assert stream.usage.prompt_tokens == 17 and stream.usage.image_tokens == 10
    assert stream.result.timings.time_to_first_token is not None
    assert record.bodies[0]["stream"] is True
    assert record.bodies[0]["stream_options"] == {"include_usage": True}


async def test_a_stream_from_an_endpoint_that_ignores_stream_still_works(standin):
    url, _ = standin.endpoint("ignores_stream")
    async with client_for(url) as client:
        async with client.stream(None, "plain json") as stream:
            deltas = [d async for d in stream]
    assert deltas == ["echo[0]: plain json"]
    assert stream.result.usage.prompt_tokens == 7 and stream.finish_reason == "stop"


# ------------------------------------------------------------------------------------------ robustness


async def test_429_is_retried_after_the_servers_retry_after(standin):
    url, record = standin.endpoint("rate_limited")
    async with client_for(url) as client:
        started = time.monotonic()
        result = await client.generate(None, "hi")
    assert result.text == "echo[0]: hi"
    assert record.count == 2
    assert time.monotonic() - started >= 0.95  # Retry-After: 1, not the 10 ms backoff


async def test_retry_after_ms_is_honoured_and_a_409_is_retried_as_openai_does(standin):
    url, record = standin.endpoint("retry_after_ms")
    async with client_for(url, timeout=20) as client:
        started = time.monotonic()
        result = await client.generate(None, "hi")
        waited = time.monotonic() - started
    assert result.text == "echo[0]: hi" and record.count == 3
    assert 0.19 <= waited < 10  # 200 ms (retry-after-ms), not Retry-After's 30 s


async def test_a_retry_after_longer_than_we_wait_raises_overloaded(standin):
    url, record = standin.endpoint("retry_after_long")
    async with client_for(url) as client:
        with pytest.raises(OverloadedError) as info:
            await client.generate(None, "hi")
    assert info.value.status == 429 and info.value.retry_after == 3600
    assert record.count == 1


async def test_a_retry_after_past_the_calls_timeout_raises_the_servers_error_at_once(standin):
    url, record = standin.endpoint("rate_limited")  # 429 with Retry-After: 1
    async with client_for(url, timeout=0.5) as client:
        with pytest.raises(OverloadedError) as info:  # not APITimeoutError after sleeping into the deadline
            await client.generate(None, "hi")
    assert info.value.retry_after == 1 and record.count == 1


async def test_a_stream_whose_server_keeps_the_body_open_after_done_still_ends(standin):
    url, _ = standin.endpoint("done_then_hang")  # [DONE], then the body stays open 5 s
    async with client_for(url, read_timeout=1) as client:
        async with client.stream(None, "hi") as stream:
            assert [d async for d in stream] == ["echo[0]:", " hi"]
    assert stream.result.finish_reason == "stop"


@pytest.mark.parametrize(
    "options, match",
    [
        ({"base_url": "http://127.0.0.1:99999/v1"}, "not a usable URL: Port out of range"),
        ({"base_url": "http:///v1"}, "has no host"),
        ({"api_key": "sk-\u00e9"}, "api_key must be ASCII text on one line"),
        ({"headers": {"X-User": "Zo\u00eb"}}, "header 'X-User' must be ASCII"),
    ],
    ids=["port", "no-host", "api-key", "header"],
)
def test_a_client_that_could_not_send_is_refused_when_made(options, match):
    with pytest.raises(ValueError, match=match):
        AsyncClient(**{"base_url": "http://127.0.0.1:9/v1", "model": "m", **options})


async def test_a_prompt_that_cannot_be_encoded_is_a_bad_request(standin):
    url, record = standin.endpoint("ok")
    async with client_for(url) as client:
        with pytest.raises(BadRequestError, match="cannot be encoded"):
            await client.generate(None, "half a pair \ud800")
    assert record.count == 0


async def test_500_is_retried(standin):
    url, record = standin.endpoint("flaky")
    async with client_for(url) as client:
        async with client.stream(None, "hi") as stream:  # also before a stream's first byte
            assert [d async for d in stream] == ["echo[0]:", " hi"]
    assert record.count == 2


async def test_retries_are_bounded(standin):
    url, record = standin.endpoint("always_502")
    async with client_for(url, max_retries=2) as client:
        with pytest.raises(ServerError) as info:
            await client.generate(None, "hi")
    assert info.value.status == 502 and "bad gateway" in info.value.message
    assert record.count == 3
    url, record = standin.endpoint("always_502")
    async with client_for(url, max_retries=0) as client:
        with pytest.raises(ServerError):
            await client.generate(None, "hi")
    assert record.count == 1


@pytest.mark.parametrize(
    "scenario, error, status, text",
    [
        ("unauthorized", AuthenticationError, 401, "Incorrect API key"),
        ("bad_param", UnsupportedParameterError, 400, "Unrecognized request argument"),
        ("context", ContextLengthExceededError, 400, "maximum context length"),
    ],
)
async def test_error_bodies_become_our_error_classes(standin, scenario, error, status, text):
    url, record = standin.endpoint(scenario)
    async with client_for(url) as client:
        with pytest.raises(error, match=text) as info:
            await client.generate(None, "hi")
        assert info.value.status == status
        with pytest.raises(error):
            async with client.stream(None, "hi"):
                pass
    assert record.count == 2  # 4xx are not retried


async def test_a_wrong_path_says_so(standin):
    url, _ = standin.endpoint("ok")
    async with client_for(url.removesuffix("/v1")) as client:
        with pytest.raises(NotFoundError, match="missing '/v1'"):
            await client.generate(None, "hi")


async def test_a_stream_that_breaks_midway_raises_and_is_not_retried(standin):
    url, record = standin.endpoint("midstream")
    received = []
    async with client_for(url, max_retries=3) as client:
        with pytest.raises(APIConnectionError):
            async with client.stream(None, "hi") as stream:
                async for delta in stream:
                    received.append(delta)
    assert received == ["partial", " answer"]
    assert stream.text == "partial answer" and stream.result is None
    assert record.count == 1


async def test_a_slow_server_times_out(standin):
    url, record = standin.endpoint("slow")
    async with client_for(url, timeout=0.3, max_retries=2) as client:
        started = time.monotonic()
        with pytest.raises(APITimeoutError, match="timed out"):
            await client.generate(None, "hi")
    assert time.monotonic() - started < 1.5
    assert record.count == 1  # a read timeout may have started work: never retried

    url, record = standin.endpoint("slow")
    async with client_for(url, timeout=10, read_timeout=0.3, max_retries=2) as client:
        with pytest.raises(
            APITimeoutError, match="raise read_timeout="
        ) as info:  # the option of the phase that expired
            await client.generate(None, "hi")
    assert record.count == 1 and "waiting for an answer" in str(info.value)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_server_that_drips_bytes_cannot_hold_a_call_past_its_total_timeout(standin, stream):
    """A byte every 0.2 s never trips the 5 s read timeout; the call's 1 s total ends it (the drip lasts ~10 s)."""
    url, record = standin.endpoint("drip")
    async with client_for(url, timeout=1.0, read_timeout=5, max_retries=0) as client:
        with pytest.raises(APITimeoutError, match="total timeout of 1 s") as info:
            if stream:
                async with client.stream(None, "hi") as chunks:
                    async for _ in chunks:
                        pass
            else:
                await client.generate(None, "hi")
    assert "timeout=" in info.value.message and record.count == 1


def test_timeouts_default_to_a_finite_total_and_phases_and_are_tunable():
    from llava_next_sdk.transports.http import DEFAULT_TOTAL_TIMEOUT, HTTPTransport

    default = HTTPTransport("http://127.0.0.1:9/v1")
    assert default.total_timeout == DEFAULT_TOTAL_TIMEOUT == 600
    assert (default.timeout.connect, default.timeout.read) == (10, 120)
    tuned = HTTPTransport("http://127.0.0.1:9/v1", timeout=30, connect_timeout=2, read_timeout=20)
    assert tuned.total_timeout == 30 and (tuned.timeout.connect, tuned.timeout.read) == (2, 20)
    short = HTTPTransport("http://127.0.0.1:9/v1", timeout=3)
    assert short.total_timeout == 3 and (short.timeout.connect, short.timeout.read) == (3, 3)
    for bad in ({"timeout": 0}, {"read_timeout": -1}, {"connect_timeout": "5"}):
        with pytest.raises(TypeError, match=list(bad)[0]):
            HTTPTransport("http://127.0.0.1:9/v1", **bad)


async def test_connection_refused_is_retried_then_raised(free_port):
    async with client_for(f"http://127.0.0.1:{free_port}/v1", max_retries=2) as client:
        started = time.monotonic()
        with pytest.raises(APIConnectionError, match="after 2 retries") as info:
            await client.generate(None, "hi")
    assert not isinstance(info.value, APITimeoutError)
    assert time.monotonic() - started < 2


# httpx leaves its inner body generators to the garbage collector when a stream is closed before its end;
# trio reports them as unraisable ResourceWarnings. The connection itself is closed (asserted below).
_httpx_generators_collected = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@_httpx_generators_collected
async def test_leaving_a_stream_early_closes_the_connection(standin):
    url, record = standin.endpoint("endless")
    async with client_for(url) as client:
        async with client.stream(None, "go") as stream:
            async for delta in stream:
                if delta == "tok2 ":
                    break
        assert stream.text == "tok0 tok1 tok2 " and stream.result is None
        assert await anyio.to_thread.run_sync(record.stream_closed.wait, 5)
    assert record.chunks_sent < 100


@_httpx_generators_collected
async def test_cancelling_a_stream_closes_the_connection(standin):
    url, record = standin.endpoint("endless")
    async with client_for(url) as client:
        with anyio.move_on_after(0.3) as scope:
            async with client.stream(None, "go") as stream:
                async for _ in stream:
                    pass
        assert scope.cancelled_caught
        assert await anyio.to_thread.run_sync(record.stream_closed.wait, 5)
        # the client is still usable afterwards
        url_ok, _ = standin.endpoint("ok")
    async with client_for(url_ok) as client:
        assert (await client.generate(None, "again")).text == "echo[0]: again"


async def test_cancelling_generate_returns_promptly(standin):
    url, _ = standin.endpoint("slow")
    async with client_for(url) as client:
        started = time.monotonic()
        with anyio.move_on_after(0.2):
            await client.generate(None, "hi")
        assert time.monotonic() - started < 1.0


# ------------------------------------------------------------------------------------------ batches


async def test_map_bounds_concurrency_keeps_order_and_records_failures(standin):
    url, record = standin.endpoint("concurrent")
    items = [(None, f"question {i}") for i in range(8)]
    items[3] = ([b"garbage"], "broken")
    items.append({"prompt": "as a dict", "max_tokens": 2})
    items.append({"messages": [{"role": "user", "content": "as messages"}]})
    async with client_for(url) as client:
        results = await client.map(items, concurrency=3, max_tokens=4)
    assert isinstance(results[3], InvalidImageError)
    texts = [r.text for i, r in enumerate(results) if i != 3]
    assert texts == [f"echo[0]: question {i}" for i in range(8) if i != 3] + [
        "echo[0]: as a dict",
        "echo[0]: as messages",
    ]
    assert record.count == 9
    assert record.max_in_flight == 3
    assert [b.get("max_tokens") for b in record.bodies].count(2) == 1
    with pytest.raises(ValueError, match="concurrency"):
        await client_for(url).map(items, concurrency=0)


async def test_a_closed_client_says_so(standin):
    url, _ = standin.endpoint("ok")
    client = client_for(url)
    await client.aclose()
    await client.aclose()  # idempotent
    with pytest.raises(LlavaNextError, match="closed"):
        await client.generate(None, "hi")


@pytest.fixture
def free_port():
    """A loopback port with nothing listening on it."""
    return served.free_port()


class ClosingServer:
    """A raw HTTP server on loopback that reads each request whole, then closes the connection without an answer
    (after *work* seconds: a server that crashed while working on it), except the requests numbered in *answer*
    (from 1), which get a 200 completion."""

    def __init__(self, work: float, answer: tuple[int, ...] = ()) -> None:
        self.work, self.answer, self.requests = work, answer, 0
        self.loop = asyncio.new_event_loop()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        ready = threading.Event()

        async def main() -> None:
            self.server = await asyncio.start_server(self._handle, sock=sock)
            ready.set()
            with contextlib.suppress(asyncio.CancelledError):  # stop() closes it
                await self.server.serve_forever()

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(main(),), daemon=True)
        self.thread.start()
        ready.wait(10)

    async def _handle(self, reader, writer) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
            )
            await reader.readexactly(length)
            self.requests += 1
            if self.requests in self.answer:
                body = json.dumps(
                    {
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
                        ]
                    }
                ).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
                    + body
                )
                await writer.drain()
            else:
                await asyncio.sleep(self.work)
                writer.transport.abort()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.thread.join(10)


async def test_a_connection_closed_after_the_server_began_working_is_not_sent_again():
    """The request was sent and the server worked on it for a while, then the connection closed without an answer
    (a crash, an out-of-memory kill): sending it again might run the same work again, as after a read timeout."""
    server = ClosingServer(work=0.5, answer=(2, 3))
    try:
        async with client_for(f"http://127.0.0.1:{server.port}/v1", max_retries=2) as client:
            with pytest.raises(APIConnectionError, match="closed after the request was sent") as info:
                await client.generate(None, "hi")
        assert not isinstance(info.value, APITimeoutError) and "not sent again" in str(info.value)
        assert server.requests == 1
    finally:
        server.stop()


async def test_a_connection_closed_at_once_is_sent_again_once():
    """A connection that closes as soon as the request is on it was dead already (a kept-alive connection the
    server had closed): the request goes again, once."""
    server = ClosingServer(work=0.0, answer=(2,))
    try:
        async with client_for(f"http://127.0.0.1:{server.port}/v1", max_retries=2) as client:
            assert (await client.generate(None, "hi")).text == "ok"
        assert server.requests == 2
    finally:
        server.stop()
    server = ClosingServer(work=0.0)  # never answers: one more try, not max_retries more
    try:
        async with client_for(f"http://127.0.0.1:{server.port}/v1", max_retries=5) as client:
            with pytest.raises(APIConnectionError, match="closed after the request was sent"):
                await client.generate(None, "hi")
        assert server.requests == 2
    finally:
        server.stop()


async def test_headers_replace_ours_whatever_their_case_and_the_api_key_comes_from_the_environment(
    standin, monkeypatch
):
    url, record = standin.endpoint("ok")
    headers = {"authorization": "Bearer sk-from-headers", "user-agent": "my-app/1.0", "X-Extra": "1"}
    async with client_for(url, api_key="sk-from-api-key", headers=headers) as client:
        await client.generate(None, "hi")
    sent = record.raw_headers[-1]
    assert [v for k, v in sent if k == "authorization"] == ["Bearer sk-from-headers"]  # once: headers= wins
    assert [v for k, v in sent if k == "user-agent"] == ["my-app/1.0"] and ("x-extra", "1") in sent
    monkeypatch.setenv("LLAVA_NEXT_API_KEY", "sk-from-env")  # the variable `llava-next serve` reads its key from
    async with client_for(url) as client:
        await client.generate(None, "hi")
    assert record.headers[-1]["authorization"] == "Bearer sk-from-env"
    async with client_for(url, api_key="sk-given") as client:  # a key given wins over the environment's
        await client.generate(None, "hi")
    assert record.headers[-1]["authorization"] == "Bearer sk-given"
    import httpx

    # credentials the caller set on its own http_client are never replaced by the environment's key
    async with httpx.AsyncClient(headers={"Authorization": "Bearer sk-of-the-callers-client"}) as http_client:
        async with client_for(url, http_client=http_client) as client:
            await client.generate(None, "hi")
    assert [v for k, v in record.raw_headers[-1] if k == "authorization"] == ["Bearer sk-of-the-callers-client"]


async def test_a_body_that_does_not_match_its_content_encoding_is_a_connection_error_not_an_httpx_one(standin):
    url, _ = standin.endpoint("bad_encoding")
    async with client_for(url, max_retries=0) as client:
        with pytest.raises(APIConnectionError, match="could not be decoded .* Content-Encoding does not match"):
            await client.generate(None, "hi")


async def test_a_callers_http_client_keeps_the_sdks_timeouts(standin):
    """An httpx client passed to set a proxy or certificates does not bring its own 5 s default along."""
    import httpx

    url, record = standin.endpoint("slow")  # answers after 2 s
    async with httpx.AsyncClient(timeout=0.5) as http_client:
        async with client_for(url, http_client=http_client, read_timeout=10, max_retries=0) as client:
            assert (await client.generate(None, "hi")).text == "echo[0]: hi"
    assert record.count == 1


async def test_a_redirect_is_an_error_that_names_where_it_points(standin):
    url, record = standin.endpoint("redirect")
    async with client_for(url, max_retries=2) as client:
        for call in (lambda: client.generate(None, "hi"), lambda: _drain(client.stream(None, "hi"))):
            with pytest.raises(APIError, match="HTTP 308, a redirect to 'https://example.invalid") as info:
                await call()
            assert info.value.status == 308
    assert record.count == 2  # once per call: not retried


async def test_a_redirect_is_not_followed_even_by_a_callers_client_that_follows_them(standin):
    import httpx

    url, record = standin.endpoint("redirect")
    async with httpx.AsyncClient(follow_redirects=True) as http_client:
        async with client_for(url, http_client=http_client, max_retries=0) as client:
            with pytest.raises(APIError, match="HTTP 308, a redirect"):
                await client.generate(None, "hi")
    assert record.count == 1


async def _drain(stream) -> None:
    async with stream as deltas:
        async for _ in deltas:
            pass


async def test_an_image_parts_own_detail_is_kept_unless_the_call_sets_one(standin):
    from llava_next_sdk import ImagePart

    url, record = standin.endpoint("ok")
    low = ImagePart(url="https://example.invalid/cat.png", detail="low")
    async with client_for(url) as client:
        await client.generate(low, "what?")
        await client.chat(
            [{"role": "user", "content": [{"type": "image", "image": low}, {"type": "text", "text": "?"}]}]
        )
        await client.generate(low, "what?", detail="high")
    details = [
        [p["image_url"].get("detail") for p in b["messages"][-1]["content"] if p["type"] == "image_url"]
        for b in record.bodies
    ]
    assert details == [["low"], ["low"], ["high"]]


# ------------------------------------------------------------------------------------------ as openai-python does


async def test_an_error_event_mid_stream_keeps_the_request_id_and_errors_have_status_code(standin):
    url, _ = standin.endpoint("error_midstream")
    async with client_for(url) as client:
        with pytest.raises(ServerError, match="the model failed") as info:
            async with client.stream(None, "hi") as stream:
                async for _ in stream:
                    pass
    assert info.value.request_id == "req-midstream"
    assert info.value.status == info.value.status_code == 500  # openai's and ollama's name for it


async def test_usage_an_endpoint_does_not_report_is_none_not_zero(standin):
    url, _ = standin.endpoint("no_usage")
    async with client_for(url, include_usage=False) as client:
        result = await client.generate(None, "hi")
        async with client.stream(None, "hi") as stream:
            await stream.until_done()
    assert result.text == stream.text == "echo[0]: hi"
    assert result.usage is None and stream.usage is None  # zeros would read as counts


async def test_with_options_and_per_call_options_share_the_connections(standin):
    url, record = standin.endpoint("slow")  # answers after 2 s
    async with client_for(url, max_retries=0) as client:
        with pytest.raises(APITimeoutError):
            await client.with_options(timeout=0.3).generate(None, "hi")
        with pytest.raises(APITimeoutError):
            await client.generate(None, "hi", timeout=0.3)
        assert (await client.generate(None, "hi")).text == "echo[0]: hi"  # the client's own options are unchanged
        url, record = standin.endpoint("always_502")
    async with client_for(url, max_retries=0) as client:
        with pytest.raises(ServerError):
            await client.with_options(max_retries=2).generate(None, "hi")
        assert record.count == 3
        with pytest.raises(ServerError):
            await client.generate(None, "hi", max_retries=1, extra_headers={"X-Call": "one"})
        assert record.count == 5 and record.headers[-1]["x-call"] == "one"
        twin = client.with_options(headers={"X-Twin": "2"})
        with pytest.raises(ServerError):
            await twin.generate(None, "hi")
        assert record.headers[-1]["x-twin"] == "2" and record.headers[-1]["user-agent"].startswith("llava-next-sdk")
        assert client.transport._pools is twin.transport._root._pools  # one pool for both
        await twin.aclose()  # closes only the twin
        with pytest.raises(ServerError):
            await client.generate(None, "hi")
        with pytest.raises(LlavaNextError, match="closed"):
            await twin.generate(None, "hi")
    with pytest.raises(LlavaNextError, match="closed"):  # closing the client closed its twins
        await client.with_options(timeout=5).generate(None, "hi")
    with pytest.raises(BadRequestError, match="timeout='soon' is invalid"):
        await client_for(url).generate(None, "hi", timeout="soon")
    tuned = client_for(url, connect_timeout=30, read_timeout=500).with_options(timeout=1800).transport
    assert (tuned.total_timeout, tuned.timeout.connect, tuned.timeout.read) == (1800, 30, 500)  # phases kept
    capped = client_for(url, read_timeout=500).with_options(timeout=100).transport
    assert (capped.total_timeout, capped.timeout.read) == (100, 100)  # none longer than the total


async def test_closing_the_client_while_a_stream_is_read_says_so(standin):
    url, _ = standin.endpoint("endless")
    client = client_for(url)
    async with client.stream(None, "hi") as stream:
        await stream.__anext__()
        await client.aclose()
        with pytest.raises(APIConnectionError, match="the client was closed while this call was running"):
            async for _ in stream:
                pass


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_connections_of_an_event_loop_are_closed_when_it_ends(standin, backend):
    url, _ = standin.endpoint("ok")
    client = client_for(url)

    def in_a_thread(client: AsyncClient) -> None:  # a second loop, running while the main thread's come and go
        anyio.run(client.generate, None, "from a thread", backend=backend)

    gc.collect()  # what earlier tests left is theirs
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", ResourceWarning)
        thread = threading.Thread(target=in_a_thread, args=(client,))
        thread.start()
        for i in range(3):  # each run is a new loop, with a pool of its own: no one but the loop's end closes it
            assert anyio.run(client.generate, None, f"call {i}", backend=backend).text == f"echo[0]: call {i}"
        thread.join(60)
        anyio.run(client.aclose, backend=backend)
        del client
        gc.collect()
    assert [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)] == []


def test_an_http_client_serves_one_event_loop_after_another_and_several_at_once(standin):
    url, record = standin.endpoint("ok")
    client = client_for(url)
    for i in range(3):  # each asyncio.run is a new loop: connections of the last one cannot serve it
        assert asyncio.run(client.generate(None, f"call {i}")).text == f"echo[0]: call {i}"
    results: list = []

    def in_a_thread(i: int) -> None:
        async def calls():
            return [(await client.generate(None, f"t{i} {n}")).text for n in range(5)]

        results.extend(asyncio.run(calls()))

    threads = [threading.Thread(target=in_a_thread, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == sorted(f"echo[0]: t{i} {n}" for i in range(4) for n in range(5))
    assert len(client.transport._pools) <= 1 + 4  # ended loops' pools are dropped when a new loop comes
    asyncio.run(client.aclose())
