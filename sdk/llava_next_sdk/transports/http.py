"""The HTTP transport: any OpenAI-compatible Chat Completions endpoint (ours, vLLM, ``transformers serve``).

Robust by default:

- finite timeouts: each call (connect, retries, the whole body or stream) ends within ``timeout`` seconds
  (:data:`DEFAULT_TOTAL_TIMEOUT`, 600 s), so a server that drips a byte every few seconds cannot hold it;
  within that, :data:`DEFAULT_TIMEOUT` bounds each phase (10 s to connect, 120 s between bytes read);
- retries (``max_retries``, default 2) with exponential backoff and jitter on connect errors, 408, 409, 429
  and 5xx (as openai-python), honouring ``retry-after-ms`` or ``Retry-After`` (up to ``max_retry_after``
  seconds), and only before the first byte of a successful response: a stream that fails part-way raises, it is
  never replayed;
- one connection pool per event loop that uses the transport (successive ``asyncio.run`` calls, each test's
  loop, threads with loops of their own), closed when that loop ends; ``with_options`` derives a transport sharing
  them;
- a stream's connection is closed as soon as its context exits, early or by cancellation, so no pool
  slot is held by a stream no one reads;
- error bodies become :mod:`llava_next_sdk.errors` classes via ``wire.parse_error``.

It registers itself as the ``llava_next_sdk_transport`` plugin for ``http://`` and ``https://`` URLs.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import os
import sys
import threading
import time
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx

from .. import wire
from ..errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    BadRequestError,
    LlavaNextError,
    NotFoundError,
    ServerError,
)
from ..hookspecs import hookimpl
from ..images import MAX_IMAGE_BYTES, encoded_for_wire
from ..retry import DEFAULT_MAX_RETRIES, RetryPolicy
from ..types import ChatRequest, GenerationResult, Timings, Usage
from .base import StreamItem

__all__ = [
    "API_KEY_ENV",
    "HTTPTransport",
    "DEFAULT_TIMEOUT",
    "DEFAULT_TOTAL_TIMEOUT",
    "DEFAULT_MAX_RETRIES",
    "llava_next_sdk_transport",
]

logger = logging.getLogger("llava_next_sdk.http")

_DEFAULT_PHASES = {"connect": 10.0, "read": 120.0, "write": 60.0, "pool": 60.0}
DEFAULT_TIMEOUT = httpx.Timeout(**_DEFAULT_PHASES)
"""Seconds per phase: to connect, between two reads (a slow generation), to send, to wait for a pooled connection."""
DEFAULT_TOTAL_TIMEOUT = 600.0
"""Seconds one call may take in all: connecting, retries and their waits, and reading the whole answer or stream."""
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
API_KEY_ENV = "LLAVA_NEXT_API_KEY"
"""The environment variable an :class:`HTTPTransport` given no ``api_key`` sends (``llava-next serve`` requires the
same variable's key when it is set: one variable configures both ends)."""
RETRIED_TRANSPORT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.WriteError)
"""Failures before the request was all sent (refused, unreachable, reset while sending): sent again."""
CLOSED_BEFORE_ANSWER = (httpx.RemoteProtocolError, httpx.ReadError)
"""The request was sent, then the connection closed (or broke) before a response began."""
STALE_CONNECTION_SECONDS = 0.25
"""A connection closed this soon after the request was sent was already dead (a kept-alive connection the server
had closed): the request is sent again, once. Later, the server may have been working on it (it crashed or was
restarted): it is not sent again, as with a read timeout, since the work may have started."""


def _user_agent() -> str:
    """``llava-next-sdk/<version>``, the version as the package reports it (read when a transport is built:
    the package has finished importing by then)."""
    from .. import __version__

    return f"llava-next-sdk/{__version__}"


