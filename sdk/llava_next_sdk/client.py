"""``AsyncClient`` and its sync twin ``Client``: one API, in-process or remote.

The client is thin. It turns the user's images, prompt, messages and parameters into a
:class:`~llava_next_sdk.types.ChatRequest` (files are read and checked in a worker thread; decoded
images stay decoded) and hands it to a
transport (``transports/base.py``), chosen through the ``llava_next_sdk_transport`` hook:

    AsyncClient(model="path/or/hub-id")                   -> hook("local:path/or/hub-id")  (engine, in-process)
    AsyncClient(base_url="http://127.0.0.1:8000/v1", ...) -> hook("http://...")           (any OpenAI endpoint)

Everything is anyio: the async client works under asyncio and trio alike.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import os
import queue
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import CancelledError, Future
from typing import Any

import anyio

from .errors import APIConnectionError, BadRequestError, LlavaNextError
from .images import as_image_list, to_image_parts
from .messages import read_messages, to_chat_messages
from .transports.base import AsyncTransport, with_options
from .types import ChatMessage, ChatRequest, GenerationParams, GenerationResult, ImagePart, TextPart, Usage

__all__ = ["AsyncClient", "Client", "TextStream", "SyncTextStream", "CALL_OPTIONS"]

CALL_OPTIONS = ("timeout", "max_retries", "extra_headers")
"""Options one call takes besides its generation parameters (as :meth:`AsyncClient.with_options` does)."""

LOCAL_SCHEME = "local"
"""``AsyncClient(model=...)`` asks the transport hook for ``local:<model>``; llava-next-plugin serves it."""


def _transport_for(url: str, options: dict) -> AsyncTransport:
    """The transport the ``llava_next_sdk_transport`` hook gives for *url*, or a :class:`DeferredTransport`
    when a provider of *url*'s scheme is installed: not imported yet, or being imported by another thread
    right now (its first request then waits for that import instead of failing)."""
    from .plugins import DISABLE_AUTOLOAD_ENV, get_plugin_manager
    from .transports.base import checked_transport
    from .transports.deferred import DeferredTransport

    manager = get_plugin_manager()
    transport = checked_transport(manager.hook.llava_next_sdk_transport(url=url, options=options), url)
    if transport is not None:
        return transport
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme and manager.transport_providers(scheme):
        return DeferredTransport(url, options, scheme)
    if scheme == LOCAL_SCHEME and os.environ.get(DISABLE_AUTOLOAD_ENV):
        raise LlavaNextError(
            f"model= needs the model package's transport, which is loaded by entry point, but "
            f"{DISABLE_AUTOLOAD_ENV} is set; unset it, or pass transport= yourself"
        )
    if scheme == LOCAL_SCHEME:
        raise LlavaNextError(
            f"running the model {url[len(LOCAL_SCHEME) + 1 :]!r} in this process needs the model package, "
            "which is not installed: pip install llava-next-plugin (or pass base_url= to use a llava-next "
            "server instead)"
        )
    raise LlavaNextError(
        f"no transport serves {url!r}; use an http(s):// base_url, or model= for a "
        "local model, or install the plugin that handles this scheme"
    )


class AsyncClient:
    """Talk to LLaVA-NeXT in this process or on any OpenAI-compatible endpoint, with the same methods.

    :param model: a local checkpoint (path or hub id) to run in-process; with ``base_url``, the model
        name sent to the endpoint.
    :param base_url: an OpenAI-compatible endpoint, e.g. ``"http://127.0.0.1:8000/v1"``.
    :param api_key: the endpoint's key (``Authorization: Bearer``).
    :param timeout: seconds one call may take in all, retries and the whole answer or stream included
        (default 600); beyond it the call raises ``APITimeoutError``. ``connect_timeout=`` (default 10 s) and
        ``read_timeout=`` (default 120 s, how long a silent server is waited for) tune the phases; an
        ``httpx.Timeout`` sets them all instead. For a local model: seconds, no limit by default, the model's
        loading at the first call not counted; the request is cancelled when it passes.
    :param max_retries: retries (default 2, with backoff: :class:`~llava_next_sdk.retry.RetryPolicy`) on
        connect errors, 429 and 5xx before a response starts; for a local model, when the engine's queue is
        full (``OverloadedError``), before the request is queued.
    :param transport: an :class:`~llava_next_sdk.transports.AsyncTransport` to use as is (then the
        other arguments are not used to pick one).
    :param options: more transport options, passed to the ``llava_next_sdk_transport`` hook (for the
        local transport, e.g. ``device=`` (default: cuda when available, else cpu, as ``llava-next serve``),
        ``dtype=``, ``max_queue=``, ``allowed_url_domains=``; for HTTP, ``headers=``, ``http_client=``,
        ``max_image_bytes=``).

    Image URLs: a server fetches ``http(s)`` image URLs only from the hosts it allows (none unless started
    with ``--allow-url-domain``). A local model runs in your own process, so by default it fetches them from
    any host; an app that passes its users' URLs through should pass ``allowed_url_domains=["example.com"]``
    (a domain allows its subdomains; ``[]`` allows none): other hosts then raise ``InvalidImageError``, as
    from a server.

    Default generation parameters for every call may be given as ``params=GenerationParams(...)`` or
    a dict.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: Any = None,
        max_retries: int | None = None,
        transport: AsyncTransport | None = None,
        params: GenerationParams | Mapping | None = None,
        **options: Any,
    ) -> None:
        if isinstance(params, Mapping):
            params = GenerationParams.from_kwargs(params)
        self.params = params or GenerationParams()
        self.model = os.fspath(model) if model is not None else None
        self.base_url = base_url
        if transport is None:
            if base_url is None and model is None:
                raise TypeError(
                    "pass model= (a local checkpoint path or hub id) or base_url= (an "
                    "OpenAI-compatible endpoint such as 'http://127.0.0.1:8000/v1')"
                )
            given = {"model": self.model, "api_key": api_key, "timeout": timeout, "max_retries": max_retries}
            options = {**{k: v for k, v in given.items() if v is not None}, **options}
            transport = _transport_for(base_url if base_url is not None else f"local:{self.model}", options)
        elif options:
            raise TypeError(f"transport= was given, so these options are not used: {', '.join(sorted(options))}")
        self.transport = transport
        self._closed = False

    def __repr__(self) -> str:
        return f"AsyncClient(transport={self.transport!r})"

    def with_options(
        self, *, timeout: Any = None, max_retries: int | None = None, headers: Mapping[str, str] | None = None
    ) -> AsyncClient:
        """This client with another ``timeout`` (seconds a call may take), ``max_retries`` or extra ``headers``
        (an HTTP endpoint's), on the same connections or engine, as openai-python's ``with_options``::

            await client.with_options(timeout=1800).generate(image, "Describe every detail.")

        The same options are taken by one call too: ``generate(..., timeout=, max_retries=, extra_headers=)``.
        Closing the client it gives closes only that one; closing this one closes both.
        """
        twin = copy.copy(self)
        twin.transport = self._derived_transport(timeout, max_retries, headers)
        return twin

    def _derived_transport(self, timeout: Any, max_retries: Any, headers: Any) -> AsyncTransport:
        derived: AsyncTransport = with_options(
            self.transport, timeout=timeout, max_retries=max_retries, headers=headers
        )
        return derived

    def _call_transport(self, params: dict[str, Any]) -> AsyncTransport:
        """The transport for one call: ours, or one with the call's own ``timeout``, ``max_retries`` or
        ``extra_headers`` (taken out of *params*)."""
        options = {name: params.pop(name) for name in CALL_OPTIONS if name in params}
        if all(value is None for value in options.values()):
            return self.transport
        try:
            return self._derived_transport(
                options.get("timeout"), options.get("max_retries"), options.get("extra_headers")
            )
        except (TypeError, ValueError) as exc:  # a value the transport cannot take: bad input, as a bad parameter is
            if isinstance(exc, LlavaNextError):
                raise
            raise BadRequestError(str(exc)) from None

    # --------------------------------------------------------------------------- building requests

    def _params(self, params: Mapping[str, Any]) -> GenerationParams:
        return self.params.merged(**params) if params else self.params

    async def _prompt_request(
        self, images: Any, prompt: Any, system: str | None, detail: str | None, params: Mapping[str, Any]
    ) -> ChatRequest:
        if not isinstance(prompt, str):
            raise BadRequestError(f"prompt must be a str, got {type(prompt).__name__}", param="prompt")
        generation_params = self._params(params)
        parts: list = [_with_detail(part, detail) for part in await to_image_parts(as_image_list(images))]
        parts.append(TextPart(prompt))
        messages = [ChatMessage("user", tuple(parts))]
        if system is not None:
            messages.insert(0, ChatMessage("system", (TextPart(system),)))
        return ChatRequest(tuple(messages), generation_params)

    async def _chat_request(self, messages: Any, params: Mapping[str, Any]) -> ChatRequest:
        generation_params = self._params(params)
        return ChatRequest(await _to_messages(messages), generation_params)

    # --------------------------------------------------------------------------- calls

    async def generate(
        self, images: Any, prompt: str, *, system: str | None = None, detail: str | None = None, **params: Any
    ) -> GenerationResult:
        """Answer *prompt* about *images* (one image, a list of them, or ``None``).

        An image may be a PIL image, a path, bytes, a numpy array ``[H, W, C]``, an http(s) URL or a
        data URL. *detail* is OpenAI's image detail for every image: ``"low"`` sends the base view only
        (one tile's tokens: 576 on llava-v1.6-mistral), ``"high"``/``"auto"`` the full any-resolution tiling;
        ``None`` (the default): each image's own (an :class:`ImagePart`'s ``detail``, else ``"auto"``).
        *params* are generation parameters (``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``);
        any other name raises ``UnsupportedParameterError``.
        """
        self._check_open()
        transport = self._call_transport(params)
        return await transport.generate(await self._prompt_request(images, prompt, system, detail, params))

    async def chat(self, messages: Sequence[Mapping | ChatMessage], **params: Any) -> GenerationResult:
        """Continue a conversation given as OpenAI-style messages::

            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://..."}},
                                          {"type": "text", "text": "What is this?"}]}]

        Besides ``image_url`` parts (whose url may also be a local path here), transformers' parts
        ``{"type": "image", "image": <PIL | path | bytes | array | URL>}`` and ``ChatMessage`` objects are
        accepted: the shapes :func:`llava_next_sdk.messages.read_messages` reads, as the server does.
        """
        self._check_open()
        transport = self._call_transport(params)
        return await transport.generate(await self._chat_request(messages, params))

    def stream(
        self, images: Any, prompt: str, *, system: str | None = None, detail: str | None = None, **params: Any
    ) -> TextStream:
        """Like :meth:`generate`, as an async context manager yielding text deltas::

            async with client.stream(image, "Describe it.") as stream:
                async for delta in stream:
                    print(delta, end="")
            print(stream.usage)

        Leaving the block early (or being cancelled) stops the generation and closes the connection.
        """
        transport = self._call_transport(params)
        return TextStream(self, lambda: self._prompt_request(images, prompt, system, detail, params), transport)

    def stream_chat(self, messages: Sequence[Mapping | ChatMessage], **params: Any) -> TextStream:
        """Like :meth:`chat`, streamed as :meth:`stream` is."""
        transport = self._call_transport(params)
        return TextStream(self, lambda: self._chat_request(messages, params), transport)

    async def map(
        self, items: Iterable[Any], *, concurrency: int = 4, **params: Any
    ) -> list[GenerationResult | Exception]:
        """Run many requests, at most *concurrency* at a time, and return their results in input order.

        An item is ``(images, prompt)``, a prompt ``str``, a dict of :meth:`generate` arguments
        (``{"images": ..., "prompt": ..., "max_tokens": 8}``), or ``{"messages": [...], ...}`` for
        :meth:`chat`. *params* apply to every item (an item's own values win). A failed item does not
        stop the others: its exception stands in its place in the returned list.
        """
        self._check_open()
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise ValueError(f"concurrency={concurrency!r} must be an integer >= 1")
        items = list(items)
        results: list[GenerationResult | Exception | None] = [None] * len(items)
        slots = anyio.Semaphore(concurrency)

        async def run(index: int, item: Any) -> None:
            async with slots:
                try:
                    results[index] = await self._run_item(item, params)
                except Exception as exc:  # recorded, not fatal; cancellation (BaseException) propagates
                    results[index] = exc

        async with anyio.create_task_group() as group:
            for index, item in enumerate(items):
                group.start_soon(run, index, item)
        return results  # type: ignore[return-value]

    async def _run_item(self, item: Any, params: Mapping[str, Any]) -> GenerationResult:
        if isinstance(item, str):
            return await self.generate(None, item, **params)
        if isinstance(item, tuple) and len(item) == 2:
            return await self.generate(item[0], item[1], **params)
        if isinstance(item, Mapping):
            item = dict(item)
            if "messages" in item:
                messages = item.pop("messages")
                return await self.chat(messages, **{**params, **item})
            images, prompt = item.pop("images", None), item.pop("prompt", None)
            if prompt is None:
                raise BadRequestError("a map item dict needs 'prompt' (or 'messages')", param="prompt")
            return await self.generate(images, prompt, **{**params, **item})
        raise BadRequestError(
            f"unsupported map item {type(item).__name__}: use (images, prompt), a prompt "
            "str, or a dict with 'prompt' or 'messages'",
            param="items",
        )

    # --------------------------------------------------------------------------- lifetime

    def _check_open(self) -> None:
        if self._closed:
            raise LlavaNextError("this client is closed; create a new one")

    async def aclose(self) -> None:
        """Release the transport (connections, engine reference). Idempotent."""
        if not self._closed:
            self._closed = True
            await self.transport.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


