"""The OpenAI-compatible HTTP server over the engine: a Starlette app and its uvicorn runner.

Routes::

    POST /v1/chat/completions   non-stream JSON, or SSE with ``"stream": true`` (``stream_options.include_usage``)
    GET  /v1/models             the one model served
    GET  /health                ``{"status": "ok" | "draining" | "stopped", "model", "queue_depth", "batch_size"}``
                                (503 unless ok; ``stopped``: the engine stopped by a fault, see the log)
    GET  /metrics               Prometheus text (``prometheus_client``, one registry per app)

Every request has one id: the client's ``x-request-id`` when it sent a sane one, else ``chatcmpl-<hex>``
(``req-<hex>`` off the chat route). It is the response's ``x-request-id`` header, the completion's ``id`` and
the engine's request id, and every log line about the request names it.

Errors are OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``) with the status of their
``llava_next_sdk.errors`` class. Any malformed body is a 400; a model other than the one served is a 404
``model_not_found``. An unexpected failure is logged once, with its traceback and request id, and answered
``500 internal error, request id X``, nothing more; the connection stays usable (keep-alive) after any error.
Request bodies are parsed by ``llava_next_sdk.wire`` and checked by :mod:`llava_next_plugin.validation`,
exactly as the SDK's local transport does; a request the engine's queue cannot take gets 429 before its images
are fetched or decoded. A request's image URLs are fetched all at once, on threads apart from the CPU work (a
slow host delays only its own requests); then at most ``max_preparing`` requests decode and preprocess images at
once, and their decoded pixels share one :class:`~llava_next_plugin.validation.PixelBudget`. A client that
disconnects cancels its generation.

On SIGTERM (or SIGINT) the server drains: ``/health`` answers 503 ``draining``, new chat requests get 503 with
``Retry-After``, and the requests in flight run to their end, up to the drain timeout; then whatever still runs
is cut (a stream gets an error event ``server shutting down`` before it closes) and the server stops.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
from llava_next_sdk import wire
from llava_next_sdk.errors import (
    AuthenticationError,
    BadRequestError,
    LlavaNextError,
    ModelNotFoundError,
    NotFoundError,
    OverloadedError,
    RequestCancelledError,
    ServerError,
)
from llava_next_sdk.types import ImagePart
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ._hub import default_served_name
from .engine import Engine, EngineResult, RequestHandle
from .errors import first_line
from .validation import (
    Budget,
    Limits,
    PixelBudget,
    check_message_count,
    check_part_counts,
    check_request,
    fetch_image,
    in_worker_thread,
    prepare_request,
)

__all__ = ["create_app", "run_server", "serve_in_thread", "RunningServer", "default_served_name"]

logger = logging.getLogger(__name__)

JSON_ON_LOOP_BYTES = 64 * 1024  # request bodies up to this size are parsed on the event loop, larger in a thread
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_T = TypeVar("_T")

CLIENT_CLOSED = 499  # nginx's status for a client that went away before the answer: counted, never sent
SHUTDOWN_RETRY_AFTER = 5.0  # seconds a client is asked to wait when this server is shutting down


# ---------------------------------------------------------------------------------------------- metrics


class _EngineCollector:
    """The engine's counters and gauges, read (a consistent copy) whenever ``/metrics`` is scraped."""

    def __init__(self, engine: Engine, budget: PixelBudget, in_flight: Callable[[], int]) -> None:
        self.engine, self.budget, self.in_flight = engine, budget, in_flight

    def describe(self):
        return []  # unchecked: the families depend on what the engine has counted

    def collect(self):
        stats = self.engine.stats_snapshot()
        outcomes = CounterMetricFamily("llava_next_generations", "Engine requests by outcome.", labels=["outcome"])
        for key in sorted(k for k in stats if k.startswith("requests_")):
            outcomes.add_metric([key[len("requests_") :]], stats[key])
        yield outcomes
        for name, key, what in (
            ("prompt_tokens", "prompt_tokens", "Prompt tokens of requests that started (images and reused too)."),
            ("prompt_tokens_reused", "prefix_reused_tokens", "Prompt tokens whose KV was reused, not prefilled."),
            ("completion_tokens", "completion_tokens", "Tokens generated."),
            ("image_tokens", "image_tokens", "Prompt tokens that stand for images."),
        ):
            yield CounterMetricFamily(f"llava_next_{name}", what, value=stats.get(key, 0))
        yield GaugeMetricFamily(
            "llava_next_queue_depth", "Requests waiting to join the batch.", value=self.engine.queue_depth
        )
        yield GaugeMetricFamily("llava_next_batch_size", "Requests decoding now.", value=self.engine.batch_size)
        yield GaugeMetricFamily(
            "llava_next_kv_slots_usable",
            "KV slots not retired after device errors (the batch's capacity; at 0 the engine stops).",
            value=self.engine.usable_slots,
        )
        yield GaugeMetricFamily(
            "llava_next_requests_in_flight",
            "Chat requests being read, prepared or generated (what a drain waits for).",
            value=self.in_flight(),
        )
        yield GaugeMetricFamily(
            "llava_next_image_pixels_in_flight",
            "Image pixels being decoded and preprocessed.",
            value=self.budget.in_use,
        )


