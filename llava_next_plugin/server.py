"""The OpenAI-compatible HTTP server over the engine: a Starlette app and its uvicorn runner.

Routes::

    POST /v1/chat/completions   non-stream JSON, or SSE with ``"stream": true`` (``stream_options.include_usage``)
    GET  /v1/models             the one model served
    GET  /health                ``{"status": "ok" | "draining", "queue_depth", "batch_size"}``
    GET  /metrics               Prometheus text: requests, tokens, queue depth, batch size, latency

Every response carries ``x-request-id`` (the client's, if it sent a sane one). Errors are OpenAI-shaped
(``{"error": {"message", "type", "param", "code"}}``) with the status of their ``llava_next_sdk.errors``
class. Request bodies are parsed by ``llava_next_sdk.wire`` and checked by :mod:`llava_next_plugin.validation`,
exactly as the SDK's local transport does; a request the engine's queue cannot take gets 429 before its images
are fetched or decoded, and at most ``max_preparing`` requests prepare images at once. A client that disconnects
cancels its generation. On SIGTERM,
uvicorn stops accepting connections and waits for the requests in flight (up to the drain timeout), then the
engine drains and stops.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from llava_next_sdk import wire
from llava_next_sdk.errors import (
    AuthenticationError,
    BadRequestError,
    LlavaNextError,
    NotFoundError,
    OverloadedError,
    ServerError,
)

from .engine import Engine, RequestHandle
from .validation import Limits, prepare_request

__all__ = ["create_app", "run_server", "serve_in_thread", "RunningServer"]

logger = logging.getLogger(__name__)

JSON_ON_LOOP_BYTES = 64 * 1024  # request bodies up to this size are parsed on the event loop, larger in a thread
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))


@dataclass
class _Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(self.buckets):
            if seconds <= bound:
                self.counts[i] += 1
        self.total += seconds
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        out = []
        for bound, count in zip(self.buckets, self.counts):
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{{labels}{"," if labels else ""}le="{le}"}} {count}')
        suffix = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{suffix} {self.total}", f"{name}_count{suffix} {self.count}"]
        return out


def _label_value(text: str) -> str:
    """*text* escaped for a Prometheus label value (backslash, double quote, newline)."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counters for ``/metrics``: HTTP requests by route and status, chat latency and time to first token.

    Requests are labelled by route (``route_paths``); any other path counts as ``"other"``, so the label
    set stays bounded whatever paths clients send, authenticated or not.
    """

    def __init__(self, route_paths: tuple[str, ...] = ()) -> None:
        self.lock = threading.Lock()
        self.route_paths = frozenset(route_paths)
        self.requests: dict[tuple[str, int], int] = {}
        self.latency = _Histogram()
        self.first_token = _Histogram()

    def count_request(self, path: str, status: int) -> None:
        key = (path if path in self.route_paths else "other", int(status))
        with self.lock:
            self.requests[key] = self.requests.get(key, 0) + 1

    def render(self, engine: Engine) -> str:
        stats = engine.stats
        lines = ["# HELP llava_next_http_requests_total HTTP requests by path and status.",
                 "# TYPE llava_next_http_requests_total counter"]
        with self.lock:
            for (path, status), count in sorted(self.requests.items()):
                labels = f'path="{_label_value(path)}",status="{status}"'
                lines.append(f"llava_next_http_requests_total{{{labels}}} {count}")
            lines += ["# HELP llava_next_request_duration_seconds Chat completion latency, request to last token.",
                      "# TYPE llava_next_request_duration_seconds histogram"]
            lines += self.latency.lines("llava_next_request_duration_seconds")
            lines += ["# HELP llava_next_time_to_first_token_seconds Request to first generated token.",
                      "# TYPE llava_next_time_to_first_token_seconds histogram"]
            lines += self.first_token.lines("llava_next_time_to_first_token_seconds")
        lines += ["# HELP llava_next_generations_total Engine requests by outcome.",
                  "# TYPE llava_next_generations_total counter"]
        for key in sorted(k for k in stats if k.startswith("requests_")):
            outcome = _label_value(key[len("requests_"):])
            lines.append(f'llava_next_generations_total{{outcome="{outcome}"}} {stats[key]}')
        for name, key, what in (("prompt_tokens", "prompt_tokens", "Prompt tokens processed (images included)."),
                                ("completion_tokens", "completion_tokens", "Tokens generated."),
                                ("image_tokens", "image_tokens", "Prompt tokens that stand for images.")):
            lines += [f"# HELP llava_next_{name}_total {what}", f"# TYPE llava_next_{name}_total counter",
                      f"llava_next_{name}_total {stats[key]}"]
        lines += ["# HELP llava_next_queue_depth Requests waiting to join the batch.",
                  "# TYPE llava_next_queue_depth gauge", f"llava_next_queue_depth {engine.queue_depth}",
                  "# HELP llava_next_batch_size Requests decoding now.",
                  "# TYPE llava_next_batch_size gauge", f"llava_next_batch_size {engine.batch_size}"]
        return "\n".join(lines) + "\n"


def error_response(error: LlavaNextError) -> JSONResponse:
    """The OpenAI-shaped JSON response for *error*."""
    headers = {}
    if isinstance(error, OverloadedError) and error.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after)))
    if isinstance(error, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(wire.build_error_body(error), status_code=error.status or 500, headers=headers)


def _request_id(scope: dict) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if 0 < len(text) <= 128 and text.isprintable():
                return text
    return f"req-{uuid.uuid4().hex}"


class _Front:
    """ASGI middleware: a request id on every response, the API key check, and request counting."""

    def __init__(self, app, api_key: str | None, metrics: Metrics) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.metrics = metrics

    def _authorized(self, scope: dict) -> bool:
        if self.api_key is None or not scope["path"].startswith("/v1/"):
            return True
        header = dict(scope.get("headers", ())).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        # compare_digest on equal-length inputs only leaks nothing but that the lengths differ
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        status = [500]

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": list(message.get("headers", [])) +
                           [(b"x-request-id", request_id.encode("latin-1"))]}
            await send(message)

        try:
            if not self._authorized(scope):
                error = AuthenticationError("missing or wrong API key; send the header 'Authorization: Bearer <key>'")
                await error_response(error)(scope, receive, send_with_id)
                return
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.count_request(scope["path"], status[0])


async def _read_json(request: Request, max_bytes: int) -> Any:
    declared = request.headers.get("content-length")
    too_big = BadRequestError(f"the request body is larger than {max_bytes} bytes; send fewer or smaller images",
                              status=413, param=None)
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_big
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        if len(body) > JSON_ON_LOOP_BYTES:  # megabytes of base64 images: parse off the event loop
            return await anyio.to_thread.run_sync(json.loads, body)
        return json.loads(body)
    except ValueError as exc:
        raise BadRequestError(f"the request body is not valid JSON ({exc})", param=None) from None


def create_app(engine: Engine, *, limits: Limits | None = None, api_key: str | None = None,
               model_name: str | None = None, drain_timeout: float = 30.0,
               shutdown_engine: bool = True, max_preparing: int = 4) -> Starlette:
    """The ASGI app serving *engine*.

    Args:
        engine: a started :class:`Engine` (the app shuts it down, draining, when the server stops).
        limits: request limits (images, sizes, allowed URL hosts, body size).
        api_key: when set, ``/v1/*`` needs ``Authorization: Bearer <api_key>``.
        model_name: the id reported by ``/v1/models`` and in responses (default: the engine's).
        drain_timeout: seconds the engine may take to finish its requests at shutdown.
        shutdown_engine: shut the engine down (draining) when the app stops; False for an engine that
            outlives the app (shared with other apps or in-process clients).
        max_preparing: requests whose images are fetched, decoded and preprocessed at once, at most;
            others wait their turn. A request the engine's queue cannot take is refused (429) before
            any of that work, and again after waiting.
    """
    limits = limits or Limits()
    name = model_name or engine.model_name
    metrics = Metrics()

    async def chat_completions(request: Request) -> Response:
        try:
            body = await _read_json(request, limits.max_body_bytes)
            parsed = wire.parse_chat_request(body)
            engine.check_admission()  # cheap: a full queue answers 429 before any image work
            prepared = await anyio.to_thread.run_sync(_admit_and_prepare, parsed.request, limiter=_preparing())
            handle = engine.submit(prepared)
        except LlavaNextError as error:
            return error_response(error)
        if parsed.stream:
            return StreamingResponse(_stream(handle, parsed.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            result = await _result_unless_disconnected(request, handle)
        except LlavaNextError as error:
            return error_response(error)
        _observe(result)
        return JSONResponse(wire.build_chat_response(result.to_generation_result(name), request_id=handle.id,
                                                     model=name))

    preparing: list[anyio.CapacityLimiter] = []  # made on first use, inside the server's event loop

    def _preparing() -> anyio.CapacityLimiter:
        if not preparing:
            preparing.append(anyio.CapacityLimiter(max_preparing))
        return preparing[0]

    def _admit_and_prepare(chat_request):
        engine.check_admission()  # again: the queue may have filled while this request waited its turn
        return prepare_request(engine, chat_request, limits)

    async def _result_unless_disconnected(request: Request, handle: RequestHandle):
        async with anyio.create_task_group() as group:
            async def cancel_on_disconnect() -> None:
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                handle.cancel()

            group.start_soon(cancel_on_disconnect)
            try:
                return await handle.aresult()
            finally:
                group.cancel_scope.cancel()

    def _observe(result) -> None:
        with metrics.lock:
            metrics.latency.observe(result.total_seconds)
            metrics.first_token.observe(result.time_to_first_token)

    async def _stream(handle: RequestHandle, include_usage: bool):
        created = int(time.time())

        def chunk(**kwargs) -> bytes:
            return wire.encode_sse(wire.build_stream_chunk(request_id=handle.id, model=name, created=created,
                                                           **kwargs))

        try:
            yield chunk(role="assistant", delta="")
            async for delta in handle:
                yield chunk(delta=delta)
            result = await handle.aresult()
            _observe(result)
            yield chunk(finish_reason=result.finish_reason)
            if include_usage:
                final = result.to_generation_result(name)
                yield chunk(usage=final.usage, timings=final.timings)
        except LlavaNextError as error:
            body = wire.build_error_body(error)
            body["error"]["status"] = error.status or 500
            yield wire.encode_sse(body)
        finally:
            handle.cancel()  # no-op when finished; stops generation when the client went away
        yield wire.SSE_DONE

    async def models(request: Request) -> Response:
        return JSONResponse(wire.build_models_list([name]))

    async def health(request: Request) -> Response:
        draining = not engine._accepting
        return JSONResponse({"status": "draining" if draining else "ok", "model": name,
                             "queue_depth": engine.queue_depth, "batch_size": engine.batch_size},
                            status_code=503 if draining else 200)

    async def prometheus(request: Request) -> Response:
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            error: LlavaNextError = NotFoundError(f"no route {request.method} {request.url.path}; see /v1/models, "
                                                  "/v1/chat/completions, /health, /metrics")
        else:
            error = BadRequestError(f"{request.method} {request.url.path}: {exc.detail}", status=exc.status_code)
        return error_response(error)

    async def server_error(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error in %s", request.url.path)
        return error_response(ServerError(f"internal error: {exc!r}"))

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        if shutdown_engine:
            await anyio.to_thread.run_sync(lambda: engine.shutdown(drain=True, timeout=drain_timeout))

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", prometheus, methods=["GET"])]
    metrics.route_paths = frozenset(route.path for route in routes)
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan)
    app.add_middleware(_Front, api_key=api_key, metrics=metrics)
    app.state.engine = engine
    app.state.metrics = metrics
    return app


def _uvicorn_config(app, host: str, port: int, log_level: str, drain_timeout: float):
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                          timeout_graceful_shutdown=drain_timeout, access_log=log_level == "debug")


def run_server(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
               drain_timeout: float = 30.0) -> None:
    """Serve *app* with uvicorn until SIGINT/SIGTERM; in-flight requests finish first (up to *drain_timeout*).

    Returns normally after a drained shutdown (exit status 0): uvicorn re-raises the signal it caught to
    the handler that was installed before it, which here only notes it.
    """
    import signal

    import uvicorn

    def stopped(signum, frame) -> None:
        logger.info("stopped by %s after draining", signal.Signals(signum).name)

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, stopped)
    uvicorn.Server(_uvicorn_config(app, host, port, log_level, drain_timeout)).run()


class RunningServer:
    """A uvicorn server on its own thread (for tests, benchmarks and notebooks). ``url`` ends in ``/v1``."""

    def __init__(self, server, thread: threading.Thread) -> None:
        self._server, self._thread = server, thread
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}/v1"

    def stop(self, timeout: float = 30.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_in_thread(app, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                    drain_timeout: float = 30.0) -> RunningServer:
    """Start *app* on a free port (``port=0``) in a background thread; return when it accepts connections."""
    import uvicorn

    server = uvicorn.Server(_uvicorn_config(app, host, port, log_level, drain_timeout))
    thread = threading.Thread(target=server.run, name="llava-next-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    return RunningServer(server, thread)
