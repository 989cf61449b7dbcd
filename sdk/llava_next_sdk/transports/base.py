"""The transport seam: the one interface the client talks to, in-process or remote.

``AsyncClient`` is thin: it turns the user's images and prompt into a :class:`~llava_next_sdk.types.ChatRequest`
and hands it to a transport. A transport moves the request to a model and the result back; it
knows nothing of how the user called the client. Two built-in transports implement this seam:

- ``transports/http.py``: any OpenAI-compatible Chat Completions endpoint, over httpx;
- ``llava_next_plugin.local_transport``: the llava-next engine in this process, offered by the model
  package under the entry-point group ``llava_next_sdk.transports`` (imported lazily, with torch).

Transports are chosen through the ``llava_next_sdk_transport(url, options)`` hook (see
``hookspecs.py``): ``http(s)://...`` for remote endpoints, ``local:<path or hub id>`` for a local model.
A third-party plugin may answer other schemes.

Contract every transport keeps
------------------------------
- **Requests.** ``request.messages`` are validated ``ChatMessage`` objects; every image is an
  ``ImagePart`` holding ``url`` (``http(s)://`` or ``data:`` URL), ``data`` (encoded image file bytes)
  or ``image`` (a decoded PIL image from this process). A transport that sends the request elsewhere
  encodes decoded images itself, once, off the loop (``llava_next_sdk.images.encoded_for_wire``); one
  that runs the model in-process uses them as they are. ``request.params`` is a validated
  ``GenerationParams`` (``None`` fields mean the model's default). The transport applies its own checks
  that depend on the model (image size, images per request, allowed URL domains, context length) and
  raises the same error classes for the same bad input, whichever transport it is.
- **Errors.** Only ``llava_next_sdk.errors`` classes escape: ``BadRequestError`` and its subclasses,
  ``AuthenticationError``, ``NotFoundError``, ``OverloadedError``, ``ServerError``,
  ``APIConnectionError``/``APITimeoutError``; never a raw httpx, torch or engine exception.
- **Event loops.** Every method is called from an anyio event loop (asyncio or trio) and never blocks
  it: model work runs on another thread, I/O is async. One transport instance serves many concurrent
  tasks of the loop it is used on.
- **Cancellation.** Cancelling a ``generate`` call, or leaving a ``stream`` context early (break,
  exception, cancellation), stops that request's work promptly: the local transport drops it from the
  engine's batch, the HTTP transport closes the connection. Nothing keeps running for a result no one
  will read.
- **Results.** ``usage.prompt_tokens`` counts the whole prompt including image tokens;
  ``usage.image_tokens`` is set when known. ``timings.total_seconds`` is always set (measured by the
  transport if the model side does not report it).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol, runtime_checkable

import anyio

from ..types import ChatRequest, GenerationResult

__all__ = ["AsyncTransport", "StreamItem", "holding", "with_options"]


@asynccontextmanager
async def holding(lock: threading.Lock) -> AsyncIterator[None]:
    """*lock* held for the block, waited for on the event loop. A thread lock, not an anyio one: an anyio lock
    belongs to the loop that first used it, and one client may be used from loops in several threads at once.
    Polled rather than taken in a worker thread, so that a wait can be cancelled and holds no thread."""
    while not lock.acquire(blocking=False):
        await anyio.sleep(0.01)
    try:
        yield
    finally:
        lock.release()


StreamItem = str | GenerationResult
"""What a stream yields: ``str`` text deltas, then exactly one ``GenerationResult`` as the last item."""


@runtime_checkable
class AsyncTransport(Protocol):
    """What ``AsyncClient`` needs from a transport."""

    async def generate(self, request: ChatRequest) -> GenerationResult:
        """Run *request* to completion and return its result.

        Raises a ``llava_next_sdk.errors`` class on failure. Cancelling the awaiting task cancels the
        request's generation.
        """
        ...

    def stream(self, request: ChatRequest) -> AbstractAsyncContextManager[AsyncIterator[StreamItem]]:
        """Start *request* as a stream.

        Returns an async context manager. Entering it submits the request and raises early errors
        (bad request, authentication, overloaded, connection) before anything is yielded. It gives an
        async iterator that yields the generated text as ``str`` deltas, in order, as they come (an
        empty delta may be skipped), and then exactly one final ``GenerationResult`` whose ``text`` is
        the concatenation of the deltas and which carries ``finish_reason``, ``usage`` and ``timings``.
        An error after the stream started is raised from the iterator (and is never retried).

        Exiting the context, whether the iterator was exhausted or not, releases everything:
        generation stops, the connection is closed. Usage::

            async with transport.stream(request) as items:
                async for item in items:
                    if isinstance(item, str):
                        print(item, end="")
                    else:
                        result = item
        """
        ...

    async def aclose(self) -> None:
        """Release the transport's resources (connection pool, engine reference). Idempotent."""
        ...


def checked_transport(transport: Any, url: str) -> Any:
    """*transport* as a ``llava_next_sdk_transport`` plugin gave it for *url*, if it is a transport (an instance
    with ``generate``, ``stream`` and ``aclose``); else a typed error that says what the plugin returned (a
    class instead of an instance, a string...), rather than a bare ``TypeError`` at the first request."""
    from ..errors import LlavaNextError

    needed = ("generate", "stream", "aclose")
    if transport is None:
        return None
    if not isinstance(transport, type) and all(callable(getattr(transport, name, None)) for name in needed):
        return transport
    what = f"the class {transport.__name__}" if isinstance(transport, type) else f"a {type(transport).__name__}"
    raise LlavaNextError(
        f"the transport plugin for {url!r} returned {what}, not a transport: return an instance with "
        f"{', '.join(needed)} (see llava_next_sdk.transports.AsyncTransport), or None for URLs it does not serve"
    )


def with_options(transport: Any, **options: Any) -> Any:
    """*transport*'s ``with_options(**options)`` (``timeout``, ``max_retries``, ``headers``): a transport sharing its
    connections or engine; a typed error for a transport that has no such method (a third party's)."""
    from ..errors import UnsupportedParameterError

    derive = getattr(transport, "with_options", None)
    if derive is None:
        raise UnsupportedParameterError(
            f"the transport {type(transport).__name__} takes no per-call options (timeout, max_retries, headers): "
            "give them when making the client",
            param="timeout",
        )
    return derive(**options)