class Metrics:
    """``/metrics`` for one app: its own ``prometheus_client`` registry (so two apps in one process never share
    counts), HTTP requests by route and status, and histograms of latency, time to first token and queue wait.

    Requests are labelled by route (``route_paths``); any other path counts as ``"other"``, so the label
    set stays bounded whatever paths clients send, authenticated or not.
    """

    def __init__(
        self, engine: Engine, budget: PixelBudget, in_flight: Callable[[], int], route_paths: tuple[str, ...] = ()
    ) -> None:
        self.registry = CollectorRegistry()
        self.route_paths = frozenset(route_paths)
        self.requests = Counter(
            "llava_next_http_requests", "HTTP requests by path and status.", ["path", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "llava_next_request_duration_seconds",
            "Chat completion latency, request to last token.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_token = Histogram(
            "llava_next_time_to_first_token_seconds",
            "Request to first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "llava_next_queue_wait_seconds",
            "Time a request waited to join the batch.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine, budget, in_flight))

    def count_request(self, path: str, status: int) -> None:
        self.requests.labels(path if path in self.route_paths else "other", str(int(status))).inc()

    def observe(self, result: EngineResult) -> None:
        self.latency.observe(result.total_seconds)
        self.first_token.observe(result.time_to_first_token)
        self.queue_wait.observe(result.queue_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# ---------------------------------------------------------------------------------------------- errors


def _json_response(body: Any, status: int = 200, headers: dict | None = None) -> Response:
    # ASCII-escaped: a client's lone surrogate, quoted back in an error, cannot break the encoding
    return Response(
        json.dumps(body, ensure_ascii=True, separators=(",", ":")),
        status_code=status,
        headers=headers,
        media_type="application/json",
    )


def error_response(error: LlavaNextError) -> Response:
    """The OpenAI-shaped JSON response for *error* (``Retry-After`` for overload, ``WWW-Authenticate`` for 401)."""
    headers = {}
    if isinstance(error, OverloadedError) and error.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after)))
    if isinstance(error, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    return _json_response(wire.build_error_body(error), error.status or 500, headers)


def _internal(request_id: str) -> ServerError:
    return ServerError(f"internal error, request id {request_id}")


def _shutting_down() -> OverloadedError:
    return OverloadedError(
        "server shutting down; retry shortly (another instance may answer)",
        status=503,
        retry_after=SHUTDOWN_RETRY_AFTER,
    )


def _request_id(scope: dict) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if 0 < len(text) <= 128 and text.isprintable():
                return text
    return ("chatcmpl-" if scope.get("path") == "/v1/chat/completions" else "req-") + uuid.uuid4().hex


class _Front:
    """ASGI middleware: the request id, the API key check, request counting, and the last line of defence:
    an exception that escaped a route is logged once and answered 500 here, so it never reaches uvicorn
    (which would log it again and close the keep-alive connection)."""

    def __init__(self, app, api_key: str | None, metrics: Metrics, echo_request_id: bool = True) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.metrics = metrics
        self.echo_request_id = echo_request_id

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
        status = [CLIENT_CLOSED]
        started = [False]

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status[0], started[0] = message["status"], True
                if self.echo_request_id:
                    headers = list(message.get("headers", [])) + [(b"x-request-id", request_id.encode("latin-1"))]
                    message = {**message, "headers": headers}
            await send(message)

        try:
            if not self._authorized(scope):
                error = AuthenticationError("missing or wrong API key; send the header 'Authorization: Bearer <key>'")
                await error_response(error)(scope, receive, send_with_id)
                return
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            logger.info("request %s: the client went away before its request was read", request_id)
        except Exception:
            logger.exception("request %s: unhandled error in %s %s", request_id, scope.get("method"), scope["path"])
            if not started[0]:
                try:
                    await error_response(_internal(request_id))(scope, receive, send_with_id)
                except OSError:
                    pass
            status[0] = 500
        finally:
            state = scope["state"]
            if status[0] < 400 and state.get("client_closed"):  # a stream the client left
                status[0] = CLIENT_CLOSED
            elif status[0] < 400 and state.get("stream_status"):  # a stream that ended with an error event
                status[0] = state["stream_status"]
            self.metrics.count_request(scope["path"], status[0])


def _held_bytes(capacity: int, what: str) -> Budget:
    """Bytes held in memory by requests at once (bodies being received, images fetched), against *capacity*: a
    request whose bytes would pass it is refused with 429 rather than waited for."""
    return Budget(
        capacity,
        lambda held, wanted, bound: (
            f"the server holds {held} bytes of {what}; {wanted} more would pass its bound of {bound}; retry later"
        ),
    )


async def _read_json(request: Request, max_bytes: int, seconds: float, max_messages: int, receiving: Budget) -> Any:
    """The request's JSON body, received within *seconds* (408 beyond) and at most *max_bytes* (413), with at
    most *max_messages* messages, as many content parts in one, and :data:`~.validation.PARTS_PER_MESSAGE` times
    as many in all (400): all before any of it is parsed further. Its bytes count in *receiving* as they
    arrive (429 past its bound) until it is parsed: a client that sends slowly holds what it has sent, not a
    place that others wait for."""
    with anyio.move_on_after(seconds) as scope:
        body = await _receive_json(request, max_bytes, receiving)
    if scope.cancelled_caught:
        raise BadRequestError(
            f"the request body did not arrive within {seconds:g} s (--body-timeout); send it at once",
            status=408,
            param=None,
        )
    messages = body.get("messages") if isinstance(body, dict) else None
    if isinstance(messages, list):  # the same checks as validation.check_request's, before the body is parsed
        check_message_count(len(messages), max_messages)
        check_part_counts(
            [len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)],
            max_messages,
        )
    return body