async def _to_messages(messages: Any) -> tuple[ChatMessage, ...]:
    """Chat messages (see :mod:`llava_next_sdk.messages`) -> ChatMessage, their images prepared in one
    worker-thread hop."""
    read = read_messages(messages)
    images = await to_image_parts([ref.source for message in read for ref in message.images])
    return to_chat_messages(read, images)


def _with_detail(part: ImagePart, detail: Any) -> ImagePart:
    """*part* with OpenAI's image *detail* (``ImagePart`` checks the value: low, high or auto); *part* as it is
    when *detail* is ``None``."""
    return part if detail is None or detail == part.detail else dataclasses.replace(part, detail=detail)


class TextStream:
    """The async context manager returned by :meth:`AsyncClient.stream`.

    Inside the block it is an async iterator of ``str`` deltas. After the stream ends, ``result`` holds
    the :class:`GenerationResult` (``text``, ``finish_reason``, ``usage``, ``timings``); ``text`` holds
    what arrived so far in any case.
    """

    def __init__(
        self,
        client: AsyncClient,
        build: Callable[[], Awaitable[ChatRequest]],
        transport: AsyncTransport | None = None,
    ) -> None:
        self._client = client
        self._transport = transport or client.transport
        self._build = build
        self._context: Any = None
        self._items: Any = None
        self._deltas: list[str] = []
        self.result: GenerationResult | None = None

    async def __aenter__(self) -> TextStream:
        if self._context is not None:
            raise RuntimeError("a TextStream can be entered once; call client.stream(...) again")
        self._client._check_open()
        request = await self._build()
        self._context = self._transport.stream(request)
        self._items = await self._context.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> Any:
        aclose = getattr(self._items, "aclose", None)
        if aclose is not None:  # an async generator left suspended must not wait for the garbage collector
            with anyio.CancelScope(shield=True):
                try:
                    await aclose()
                except Exception:
                    pass  # the transport's own exit below reports what matters
        return await self._context.__aexit__(*exc)

    def __aiter__(self) -> TextStream:
        return self

    async def __anext__(self) -> str:
        if self._items is None:
            raise RuntimeError("use the stream inside 'async with client.stream(...) as stream:'")
        if self.result is not None:
            raise StopAsyncIteration
        try:
            item = await self._items.__anext__()
        except StopAsyncIteration:
            raise LlavaNextError("the transport ended the stream without a result") from None
        if isinstance(item, GenerationResult):
            self.result = item
            raise StopAsyncIteration
        self._deltas.append(item)
        return item

    @property
    def text(self) -> str:
        return "".join(self._deltas) if self.result is None else self.result.text

    @property
    def usage(self) -> Usage | None:
        return self.result.usage if self.result is not None else None

    @property
    def finish_reason(self) -> str | None:
        return self.result.finish_reason if self.result is not None else None

    async def until_done(self) -> GenerationResult:
        """Read the rest of the stream and return the result."""
        async for _ in self:
            pass
        assert self.result is not None
        return self.result


