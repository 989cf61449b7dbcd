"""A small stand-in for third-party OpenAI-compatible endpoints, served by uvicorn on 127.0.0.1.

Its bodies are written out by hand from OpenAI's documented shapes (not built with our ``wire``
module), so the SDK's parsing is checked against an independent server. Each URL names a scenario
and a key: ``http://127.0.0.1:PORT/<scenario>/<key>/v1``; the key's :class:`Record` says what the
server saw (request count, bodies, headers, concurrency, whether a stream's client went away).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route


@dataclass
class Record:
    count: int = 0
    bodies: list = field(default_factory=list)
    headers: list = field(default_factory=list)
    raw_headers: list = field(default_factory=list)  # each request's (name, value) pairs, as sent
    in_flight: int = 0
    max_in_flight: int = 0
    stream_closed: threading.Event = field(default_factory=threading.Event)
    chunks_sent: int = 0


def _user_text(body: dict) -> tuple[str, int]:
    """The last user message's text and the number of images in the request."""
    text, images = "", 0
    for message in body.get("messages", []):
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts:
            if part.get("type") == "image_url":
                images += 1
            elif part.get("type") == "text" and message.get("role") == "user":
                text = part["text"]
    return text, images


def _completion(body: dict) -> tuple[str, dict]:
    text, images = _user_text(body)
    answer = f"echo[{images}]: {text}"
    usage = {
        "prompt_tokens": 7 + 10 * images,
        "completion_tokens": len(answer.split()),
        "total_tokens": 7 + 10 * images + len(answer.split()),
    }
    if images:
        usage["prompt_tokens_details"] = {"cached_tokens": 0, "image_tokens": 10 * images}
    return answer, usage


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def _chunk(delta: dict, finish_reason=None) -> dict:
    return {
        "id": "chatcmpl-standin",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "standin",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def _ok(body: dict):
    answer, usage = _completion(body)
    if not body.get("stream"):
        return JSONResponse(
            {
                "id": "chatcmpl-standin",
                "object": "chat.completion",
                "created": 1,
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer},
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": usage,
            },
            headers={"x-request-id": "req-standin"},
        )

    async def events():
        yield _sse(_chunk({"role": "assistant", "content": ""}))
        words = answer.split(" ")
        for i, word in enumerate(words):
            yield _sse(_chunk({"content": word if i == 0 else " " + word}))
        yield _sse(_chunk({}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            yield _sse(
                {
                    "id": "chatcmpl-standin",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": "standin",
                    "choices": [],
                    "usage": usage,
                }
            )
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _error(status: int, message: str, code: str | None, headers: dict | None = None):
    return JSONResponse(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}},
        status_code=status,
        headers=headers,
    )