async def _receive_json(request: Request, max_bytes: int, receiving: Budget) -> Any:
    declared = request.headers.get("content-length")
    too_big = BadRequestError(
        f"the request body is larger than {max_bytes} bytes (--max-body-bytes); send fewer or smaller images",
        status=413,
        param=None,
    )
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_big
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise BadRequestError(
            f"the request body is sent with Content-Encoding {encoding!r}, which this server does not decode; "
            "send the JSON uncompressed",
            status=415,
            param=None,
        )
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            if size + len(chunk) > max_bytes:
                raise too_big
            receiving.take(len(chunk))
            size += len(chunk)
            chunks.append(chunk)
        body = b"".join(chunks)
        chunks.clear()
        try:
            if len(body) > JSON_ON_LOOP_BYTES:  # megabytes of base64 images: parse off the event loop
                return await in_worker_thread(json.loads, body)
            return json.loads(body)
        except RecursionError:
            raise BadRequestError(
                "the request body nests JSON too deeply; a chat request needs a few levels", param=None
            ) from None
        except ValueError as exc:  # UnicodeDecodeError included
            raise BadRequestError(f"the request body is not valid JSON ({first_line(exc)})", param=None) from None
    finally:
        receiving.give(size)


# ---------------------------------------------------------------------------------------------- drain