# ------------------------------------------------------------------------------------------ sync twin


class _LoopThread:
    """An asyncio event loop on a daemon thread; ``run(coro)`` runs a coroutine there and waits.

    This is what lets the sync client work in Jupyter, whose own loop is already running in the main
    thread: our loop is a different one, on a different thread. :meth:`stop` cancels what still runs there
    (a call waiting on another thread then raises :class:`LlavaNextError`), then stops the loop.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.stopping = False
        self._submitting = threading.Lock()  # a call is scheduled before stop() begins, or refused after
        self._thread = threading.Thread(target=self._main, name="llava-next-sdk-loop", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Future:
        with self._submitting:  # scheduled before stop()'s wind-down (which cancels it), or refused
            if self.stopping or self.loop.is_closed():
                coro.close()  # never started: no "never awaited" warning
                raise APIConnectionError("this client is closed; create a new one")
            return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a sync Client cannot be called from its own event-loop thread")
        future = self.submit(coro)
        try:
            return future.result()
        except CancelledError:
            if self.stopping:  # close() on another thread cancelled this call
                raise LlavaNextError("the client was closed while this call was running") from None
            raise
        except BaseException:
            future.cancel()  # KeyboardInterrupt in the caller cancels the work on the loop
            raise

    def stop(self, before: Coroutine[Any, Any, Any] | None = None) -> None:
        """Run *before* (the client's ``aclose``), cancel every task still on the loop, stop it, close it."""
        if not self._thread.is_alive():  # a forked child's copy (threads do not survive fork): nothing runs it
            self.stopping = True
            if before is not None:
                before.close()
            return
        with self._submitting:
            if self.loop.is_closed() or self.stopping:
                if before is not None:
                    before.close()
                return
            self.stopping = True

        async def wind_down() -> None:
            # the calls first (each then says the client was closed), then the transport under them
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            if before is not None:
                try:
                    await before
                except Exception:
                    pass  # closing is best effort

        if threading.current_thread() is self._thread:  # collected on our own thread: cannot wait here
            if before is not None:
                before.close()
            self.loop.call_soon(self.loop.stop)
            return
        try:
            asyncio.run_coroutine_threadsafe(wind_down(), self.loop).result(timeout=10)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


def _close_client(runner: _LoopThread, client: AsyncClient) -> None:
    """Close *client*'s transport (its connections) and stop *runner*: ``Client.close()``, and the finalizer of
    a client dropped without closing it."""
    runner.stop(client.aclose())


class Client:
    """The synchronous twin of :class:`AsyncClient`, for scripts and notebooks (same arguments, same
    methods without ``await``; ``stream`` is a plain context manager and iterator).

    It runs an event loop on a background thread, so it also works where a loop is already running
    (Jupyter). Close it with ``close()`` or a ``with`` block; a call still running on another thread then
    raises :class:`LlavaNextError`.
    """

    def __init__(self, model: str | os.PathLike | None = None, **kwargs: Any) -> None:
        self._arguments = (model, kwargs)
        self._forked = threading.Lock()
        self._start()

    def _start(self) -> None:
        """Start the loop thread and build the async client on it (again in a forked child: see :meth:`_live`)."""
        model, kwargs = self._arguments
        self._pid = os.getpid()
        self._runner = _LoopThread()

        async def build() -> AsyncClient:
            return AsyncClient(model, **kwargs)

        try:
            self._async = self._runner.run(build())
        except BaseException:
            self._runner.stop()
            raise
        # A client dropped without close() still closes its connections and stops its thread when collected.
        self._finalizer = weakref.finalize(self, _close_client, self._runner, self._async)

    def _live(self) -> _LoopThread:
        """The loop thread, started anew in a process forked from the one that made this client (a
        ``multiprocessing`` worker, a pre-forking server): threads do not survive ``fork``, so the parent's
        loop would never run a call, and its connections are the parent's. The child builds its own client from
        the same arguments; the parent's stays the parent's to close. (An ``http_client=`` the caller gave is among
        those arguments and belongs to the parent's loop: calls through it fail in the child with
        ``APIConnectionError``; give each process its own.)"""
        if self._pid != os.getpid():
            with self._forked:
                if self._pid != os.getpid():
                    self._finalizer.detach()  # never run in the child: it would wait on a thread that is not here
                    self._start()
        return self._runner

    @property
    def async_client(self) -> AsyncClient:
        self._live()
        return self._async

    def generate(self, images: Any, prompt: str, **kwargs: Any) -> GenerationResult:
        runner = self._live()
        return runner.run(self._async.generate(images, prompt, **kwargs))

    def chat(self, messages: Sequence[Mapping | ChatMessage], **params: Any) -> GenerationResult:
        runner = self._live()
        return runner.run(self._async.chat(messages, **params))

    def map(self, items: Iterable[Any], *, concurrency: int = 4, **params: Any) -> list[GenerationResult | Exception]:
        runner = self._live()
        return runner.run(self._async.map(items, concurrency=concurrency, **params))

    def stream(self, images: Any, prompt: str, **kwargs: Any) -> SyncTextStream:
        self._live()
        return SyncTextStream(self, self._async.stream(images, prompt, **kwargs))

    def stream_chat(self, messages: Sequence[Mapping | ChatMessage], **params: Any) -> SyncTextStream:
        self._live()
        return SyncTextStream(self, self._async.stream_chat(messages, **params))

    def with_options(
        self, *, timeout: Any = None, max_retries: int | None = None, headers: Mapping[str, str] | None = None
    ) -> Client:
        """This client with another ``timeout``, ``max_retries`` or extra ``headers``, on the same loop thread and
        connections or engine (see :meth:`AsyncClient.with_options`); closing it closes only it."""
        return _ClientWithOptions(self, {"timeout": timeout, "max_retries": max_retries, "headers": headers})

    def close(self) -> None:
        if self._pid != os.getpid():  # a forked child that never used it: nothing of its own to close
            self._finalizer.detach()
            return
        self._finalizer()  # once: closes the transport, cancels calls still running, stops the thread

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _ClientWithOptions(Client):
    """What :meth:`Client.with_options` gives: the parent's loop thread, its async client derived with *options*
    (derived again if the parent rebuilt its own, as in a forked child)."""

    def __init__(self, parent: Client, options: dict[str, Any]) -> None:
        self._parent = parent
        self._options = options
        self._base: AsyncClient | None = None
        self._closed = False
        self._live()

    def _live(self) -> _LoopThread:
        if self._closed:  # also in a forked child, where the parent builds its client again
            raise APIConnectionError("this client is closed; create a new one")
        runner = self._parent._live()
        if self._base is not self._parent._async:
            self._base = self._parent._async
            self._async = self._base.with_options(**self._options)
            self._runner = runner
        return runner

    def with_options(
        self, *, timeout: Any = None, max_retries: int | None = None, headers: Mapping[str, str] | None = None
    ) -> Client:
        given = {"timeout": timeout, "max_retries": max_retries, "headers": headers}
        return _ClientWithOptions(self._parent, {**self._options, **{k: v for k, v in given.items() if v is not None}})

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._live().run(self._async.aclose())
        except APIConnectionError:
            pass  # the parent is closed: so is this one
        self._closed = True

    def __repr__(self) -> str:
        return f"{self._parent!r}.with_options({self._options!r})"


class SyncTextStream:
    """``with client.stream(...) as stream: for delta in stream: ...``; then ``stream.result``.

    The async stream runs as one task on the client's loop thread and hands deltas over a queue;
    leaving the block early cancels that task, which closes the connection or stops the generation.
    ``text``, ``result``, ``usage`` and ``finish_reason`` tell what this side has read (as the async stream's do).
    """

    def __init__(self, client: Client, stream: TextStream) -> None:
        self._client = client  # held: a Client(...).stream(...) one-liner must not be collected under the stream
        self._runner = client._runner
        self._stream = stream
        self._queue: queue.Queue = queue.Queue()
        self._future: Future | None = None
        self._pump_done = threading.Event()
        self._finished = False
        self._deltas: list[str] = []

    async def _pump(self) -> None:
        try:
            async with self._stream as stream:
                self._queue.put(("started", None))
                async for delta in stream:
                    self._queue.put(("delta", delta))
            self._queue.put(("end", None))
        except BaseException as exc:
            self._queue.put(("error", exc))
            raise
        finally:
            self._pump_done.set()

    def _next_event(self) -> tuple[str, Any]:
        kind, value = self._queue.get()
        if kind == "error":
            self._finished = True
            if isinstance(value, asyncio.CancelledError):  # the pump runs on our asyncio loop
                if self._runner.stopping:  # close() on another thread cancelled it
                    raise LlavaNextError("the client was closed while this call was running")
                raise LlavaNextError("the stream was cancelled")
            raise value
        return kind, value

    def __enter__(self) -> SyncTextStream:
        self._future = self._runner.submit(self._pump())
        try:
            self._next_event()  # "started": the request was accepted
        except BaseException:
            self._future.cancel()
            raise
        return self

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._future is None:  # not entered: nothing would ever arrive
            raise RuntimeError("use the stream inside 'with client.stream(...) as stream:'")
        if self._finished:
            raise StopIteration
        kind, value = self._next_event()
        if kind == "end":
            self._finished = True
            raise StopIteration
        self._deltas.append(value)
        return value

    def until_done(self) -> GenerationResult:
        """Read the rest of the stream and return the result."""
        for _ in self:
            pass
        if self.result is None:
            raise LlavaNextError("the stream ended without a result")
        return self.result

    def __exit__(self, *exc: Any) -> None:
        future = self._future
        if future is not None and not self._pump_done.is_set():
            future.cancel()  # cancels the pump task on the loop thread
            self._pump_done.wait(timeout=30)  # until its stream context has exited (connection closed)

    @property
    def result(self) -> GenerationResult | None:
        """The result, once this side has read to the end (``None`` before)."""
        return self._stream.result if self._finished else None

    @property
    def text(self) -> str:
        """The deltas read so far; the whole text once finished."""
        result = self.result
        return result.text if result is not None else "".join(self._deltas)

    @property
    def usage(self) -> Usage | None:
        result = self.result
        return result.usage if result is not None else None

    @property
    def finish_reason(self) -> str | None:
        result = self.result
        return result.finish_reason if result is not None else None