def _seconds(name: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    raise TypeError(f"{name}={value!r} is invalid; pass seconds (> 0)")


def _timeouts(timeout: Any, connect_timeout: Any, read_timeout: Any) -> tuple[httpx.Timeout, float]:
    """The per-phase ``httpx.Timeout`` and the per-call total (see :class:`HTTPTransport`)."""
    total = DEFAULT_TOTAL_TIMEOUT
    if timeout is None:
        phases = DEFAULT_TIMEOUT
    elif isinstance(timeout, httpx.Timeout):
        phases = timeout
    else:
        total = _seconds("timeout", timeout)
        phases = httpx.Timeout(**{phase: min(total, seconds) for phase, seconds in _DEFAULT_PHASES.items()})
    if connect_timeout is not None:
        phases = httpx.Timeout(
            connect=_seconds("connect_timeout", connect_timeout), read=phases.read, write=phases.write, pool=phases.pool
        )
    if read_timeout is not None:
        phases = httpx.Timeout(
            connect=phases.connect, read=_seconds("read_timeout", read_timeout), write=phases.write, pool=phases.pool
        )
    return phases, total


class HTTPTransport:
    """Talks to ``{base_url}/chat/completions``.

    :param base_url: the endpoint's base, usually ending in ``/v1`` (``http://127.0.0.1:8000/v1``).
    :param model: the ``model`` field sent when a request names none.
    :param api_key: sent as ``Authorization: Bearer <api_key>``; default: the environment's
        ``LLAVA_NEXT_API_KEY`` (:data:`API_KEY_ENV`, the variable ``llava-next serve`` reads its key from), if set,
        unless *headers* or *http_client* carry an ``Authorization`` of their own.
    :param timeout: seconds one call may take in all (default :data:`DEFAULT_TOTAL_TIMEOUT`, 600 s): connecting,
        retries and their waits, and reading the whole answer or, for a stream, every event up to the end;
        beyond it the call raises :class:`~llava_next_sdk.errors.APITimeoutError`. No phase waits longer than
        the total. An ``httpx.Timeout`` sets the phases instead (the total stays at its default).
    :param connect_timeout: seconds to connect (default 10).
    :param read_timeout: seconds between two reads (default 120): how long a silent server is waited for.
    :param max_retries, backoff_base, backoff_max, max_retry_after: the :class:`~llava_next_sdk.retry.RetryPolicy`
        (the local transport's too): retries after the first attempt (0 disables them); the n-th retry waits
        ``min(backoff_max, backoff_base * 2**n)`` seconds, jittered down by up to 25 %, unless the server's
        ``Retry-After`` says otherwise; a ``Retry-After`` longer than ``max_retry_after`` is not waited for:
        the error is raised (with ``retry_after`` set) for the caller to decide.
    :param include_usage: ask streams for the final usage chunk (``stream_options.include_usage``).
    :param headers: extra request headers.
    :param http_client: an ``httpx.AsyncClient`` to use instead of our own (not closed by ``aclose``).
    :param limits: the connections of each event loop's pool (default: 100, of which 20 kept alive).
    :param max_image_bytes: a decoded image (PIL, array) whose PNG is larger is refused with
        :class:`~llava_next_sdk.errors.InvalidImageError` before it is sent (default :data:`MAX_IMAGE_BYTES`,
        what ``llava-next serve`` accepts per image, as a local client refuses it); raise it to the endpoint's own
        limit, or ``None`` for none.
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        max_retries: int | None = None,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        max_retry_after: float = 60.0,
        include_usage: bool = True,
        headers: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
        limits: httpx.Limits | None = None,
        max_image_bytes: int | None = MAX_IMAGE_BYTES,
    ) -> None:
        if not isinstance(base_url, str) or not base_url.lower().startswith(("http://", "https://")):
            raise ValueError(f"base_url={base_url!r} must be an http(s) URL such as 'http://127.0.0.1:8000/v1'")
        try:
            parts = urllib.parse.urlsplit(base_url)
            parts.port  # noqa: B018 - reading it checks it (0-65535, digits)
        except ValueError as exc:
            raise ValueError(f"base_url={base_url!r} is not a usable URL: {exc}") from None
        if not parts.hostname:
            raise ValueError(f"base_url={base_url!r} has no host: give one such as 'http://127.0.0.1:8000/v1'")
        given_auth = any(name.lower() == "authorization" for name in (headers or {})) or (
            http_client is not None and "authorization" in http_client.headers
        )
        if api_key is None and not given_auth:  # never over credentials the caller set itself
            api_key = os.environ.get(API_KEY_ENV) or None
        _check_headers({**(headers or {}), **({"api_key": api_key} if api_key else {})})
        if max_image_bytes is not None and (
            isinstance(max_image_bytes, bool) or not isinstance(max_image_bytes, int) or max_image_bytes < 1
        ):
            raise TypeError(f"max_image_bytes={max_image_bytes!r} is invalid; pass a number of bytes (>= 1) or None")
        self.max_image_bytes = max_image_bytes
        self.retry_policy = RetryPolicy(
            DEFAULT_MAX_RETRIES if max_retries is None else max_retries, backoff_base, backoff_max, max_retry_after
        )
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.include_usage = include_usage
        self.timeout, self.total_timeout = _timeouts(timeout, connect_timeout, read_timeout)
        # case-insensitive, as HTTP names are: headers= replaces our User-Agent (and Authorization) whatever its case
        self._headers = httpx.Headers({"User-Agent": _user_agent()})
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._headers.update(headers or {})
        self._owns_client = http_client is None
        self._given_client = http_client
        self._limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
        # Our connection pools, one per event loop that used this transport (an asyncio loop, a trio run): a
        # connection belongs to the loop that opened it, and one client may serve several loops in turn (each
        # test's loop, successive asyncio.run calls) or at once (threads). Keyed by id(loop), holding the loop and
        # the pool's closer (see _closed_when_loop_ends).
        self._pools: dict[int, tuple[Any, httpx.AsyncClient, AsyncGenerator[None, None]]] = {}
        self._pools_lock = threading.Lock()
        self._closed = False
        self._root = self  # the transport whose pools these are (itself, or the one with_options derived it from)

    def __repr__(self) -> str:
        return f"HTTPTransport({self.base_url!r}, model={self.model!r})"

    # ------------------------------------------------------------------------------------ public API

    async def generate(self, request: ChatRequest) -> GenerationResult:
        request = await encoded_for_wire(request, self.max_image_bytes)  # decoded images: PNG, in a worker thread
        body = wire.build_chat_request(request, model=self.model, stream=False)
        started = time.perf_counter()
        deadline = anyio.current_time() + self.total_timeout
        response = await self._within(deadline, self._open(body, stream=False, deadline=deadline))
        try:
            content = await self._within(deadline, self._read(response.aread()))
        finally:
            await _close_quietly(response)
        return self._parse_completion(content, response, started)

    @asynccontextmanager
    async def stream(self, request: ChatRequest) -> AsyncIterator[AsyncIterator[StreamItem]]:
        request = await encoded_for_wire(request, self.max_image_bytes)  # decoded images: PNG, in a worker thread
        body = wire.build_chat_request(request, model=self.model, stream=True, include_usage=self.include_usage)
        started = time.perf_counter()
        deadline = anyio.current_time() + self.total_timeout
        response = await self._within(deadline, self._open(body, stream=True, deadline=deadline))
        if response.headers.get("content-type", "").startswith("application/json"):
            # An endpoint that ignores "stream": one delta with the whole text, then the result.
            try:
                result = self._parse_completion(
                    await self._within(deadline, self._read(response.aread())), response, started
                )
            finally:
                await _close_quietly(response)
            yield _ListItems([result.text, result] if result.text else [result])
            return
        items = _SSEItems(self, response, started, deadline)
        try:
            yield items
        finally:
            await items.aclose()

    def with_options(
        self,
        *,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> HTTPTransport:
        """This transport with another *timeout* (as :class:`HTTPTransport` takes it), *max_retries* or more
        *headers* (replacing ours of the same name), sharing its connections: closing the one derived closes only
        it; closing this one closes both."""
        twin = copy.copy(self)
        if isinstance(timeout, httpx.Timeout):  # the phases; the total stays
            twin.timeout = timeout
        elif timeout is not None:  # the total; the phases as they were, none longer than it
            twin.total_timeout = _seconds("timeout", timeout)
            phases = {name: getattr(self.timeout, name) for name in _DEFAULT_PHASES}
            twin.timeout = httpx.Timeout(
                **{name: None if value is None else min(value, twin.total_timeout) for name, value in phases.items()}
            )
        if max_retries is not None:
            twin.retry_policy = dataclasses.replace(self.retry_policy, max_retries=max_retries)
        if headers:
            _check_headers(headers)
            twin._headers = self._headers.copy()
            twin._headers.update(headers)
        return twin

    @property
    def closed(self) -> bool:
        return self._closed or self._root._closed

    async def aclose(self) -> None:
        """Close the connections: this loop's at once; another live event loop's on that loop, soon (those of a loop
        that has ended were closed as it ended). A transport derived by :meth:`with_options` only closes itself."""
        if self._closed:
            return
        self._closed = True
        if self._root is not self:
            return
        with self._pools_lock:
            pools, self._pools = self._pools, {}
        here = _running_loop()
        for loop, _, closer in pools.values():
            if loop is here:
                with anyio.CancelScope(shield=True):
                    await closer.aclose()
            elif isinstance(loop, asyncio.AbstractEventLoop):
                if loop.is_running():
                    asyncio.run_coroutine_threadsafe(closer.aclose(), loop)
                # else: a loop that is not running closes it when it runs again (its finalizer of async generators)
            elif _loop_alive(loop):  # a live trio run's token: closed as a task of that run
                loop.run_sync_soon(_close_in_trio, closer)

    def _client(self) -> httpx.AsyncClient:
        """The httpx client for the running event loop: the caller's ``http_client``, else our pool for this loop
        (made on its first call here, and closed when the loop ends; pools of loops that have ended are dropped
        when a new one is made)."""
        if self._given_client is not None:
            return self._given_client
        loop, root = _running_loop(), self._root
        with root._pools_lock:
            if root._closed:  # aclose() ran meanwhile: a pool made now would never be closed
                raise APIConnectionError("this client is closed; create a new one")
            held = root._pools.get(id(loop))
            if held is not None and held[0] is loop:
                return held[1]
            for key, (other, _, _) in list(root._pools.items()):
                if not _loop_alive(other):
                    del root._pools[key]
            pool = httpx.AsyncClient(timeout=root.timeout, limits=root._limits)
            root._pools[id(loop)] = (loop, pool, _closed_when_loop_ends(pool))
            return pool

    async def __aenter__(self) -> HTTPTransport:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    # ------------------------------------------------------------------------------------ internals

    async def _open(self, body: dict, *, stream: bool, deadline: float) -> httpx.Response:
        """Send *body* and return the response once its status line and headers are in (body unread),
        retrying what may be retried while the call's *deadline* allows. Raises a ``llava_next_sdk.errors``
        class."""
        if self.closed:
            raise APIConnectionError("this client is closed; create a new one")
        url = self.base_url + wire.CHAT_COMPLETIONS_PATH
        headers = self._headers.copy()
        headers["Accept"] = "text/event-stream" if stream else "application/json"
        if stream:
            headers["Accept-Encoding"] = "identity"
        body_written: list[float] = []

        async def written_at(event: str, info: dict) -> None:
            """httpcore's trace hook: when the request's body was all sent (the stale-connection clock starts)."""
            if event.endswith("send_request_body.complete"):
                body_written.append(anyio.current_time())

        client = self._client()
        try:
            # our timeouts, also over a caller's http_client (whose own default would apply otherwise)
            request = client.build_request(
                "POST", url, json=body, headers=headers, timeout=self.timeout, extensions={"trace": written_at}
            )
        except (UnicodeError, ValueError, TypeError) as exc:  # e.g. a lone surrogate in the prompt
            raise BadRequestError(f"the request cannot be encoded as JSON: {exc}") from exc

        def in_time(delay: float | None) -> float | None:
            """*delay*, or ``None`` (no retry) when waiting it would pass the deadline: the caller hears the
            server's own error rather than a timeout."""
            return delay if delay is not None and anyio.current_time() + delay < deadline else None

        attempt = 0
        stale_retried = False
        while True:
            sent_at = anyio.current_time()
            body_written.clear()
            try:
                try:
                    # never followed, even by a caller's client that follows redirects: a POST would become a GET
                    response = await client.send(request, stream=True, follow_redirects=False)
                except Exception as exc:
                    if self.closed:  # aclose() closed the connections under this call
                        raise _closed_during_call() from exc
                    raise
            except APIConnectionError:
                raise
            except CLOSED_BEFORE_ANSWER as exc:
                # measured from when the body was all written (connecting and uploading images take their time)
                quick = (
                    anyio.current_time() - (body_written[-1] if body_written else sent_at) < STALE_CONNECTION_SECONDS
                )
                delay = in_time(self.retry_policy.delay(attempt)) if quick and not stale_retried else None
                if delay is not None:
                    logger.info("retrying %s in %.2fs after %s (a dead kept-alive connection)", url, delay, exc)
                    attempt, stale_retried = attempt + 1, True
                    await anyio.sleep(delay)
                    continue
                raise APIConnectionError(
                    f"the connection to {url} closed after the request was sent and before any response "
                    f"({str(exc) or type(exc).__name__}): the server may have failed while working on it; not sent "
                    "again, since the work may have started"
                ) from exc
            except RETRIED_TRANSPORT_ERRORS as exc:
                # No response began (refused, reset, closed early): the request may be sent again.
                delay = in_time(self.retry_policy.delay(attempt))
                if delay is not None:
                    logger.info("retrying %s in %.2fs after %s", url, delay, type(exc).__name__)
                    attempt += 1
                    await anyio.sleep(delay)
                    continue
                raise _connection_error(exc, url, attempt) from exc
            except httpx.TimeoutException as exc:
                raise _connection_error(exc, url, attempt) from exc
            except httpx.TransportError as exc:
                raise _connection_error(exc, url, attempt) from exc
            except Exception as exc:  # anything else from the socket layer: only our error classes leave here
                raise APIConnectionError(f"sending the request to {url} failed: {exc!r}") from exc

            if response.status_code < 300:
                return response
            if response.status_code < 400:  # not followed: a POST must not turn into a GET on the way
                await _close_quietly(response)
                location = response.headers.get("location", "")
                raise APIError(
                    f"{url} answered HTTP {response.status_code}, a redirect"
                    + (f" to {location!r}" if location else "")
                    + ": use the endpoint's own address as base_url",
                    status=response.status_code,
                    request_id=_request_id(response),
                )
            try:
                content = await self._read(response.aread())
            finally:
                await _close_quietly(response)
            retry_after = _retry_after(response.headers)
            error = wire.parse_error(
                response.status_code, content, request_id=_request_id(response), retry_after=retry_after
            )
            if isinstance(error, NotFoundError) and not self.base_url.endswith("/v1"):
                error.message = f"{error.message} (is base_url missing '/v1'? it is {self.base_url!r})"
                error.args = (error.message,)
            retryable = response.status_code in RETRY_STATUSES or response.status_code >= 500
            delay = in_time(self.retry_policy.delay(attempt, retry_after)) if retryable else None
            if delay is not None:
                logger.info("retrying %s in %.2fs after HTTP %d", url, delay, response.status_code)
                attempt += 1
                await anyio.sleep(delay)
                continue
            raise error

    def _parse_completion(self, content: bytes, response: httpx.Response, started: float) -> GenerationResult:
        try:
            data = json.loads(content)
        except ValueError:
            raise ServerError(
                f"the endpoint answered with a non-JSON body: {content[:200]!r}",
                status=response.status_code,
                request_id=_request_id(response),
            ) from None
        result = wire.parse_chat_response(data)
        timings = result.timings
        if timings.total_seconds is None:
            timings = Timings(timings.queue_seconds, timings.time_to_first_token, time.perf_counter() - started)
        return _replace(result, timings=timings, id=result.id or _request_id(response))

    async def _within(self, deadline: float, awaitable: Any) -> Any:
        """Await *awaitable*, raising :class:`APITimeoutError` when the call's total *deadline* passes first."""
        with anyio.move_on_after(deadline - anyio.current_time()) as scope:
            return await awaitable
        if scope.cancelled_caught:
            raise APITimeoutError(
                f"timed out: the call to {self.base_url} took longer than its total timeout of "
                f"{self.total_timeout:g} s; pass a larger timeout= if the endpoint is just slow"
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read(self, awaitable: Any) -> Any:
        """Await a body read, turning transport failures (after the response began) into our errors."""
        try:
            return await awaitable
        except (httpx.TimeoutException, httpx.TransportError, httpx.DecodingError) as exc:
            if self.closed:  # aclose() closed the connections under this call
                raise _closed_during_call() from exc
            if isinstance(exc, httpx.TimeoutException):
                raise APITimeoutError(
                    f"timed out reading the response from {self.base_url}: nothing arrived for "
                    f"{self.timeout.read:g} s (raise read_timeout= if the endpoint is just slow to answer)"
                ) from exc
            if isinstance(exc, httpx.TransportError):
                raise APIConnectionError(
                    f"the connection to {self.base_url} broke while reading the response: "
                    f"{str(exc) or type(exc).__name__}"
                ) from exc
            raise APIConnectionError(  # e.g. a proxy's Content-Encoding that its bytes do not match
                f"the response from {self.base_url} could not be decoded ({exc}): its Content-Encoding does not "
                "match its bytes, often a proxy's doing"
            ) from exc


class _ListItems:
    """Stream items that are already all here."""

    def __init__(self, items: list[StreamItem]) -> None:
        self._items = list(items)

    def __aiter__(self) -> _ListItems:
        return self

    async def __anext__(self) -> StreamItem:
        if not self._items:
            raise StopAsyncIteration
        return self._items.pop(0)


class _SSEItems:
    """The async iterator of one streamed response: ``str`` deltas, then one ``GenerationResult``."""

    def __init__(self, transport: HTTPTransport, response: httpx.Response, started: float, deadline: float) -> None:
        self._transport = transport
        self._deadline = deadline
        self._response = response
        self._started = started
        # One plain generator over the body, closed explicitly (httpx's nested line iterators would be left to
        # the garbage collector when a stream is abandoned). Streams ask for no content-encoding; a server or
        # proxy that compresses anyway is decoded.
        self._raw = response.aiter_bytes()
        self._decoder = wire.SSEDecoder()
        self._events: list[str] = []
        self._body_ended = False
        self._text: list[str] = []
        self._finish_reason: str | None = None
        self._usage: Usage | None = None
        self._timings: Timings | None = None
        self._first_token_at: float | None = None
        self._id = _request_id(response)
        self._model: str | None = None
        self._done = False

    def __aiter__(self) -> _SSEItems:
        return self

    async def __anext__(self) -> StreamItem:
        if self._done:
            raise StopAsyncIteration
        while True:
            data = await self._next_event()
            if data is None or data == "[DONE]":
                if data == "[DONE]":
                    await self._drain()
                return self._finish(ended_cleanly=data == "[DONE]")
            try:
                obj = json.loads(data)
            except ValueError:
                raise ServerError(f"the endpoint sent a malformed stream event: {data[:200]!r}") from None
            try:
                chunk = wire.parse_stream_chunk(obj)
            except LlavaNextError as exc:  # an error event: the request's id is the response's
                self._done = True
                exc.request_id = exc.request_id or _request_id(self._response) or self._id
                raise
            self._id = chunk.id or self._id
            self._model = chunk.model or self._model
            self._finish_reason = chunk.finish_reason or self._finish_reason
            self._usage = chunk.usage or self._usage
            self._timings = chunk.timings or self._timings
            if chunk.delta:
                if self._first_token_at is None:
                    self._first_token_at = time.perf_counter()
                self._text.append(chunk.delta)
                return chunk.delta

    async def _next_event(self) -> str | None:
        """The next event's data, or ``None`` at the end of the body."""
        while not self._events:
            if self._body_ended:
                return None
            try:
                chunk = await self._transport._within(self._deadline, self._transport._read(self._raw.__anext__()))
            except StopAsyncIteration:
                self._body_ended = True
                self._events.extend(self._decoder.end())
            except APITimeoutError:
                self._done = True
                raise
            else:
                self._events.extend(self._decoder.feed(chunk))
        return self._events.pop(0)

    async def _drain(self, limit: int = 65536, seconds: float = 0.5) -> None:
        """Read what little follows ``[DONE]`` (the body's end), so the connection returns to the pool
        whole instead of being dropped; give up past *limit* bytes or *seconds* (the generation is complete:
        a server that keeps the body open costs a connection, never the result)."""
        seen = 0
        with anyio.move_on_after(seconds):
            while not self._body_ended and seen <= limit:
                try:
                    seen += len(await self._transport._read(self._raw.__anext__()))
                except StopAsyncIteration:
                    self._body_ended = True
                except LlavaNextError:
                    return

    def _finish(self, *, ended_cleanly: bool) -> GenerationResult:
        self._done = True
        if not ended_cleanly and self._finish_reason is None:
            raise APIConnectionError(
                "the stream ended before the endpoint finished the generation (no finish_reason and no [DONE])"
            )
        now = time.perf_counter()
        reported = self._timings or Timings()
        ttft = reported.time_to_first_token
        if ttft is None and self._first_token_at is not None:
            ttft = self._first_token_at - self._started
        timings = Timings(
            reported.queue_seconds,
            ttft,
            reported.total_seconds if reported.total_seconds is not None else now - self._started,
        )
        return GenerationResult(
            text="".join(self._text),
            finish_reason=self._finish_reason,
            usage=self._usage,
            timings=timings,
            model=self._model,
            id=self._id,
        )

    async def aclose(self) -> None:
        """Close the response (and so the connection, if it was not read to the end)."""
        self._done = True
        with anyio.CancelScope(shield=True):
            try:
                aclose = getattr(self._raw, "aclose", None)  # httpx types it AsyncIterator; it is a generator
                if aclose is not None:
                    await aclose()
            except Exception:
                pass
            await _close_quietly(self._response)


async def _close_quietly(response: httpx.Response) -> None:
    with anyio.CancelScope(shield=True):
        try:
            await response.aclose()
        except Exception:
            logger.debug("error while closing a response", exc_info=True)


def _check_headers(headers: Mapping[str, Any]) -> None:
    for name, value in headers.items():
        if not isinstance(value, str) or not value.isascii() or any(c in value for c in "\r\n"):
            raise ValueError(
                f"{'api_key' if name == 'api_key' else f'header {name!r}'} must be ASCII text on one line "
                "(HTTP headers cannot carry other characters)"
            )


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds the endpoint asks us to wait: ``retry-after-ms`` (OpenAI's, finer) when readable, else
    ``Retry-After``."""
    try:
        milliseconds = float(headers.get("retry-after-ms", ""))
    except ValueError:
        milliseconds = float("nan")
    if 0 <= milliseconds < float("inf"):
        return milliseconds / 1000
    return wire.parse_retry_after(headers.get("retry-after"))


def _running_loop() -> Any:
    """The running event loop: asyncio's loop, or trio's token for this run."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        trio = sys.modules.get("trio")  # anyio's other backend: imported already if it is the one running
        if trio is None:
            raise RuntimeError("no event loop is running: call this from async code (asyncio or trio)") from None
        return trio.lowlevel.current_trio_token()


def _close_in_trio(closer: AsyncGenerator[None, None]) -> None:
    """Run on a trio run's own thread: close a pool there, as a system task (*closer*: see
    :func:`_closed_when_loop_ends`)."""
    sys.modules["trio"].lowlevel.spawn_system_task(closer.aclose)


def _closed_when_loop_ends(pool: httpx.AsyncClient) -> AsyncGenerator[None, None]:
    """An async generator, started on the running loop, whose ``aclose()`` closes *pool*.

    An event loop closes the async generators still suspended in it as it ends (``asyncio.run`` calls
    ``loop.shutdown_asyncgens()``; a trio run finalizes its own): the one hook both offer, so the pool's sockets are
    closed on their own loop while it can still run them, instead of being dropped open (a ``ResourceWarning`` per
    socket). The loop holds the generator weakly; the transport holds it until it closes it or the loop ends. A loop
    closed without ``shutdown_asyncgens`` (``loop.close()`` alone) never runs it: its sockets are left open."""

    async def closer() -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await pool.aclose()

    generator = closer()
    try:  # to its first yield, now: the loop registers it (its firstiter hook); nothing in it awaits before that
        generator.asend(None).send(None)
    except StopIteration:
        pass
    return generator


def _loop_alive(loop: Any) -> bool:
    """Whether *loop* (see :func:`_running_loop`) may still run its connections."""
    if isinstance(loop, asyncio.AbstractEventLoop):
        return not loop.is_closed()
    try:
        loop.run_sync_soon(lambda: None)  # a trio token: refused once its run has finished
    except Exception:
        return False
    return True


def _closed_during_call() -> APIConnectionError:
    return APIConnectionError("the client was closed while this call was running")


def _request_id(response: httpx.Response) -> str | None:
    return response.headers.get(wire.REQUEST_ID_HEADER)


def _replace(result: GenerationResult, **changes: Any) -> GenerationResult:
    return dataclasses.replace(result, **changes)


def _connection_error(exc: Exception, url: str, retries: int) -> APIConnectionError:
    after = f" after {retries} retr{'y' if retries == 1 else 'ies'}" if retries else ""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        phase, advice = {
            httpx.ConnectTimeout: ("connecting to", "raise connect_timeout= if the host is just slow to accept"),
            httpx.ReadTimeout: ("waiting for an answer from", "raise read_timeout= if the endpoint is just slow"),
            httpx.WriteTimeout: (
                "sending the request to",
                "pass timeout=httpx.Timeout(..., write=SECONDS) if the network is just slow",
            ),
            httpx.PoolTimeout: (
                "waiting for a free connection to",
                "make fewer calls at once, or give the client more connections (limits=, or your http_client's)",
            ),
        }.get(type(exc), ("talking to", "raise timeout= if the endpoint is just slow"))
        return APITimeoutError(f"timed out {phase} {url}{after}: {detail}; {advice}")
    return APIConnectionError(f"could not reach {url}{after}: {detail}; is the server running and the base_url right?")


_OPTIONS = {
    "model",
    "api_key",
    "timeout",
    "connect_timeout",
    "read_timeout",
    "max_retries",
    "backoff_base",
    "backoff_max",
    "max_retry_after",
    "include_usage",
    "headers",
    "http_client",
    "limits",
    "max_image_bytes",
}


@hookimpl
def llava_next_sdk_transport(url: str, options: dict) -> HTTPTransport | None:
    """Serve ``http://`` and ``https://`` base URLs."""
    if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
        return None
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise TypeError(
            f"unknown option(s) for an HTTP client: {', '.join(unknown)}; accepted: {', '.join(sorted(_OPTIONS))}"
        )
    return HTTPTransport(url, **options)