async def _scenario(name: str, record: Record, body: dict):
    if name == "ok":
        return _ok(body)
    if name == "ignores_stream":  # answers every request with a plain JSON completion
        return _ok({**body, "stream": False})
    if name == "rate_limited":  # 429 with Retry-After once, then fine
        if record.count == 1:
            return _error(429, "Rate limit reached, retry in 1s", "rate_limit_exceeded", {"Retry-After": "1"})
        return _ok(body)
    if name == "retry_after_ms":  # OpenAI's finer header beside a long Retry-After, once; then a 409 once
        if record.count == 1:
            return _error(429, "Slow down", "rate_limit_exceeded", {"Retry-After": "30", "retry-after-ms": "200"})
        if record.count == 2:
            return _error(409, "Conflict: try again", None)
        return _ok(body)
    if name == "retry_after_long":
        return _error(429, "Quota exhausted", "rate_limit_exceeded", {"Retry-After": "3600"})
    if name == "flaky":  # one 500, then fine
        if record.count == 1:
            return PlainTextResponse("Internal Server Error", status_code=500)
        return _ok(body)
    if name == "always_502":
        return PlainTextResponse("bad gateway", status_code=502)
    if name == "unauthorized":
        return _error(401, "Incorrect API key provided", "invalid_api_key")
    if name == "bad_param":
        return _error(400, "Unrecognized request argument supplied: foo", "unsupported_parameter")
    if name == "context":
        return _error(
            400, "This model's maximum context length is 4096 tokens, you requested 5000", "context_length_exceeded"
        )
    if name == "redirect":  # an http -> https move, say: the client must not turn its POST into a GET
        return PlainTextResponse("", status_code=308, headers={"Location": "https://example.invalid/v1/chat"})
    if name == "slow":
        await asyncio.sleep(2.0)
        return _ok(body)
    if name == "drip":  # headers at once, then one byte every 0.2 s (whitespace, or an SSE comment): ~10 s

        async def drip():
            for _ in range(50):
                await asyncio.sleep(0.2)
                yield b":\n" if body.get("stream") else b" "
            answer, usage = _completion(body)
            yield json.dumps(
                {
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
                    ],
                    "usage": usage,
                }
            ).encode()

        return StreamingResponse(drip(), media_type="text/event-stream" if body.get("stream") else "application/json")
    if name == "concurrent":
        record.in_flight += 1
        record.max_in_flight = max(record.max_in_flight, record.in_flight)
        try:
            await asyncio.sleep(0.1)
        finally:
            record.in_flight -= 1
        return _ok(body)
    if name == "midstream":  # two deltas, then the connection breaks

        async def broken():
            yield _sse(_chunk({"role": "assistant", "content": "partial"}))
            yield _sse(_chunk({"content": " answer"}))
            await asyncio.sleep(0.05)
            raise RuntimeError("the stand-in server dies mid-stream")

        return StreamingResponse(broken(), media_type="text/event-stream")
    if name == "done_then_hang":  # a whole stream, then the body stays open for 5 s

        async def hang_after_done():
            answer, usage = _completion(body)
            yield _sse(_chunk({"role": "assistant", "content": answer.split(" ")[0]}))
            yield _sse(_chunk({"content": " " + answer.split(" ", 1)[1]}, finish_reason="stop"))
            yield b"data: [DONE]\n\n"
            await asyncio.sleep(5)

        return StreamingResponse(hang_after_done(), media_type="text/event-stream")
    if name == "bad_encoding":  # a proxy's mistake: says gzip, sends plain JSON
        answer, usage = _completion(body)
        return PlainTextResponse(
            json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]}),
            headers={"content-encoding": "gzip", "content-type": "application/json"},
        )
    if name == "endless":  # a delta every 20 ms until the client goes away (at most ~10 s)

        async def endless():
            try:
                for i in range(500):
                    record.chunks_sent += 1
                    yield _sse(_chunk({"content": f"tok{i} "}))
                    await asyncio.sleep(0.02)
            finally:
                record.stream_closed.set()

        return StreamingResponse(endless(), media_type="text/event-stream")
    if name == "no_usage":  # an endpoint that reports no usage, streamed or not
        response = _ok({**body, "stream_options": {}})
        if isinstance(response, JSONResponse):
            data = json.loads(response.body)
            del data["usage"]
            return JSONResponse(data)
        return response
    if name == "error_midstream":  # a delta, then an error event (as vLLM and we send one), the id in a header

        async def failing():
            yield _sse(_chunk({"role": "assistant", "content": "partial"}))
            yield _sse({"error": {"message": "the model failed", "type": "server_error", "param": None, "code": 500}})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(failing(), media_type="text/event-stream", headers={"x-request-id": "req-midstream"})
    return PlainTextResponse(f"unknown scenario {name}", status_code=404)


class StandinServer:
    """The stand-in, on a random loopback port, in a uvicorn thread."""

    def __init__(self) -> None:
        self.records: dict[str, Record] = {}
        app = Starlette(routes=[Route("/{scenario}/{key}/v1/chat/completions", self._chat, methods=["POST"])])
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._server = uvicorn.Server(
            uvicorn.Config(app, log_level="error", lifespan="off", timeout_graceful_shutdown=1)
        )
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    async def _chat(self, request: Request):
        record = self.records.setdefault(request.path_params["key"], Record())
        record.count += 1
        body = await request.json()
        record.bodies.append(body)
        record.headers.append(dict(request.headers))
        record.raw_headers.append([(k.decode().lower(), v.decode()) for k, v in request.headers.raw])
        return await _scenario(request.path_params["scenario"], record, body)

    def start(self) -> StandinServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the stand-in server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)

    def endpoint(self, scenario: str) -> tuple[str, Record]:
        """A fresh ``base_url`` for *scenario* and the record of what the server sees there."""
        key = uuid.uuid4().hex
        record = self.records.setdefault(key, Record())
        return f"http://127.0.0.1:{self.port}/{scenario}/{key}/v1", record