class _Drain:
    """The chat requests in flight, and the drain at shutdown: refuse new work, wait for the rest, then cut
    what is left (each cut request told ``server shutting down``)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.active = 0
        self.handles: set[RequestHandle] = set()
        self.cut_ids: set[str] = set()
        self.draining = False
        self.cutting = False
        self.hurried = False
        self.waiting = False  # in wait(), before it cuts: what a second signal can hurry
        self.cut_by = "the drain timeout"  # or "a second signal": who made wait() cut, when it did

    def enter(self) -> None:
        with self._changed:
            self.active += 1

    def leave(self) -> None:
        with self._changed:
            self.active -= 1
            self._changed.notify_all()

    def track(self, handle: RequestHandle) -> None:
        with self._changed:
            self.handles.add(handle)
        if self.cutting:
            self._cut(handle)

    def untrack(self, handle: RequestHandle) -> None:
        with self._changed:
            self.handles.discard(handle)

    def _cut(self, handle: RequestHandle) -> None:
        with self._changed:
            self.cut_ids.add(handle.id)
        handle.cancel()

    def was_cut(self, handle: RequestHandle) -> bool:
        return handle.id in self.cut_ids

    def begin(self) -> None:
        self.draining = True

    def hurry(self) -> None:
        """End the wait now (a second signal): what is still in flight is cut at once."""
        with self._changed:
            self.hurried = True
            self._changed.notify_all()

    def wait(self, timeout: float, grace: float = 5.0) -> int:
        """Block until no chat request is in flight, at most *timeout* seconds (or until :meth:`hurry`); then cut
        the rest and give them *grace* seconds to send their last event. Returns how many were cut."""
        deadline = time.monotonic() + timeout
        with self._changed:
            self.waiting = True
            while self.active and not self.hurried and time.monotonic() < deadline:
                self._changed.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            self.waiting = False
            if not self.active:
                return 0
            if self.hurried:  # a second signal: the streams cut get a second to send their last event
                self.cut_by, grace = "a second signal", min(grace, 1.0)
            self.cutting = True  # requests still reading a body or fetching images see it and answer 503
            cut = self.active
            handles = list(self.handles)
        for handle in handles:
            self._cut(handle)
        deadline = time.monotonic() + grace
        with self._changed:
            while self.active and time.monotonic() < deadline:
                self._changed.wait(0.1)
        return cut

    async def unless_cut(self, work: Callable[[], Awaitable[_T]]) -> _T:
        """``await work()``, unless the drain starts cutting first: then its error is
        :func:`_shutting_down` (a request still reading its body or fetching its images, which no handle
        stands for yet, gets the same 503 as a cut stream)."""
        outcome: list[Any] = []

        async def run(scope: anyio.CancelScope) -> None:
            try:
                outcome.append(await work())
            except BaseException as error:  # noqa: BLE001  (re-raised below, outside the task group)
                if isinstance(error, anyio.get_cancelled_exc_class()):
                    raise
                outcome.append(error)
            scope.cancel()

        async with anyio.create_task_group() as group:
            group.start_soon(run, group.cancel_scope)
            while not self.cutting:
                await anyio.sleep(0.05)
            group.cancel_scope.cancel()
        if not outcome:
            raise _shutting_down()
        # an error, whose traceback holds this frame, must not stay in it (in the list or a local): that would be
        # a reference cycle keeping the request (its body, its images) until the garbage collector's next full pass
        result = outcome.pop()
        if isinstance(result, BaseException):
            try:
                raise result
            finally:
                del result
        return result


class _StreamThenLeave(StreamingResponse):
    """A streaming response that runs *on_end* however it ends (even if its body never started), and tells the
    metrics the request's real outcome: ``client_closed`` (counted 499, not 200) when the client left before the
    last event was sent, or the status of the error event that ended it (*ended_with*, filled by the stream)."""

    def __init__(self, content, on_end, ended_with: dict[str, int], **kwargs: Any) -> None:
        self._sent_all = False
        self._ended_with = ended_with

        async def tracked():
            async for event in content:
                yield event  # resumed only once the event was sent
            self._sent_all = True

        super().__init__(tracked(), **kwargs)
        self._on_end = on_end

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            state = scope.setdefault("state", {})
            if not self._sent_all:
                state["client_closed"] = True
            elif "status" in self._ended_with:
                state["stream_status"] = self._ended_with["status"]
            self._on_end()


# ---------------------------------------------------------------------------------------------- the app


def create_app(
    engine: Engine,
    *,
    limits: Limits | None = None,
    api_key: str | None = None,
    model_name: str | None = None,
    drain_timeout: float = 30.0,
    shutdown_engine: bool = True,
    max_preparing: int = 4,
    max_fetching: int = 32,
    model_aliases: tuple[str, ...] = (),
    echo_request_id: bool = True,
) -> Starlette:
    """The ASGI app serving *engine*.

    :param engine: a started :class:`Engine` (the app shuts it down, draining, when the server stops).
    :param limits: request limits (images, pixels, sizes, stop strings, allowed URL hosts, body size).
    :param api_key: when set, ``/v1/*`` needs ``Authorization: Bearer <api_key>``.
    :param model_name: the id reported by ``/v1/models`` and in responses, and the only ``model`` requests may
        name (default: :func:`default_served_name` of the engine's).
    :param drain_timeout: seconds the engine may take to finish its requests at shutdown.
    :param shutdown_engine: shut the engine down (draining) when the app stops; False for an engine that
        outlives the app (shared with other apps or in-process clients).
    :param max_preparing: requests whose images are decoded and preprocessed at once, at most; others wait
        their turn (text-only requests do not: theirs is a tokenization). A request the engine's queue cannot
        take is refused (429) before any of that work, and again after waiting.
    :param max_fetching: image URLs fetched at once, at most, across requests (each on a worker thread; a
        request's URLs are fetched together, before it waits for a preparing turn, so that slow hosts hold
        back no one else's preparation).
    :param model_aliases: other names requests may give the model (``llava-next serve`` accepts the ``--model``
        it was started with, which the client knows already); never shown.
    :param echo_request_id: answer with an ``X-Request-ID`` header (the request's own, or one made here); False
        behind a proxy that sets it on the request and echoes it itself (Ray Serve), so that it is there once.
    """
    limits = limits or Limits()
    name = model_name or default_served_name(engine.model_name)
    budget = PixelBudget(limits.max_pixels_in_flight)
    drain = _Drain()
    metrics = Metrics(engine, budget, lambda: drain.active)

    def refusal(error: LlavaNextError, request_id: str, handle: RequestHandle | None = None) -> LlavaNextError:
        """What the client is told about *error*, logged once with the request id (a failure of a submitted
        request was logged by the engine, which names the same id, so here only at debug level)."""
        if isinstance(error, RequestCancelledError):
            if handle is None or not drain.was_cut(handle):
                logger.info("request %s cancelled: the client went away", request_id)
                return error
            error = _shutting_down()
        status = error.status or 500
        if status >= 500 and status != 503:  # 503s (overload, shutdown) are ours to explain; the rest is internal
            logger.log(
                logging.DEBUG if handle is not None else logging.ERROR,
                "request %s failed: %s: %s",
                request_id,
                type(error).__name__,
                error.message,
            )
            return _internal(request_id)
        logger.info("request %s refused (%s %s): %s", request_id, status, error.code, error.message)
        return error

    def respond(error: LlavaNextError, request_id: str, handle: RequestHandle | None = None) -> Response:
        error = refusal(error, request_id, handle)
        if isinstance(error, RequestCancelledError):  # the client went away: nobody reads this
            return Response(status_code=CLIENT_CLOSED)
        return error_response(error)

    accepted_names = {name, *model_aliases}

    def check_model(requested: str | None) -> None:
        if requested is not None and requested not in accepted_names:
            shown = repr(requested) if len(requested) <= 60 else repr(requested[:50]) + "..."
            raise ModelNotFoundError(
                f"the model {shown} does not exist on this server; it serves {name!r} (see /v1/models)", param="model"
            )

    reading = [0]  # requests received and being prepared (on the event loop: no lock)
    # bodies being received: each holds up to max_body_bytes, as many as may wait in the queue
    receiving = _held_bytes(max(engine.max_queue, 1) * limits.max_body_bytes, "request bodies being received")

    async def chat_completions(request: Request) -> Response:
        request_id = request.scope["state"]["request_id"]
        if drain.draining:
            return respond(_shutting_down(), request_id)
        drain.enter()
        streaming = False
        preparing_place = [False]  # whether this request counts in ``reading``
        try:
            try:

                async def read_fetch_and_prepare():
                    body = await _read_json(
                        request, limits.max_body_bytes, limits.body_timeout, limits.max_messages, receiving
                    )
                    if reading[0] >= max(engine.max_queue, 1):  # as many as may wait in the queue
                        raise OverloadedError(
                            f"{reading[0]} requests are being prepared, as many as may wait in the queue "
                            f"(--max-queue {engine.max_queue}); retry later",
                            retry_after=1.0,
                        )
                    reading[0] += 1
                    preparing_place[0] = True
                    parsed = wire.parse_chat_request(body)
                    check_model(parsed.request.model)
                    engine.check_admission()  # cheap: a full queue answers 429 before any image work
                    urls = check_request(engine, parsed.request, limits)
                    fetched = await _fetch_all(urls) if urls else None
                    # images take turns (decoding and tiling cost CPU and memory); a text-only request, a
                    # tokenization, does not wait behind them (anyio's default thread limiter)
                    with_images = any(
                        isinstance(part, ImagePart) for message in parsed.request.messages for part in message.content
                    )
                    try:
                        prepared = await in_worker_thread(
                            _admit_and_prepare,
                            parsed.request,
                            fetched,
                            limiter=_limiter(preparing, max_preparing) if with_images else None,
                        )
                    finally:
                        if fetched:
                            held.give(sum(map(len, fetched.values())))
                    return parsed, prepared

                # the drain's cut answers 503 at once to a request still reading, fetching or waiting its turn
                parsed, prepared = await drain.unless_cut(read_fetch_and_prepare)
                if drain.cutting:
                    raise _shutting_down()
                handle = engine.submit(prepared, request_id=request_id)
            except LlavaNextError as error:
                return respond(error, request_id)
            finally:
                if preparing_place[0]:
                    reading[0] -= 1
            drain.track(handle)
            if parsed.stream:

                def stream_ended() -> None:
                    handle.cancel()  # no-op when finished; stops generation when the stream never ran
                    drain.untrack(handle)
                    drain.leave()

                streaming = True
                ended_with: dict[str, int] = {}  # the status of an error event that ended the stream
                return _StreamThenLeave(
                    _stream(handle, parsed.include_usage, request_id, ended_with),
                    stream_ended,
                    ended_with,
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache"},
                )
            try:
                result = await _result_unless_disconnected(request, handle)
            except LlavaNextError as error:
                return respond(error, request_id, handle)
            finally:
                drain.untrack(handle)
            metrics.observe(result)
            return _json_response(
                wire.build_chat_response(result.to_generation_result(name), request_id=request_id, model=name)
            )
        finally:
            if not streaming:
                drain.leave()

    # made on first use, inside the server's event loop
    preparing: list[anyio.CapacityLimiter] = []
    fetching: list[anyio.CapacityLimiter] = []

    def _limiter(made: list[anyio.CapacityLimiter], capacity: int) -> anyio.CapacityLimiter:
        if not made:
            made.append(anyio.CapacityLimiter(capacity))
        return made[0]

    # bytes fetched and not yet prepared, all requests: as many as max_preparing requests could hold
    held = _held_bytes(
        max_preparing * limits.max_images_per_request * limits.max_image_bytes, "fetched images waiting to be prepared"
    )

    async def _fetch_all(urls: list[tuple[int, str]]) -> dict[int, bytes]:
        """The bytes of a request's image URLs, by image index, all fetched at once on worker threads of their
        own (at most *max_fetching* across requests), apart from the preparing limiter: a slow host delays only
        the requests whose images it serves. The first failing image's error (in image order) is raised as soon
        as it is known, the other fetches left to end alone. The bytes count in ``held`` until the request is
        prepared (the caller gives them back); beyond its bound, a 429."""
        got: dict[int, bytes | LlavaNextError] = {}
        order = [index for index, _ in urls]

        def first_error() -> LlavaNextError | None:
            for index in order:  # decided once every image before the failing one has arrived
                outcome = got.get(index)
                if not isinstance(outcome, bytes):
                    return outcome
            return None

        async def fetch(index: int, url: str, scope: anyio.CancelScope) -> None:
            try:
                got[index] = await in_worker_thread(  # left to finish alone when cancelled
                    fetch_image, url, index, limits, limiter=_limiter(fetching, max_fetching), abandon_on_cancel=True
                )
            except LlavaNextError as error:
                got[index] = error
            if first_error() is not None:
                scope.cancel()

        async with anyio.create_task_group() as group:
            for index, url in urls:
                group.start_soon(fetch, index, url, group.cancel_scope)
        error = first_error()
        if error is not None:
            got.clear()  # no cycle through the error's traceback (see unless_cut)
            try:
                raise error
            finally:
                del error
        fetched = {index: outcome for index, outcome in got.items() if isinstance(outcome, bytes)}
        held.take(sum(map(len, fetched.values())))
        return fetched

    def _admit_and_prepare(chat_request, fetched: dict[int, bytes] | None):
        if drain.cutting:  # its turn came after the drain's cut: no work, the 503
            raise _shutting_down()
        engine.check_admission()  # again: the queue may have filled while this request waited its turn
        return prepare_request(engine, chat_request, limits, budget, fetched=fetched, checked=True)  # on the loop

    async def _result_unless_disconnected(request: Request, handle: RequestHandle) -> EngineResult:
        """The request's result; a client that disconnects first cancels it. Errors come out bare (caught
        inside the task group, so never wrapped in an ExceptionGroup)."""
        outcome: list[Any] = []

        async def cancel_on_disconnect() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            handle.cancel()

        async with anyio.create_task_group() as group:
            group.start_soon(cancel_on_disconnect)
            try:
                outcome.append(await handle.aresult())
            except LlavaNextError as error:
                outcome.append(error)
            group.cancel_scope.cancel()
        result = outcome.pop()  # out of the list, and of this frame, before raising: no cycle through its traceback
        if isinstance(result, LlavaNextError):
            try:
                raise result
            finally:
                del result
        return result

    async def _stream(handle: RequestHandle, include_usage: bool, request_id: str, ended_with: dict[str, int]):
        created = int(time.time())

        def chunk(**kwargs) -> bytes:
            return wire.encode_sse(
                wire.build_stream_chunk(request_id=request_id, model=name, created=created, **kwargs)
            )

        def error_event(error: LlavaNextError) -> bytes:
            body = wire.build_error_body(error)
            body["error"]["status"] = error.status or 500
            return wire.encode_sse(json.dumps(body, ensure_ascii=True))

        try:
            yield chunk(role="assistant", delta="")
            async for delta in handle:
                yield chunk(delta=delta)
            result = await handle.aresult()
            metrics.observe(result)
            yield chunk(finish_reason=result.finish_reason)
            if include_usage:
                final = result.to_generation_result(name)
                yield chunk(usage=final.usage, timings=final.timings)
        except LlavaNextError as error:
            told = refusal(error, request_id, handle)
            if not isinstance(told, RequestCancelledError):
                ended_with["status"] = told.status or 500
            yield error_event(told)
        except Exception:
            logger.exception("request %s: the stream failed", request_id)
            ended_with["status"] = 500
            yield error_event(_internal(request_id))
        finally:
            handle.cancel()  # no-op when finished; stops generation when the client went away
        yield wire.SSE_DONE

    async def models(request: Request) -> Response:
        return _json_response(wire.build_models_list([name]))

    async def health(request: Request) -> Response:
        draining = drain.draining or not engine.accepting
        # stopped by a fault (its thread failed, or no KV slot is usable): nothing will be served again
        status = "stopped" if engine.stop_reason else "draining" if draining else "ok"
        return _json_response(
            {
                "status": status,
                "model": name,
                "queue_depth": engine.queue_depth,
                "batch_size": engine.batch_size,
            },
            503 if draining else 200,
        )

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def http_error(request: Request, exc: Exception) -> Response:
        """Starlette's own errors (no such route, wrong method) in our error shape."""
        if not isinstance(exc, HTTPException):  # registered for HTTPException only
            raise exc
        if exc.status_code == 404:
            error: LlavaNextError = NotFoundError(
                f"no route {request.method} {request.url.path}; see /v1/models, /v1/chat/completions, /health, /metrics"
            )
        else:
            error = BadRequestError(f"{request.method} {request.url.path}: {exc.detail}", status=exc.status_code)
        response = error_response(error)
        for name, value in (exc.headers or {}).items():  # a 405's Allow (RFC 9110 says it must be there)
            response.headers.setdefault(name, value)
        return response

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        if shutdown_engine:
            await anyio.to_thread.run_sync(lambda: engine.shutdown(drain=True, timeout=drain_timeout))

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    metrics.route_paths = frozenset(route.path for route in routes)
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.add_middleware(_Front, api_key=api_key, metrics=metrics, echo_request_id=echo_request_id)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.drain = drain
    app.state.pixel_budget = budget
    app.state.drain_timeout = drain_timeout
    return app


# ---------------------------------------------------------------------------------------------- running it


def _uvicorn_config(app, host: str, port: int, log_level: str, drain_timeout: float):
    import uvicorn

    # After our own drain only idle keep-alive connections are left for uvicorn's graceful shutdown.
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=math.ceil(drain_timeout),  # uvicorn takes whole seconds
        access_log=log_level == "debug",
    )


def _draining_server(config, app):
    """A uvicorn server whose first SIGTERM/SIGINT drains *app* (see the module docstring) before it stops;
    a second signal cuts the requests in flight at once (as the drain timeout would), a third stops without
    waiting for connections or the engine."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        cut = 0
        _drain_started = False

        def handle_exit(self, sig, frame) -> None:
            drain = getattr(app.state, "drain", None)
            if self._drain_started and drain is not None and drain.waiting and not drain.hurried:
                # a second signal while the drain waits: cut what is in flight now (each stream still gets its
                # error event and [DONE], and the engine stops cleanly), rather than waiting out the drain timeout
                logger.warning("a second signal: cutting the requests in flight now")
                drain.hurry()
                return
            if self._drain_started:  # once the wait is over, or a third: stop now, not waiting for anything
                self.should_exit = self.force_exit = True
                return
            if drain is None:
                super().handle_exit(sig, frame)
                return
            self._drain_started = True
            self._captured_signals.append(sig)
            drain.begin()
            threading.Thread(target=self._drain_then_exit, args=(drain,), name="llava-next-drain", daemon=True).start()

        def _drain_then_exit(self, drain: _Drain) -> None:
            self.cut = drain.wait(app.state.drain_timeout)
            if self.cut:
                when = "" if drain.hurried else f" ({app.state.drain_timeout:g}s)"
                logger.warning("%s%s cut %d request(s) in flight", drain.cut_by, when, self.cut)
            self.should_exit = True

    return DrainingServer(config)


def run_server(
    app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", drain_timeout: float = 30.0
) -> None:
    """Serve *app* with uvicorn until SIGINT/SIGTERM, draining first (up to *drain_timeout*, see the module doc).

    Returns normally after the shutdown (exit status 0): uvicorn re-raises the signal it caught to
    the handler that was installed before it, which here only notes it.
    """
    import signal

    server = _draining_server(_uvicorn_config(app, host, port, log_level, drain_timeout), app)

    def stopped(signum, frame) -> None:
        drain = getattr(app.state, "drain", None)
        cutter = drain.cut_by if drain is not None else "the drain timeout"
        how = f"after {cutter} cut {server.cut} request(s)" if server.cut else "after draining"
        logger.info("stopped by %s %s", signal.Signals(signum).name, how)

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, stopped)
    server.run()


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

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_in_thread(
    app, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", drain_timeout: float = 30.0
) -> RunningServer:
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
