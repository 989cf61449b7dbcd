"""The SDK's in-process transport: the llava-next engine in this process, behind the same seam as HTTP.

The SDK knows nothing of this module. The model package offers it through the SDK's transport hook:
``pyproject.toml`` lists it under the entry-point group ``llava_next_sdk.transports`` as the provider of
``local:`` URLs, so ``AsyncClient(model="./checkpoint")`` asks the ``llava_next_sdk_transport`` hook for
``local:./checkpoint`` and gets a :class:`LocalTransport` (the SDK imports this module in a worker thread,
at the first request, since importing the model package imports torch).

The model loads into a process-wide engine that every client, on any event loop, shares (one per model
path and options). Requests go through :func:`llava_next_plugin.validation.prepare_request`, the very
checks the server runs, so the same bad input raises the same error class here and over HTTP. Images the
user gave decoded (a PIL image, an array) arrive decoded and are used as they are: no PNG round trip; one whose
PNG would be over ``Limits.max_image_bytes`` is refused as the HTTP transport refuses it before sending it
(``llava_next_sdk.images.check_png_size``, which encodes only an image whose pixels could be that large). A
request the engine's queue cannot take (:class:`~llava_next_sdk.errors.OverloadedError`) is retried with the
HTTP transport's :class:`~llava_next_sdk.retry.RetryPolicy` (``max_retries=``, ...) before it is queued, so
before any token is produced. Loading the model and preparing a request (image decoding, tokenizing) run in
a worker thread, generation on the engine's thread; the event loop never blocks. Cancelling ``generate`` or
leaving ``stream`` early drops the request from the engine's batch.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
from llava_next_sdk.errors import (
    APIConnectionError,
    APITimeoutError,
    LlavaNextError,
    ModelNotFoundError,
    OverloadedError,
    ServerError,
    UnsupportedParameterError,
)
from llava_next_sdk.hookspecs import hookimpl
from llava_next_sdk.images import check_png_size
from llava_next_sdk.retry import RetryPolicy
from llava_next_sdk.transports.base import holding
from llava_next_sdk.types import ChatRequest, GenerationResult

from ._hub import default_served_name, not_a_local_checkpoint
from .errors import first_line
from .validation import Limits, in_worker_thread, prepare_request

if TYPE_CHECKING:
    from .engine import Engine, PreparedRequest, RequestHandle

__all__ = ["LocalTransport", "llava_next_sdk_transport"]

LOCAL_SCHEME = "local:"
ENGINE_OPTIONS = ("device", "dtype", "max_batch_size", "max_queue", "max_context", "default_max_tokens", "compile")
"""Client options that configure the shared engine (the others are the HTTP transport's)."""
RETRY_OPTIONS = ("max_retries", "backoff_base", "backoff_max", "max_retry_after")
"""Client options that make the :class:`RetryPolicy` (as for HTTP)."""
OPTIONS = frozenset(
    {"model", "engine", "request_limits", "allowed_url_domains", "timeout", *ENGINE_OPTIONS, *RETRY_OPTIONS}
)
"""Every client option a local model accepts."""


class LocalTransport:
    """Runs requests on an in-process :class:`llava_next_plugin.engine.Engine`.

    :param model: a checkpoint folder or hub id (loaded once per process and options, at the first request).
    :param engine: an engine to use instead (then *model* only names it).
    :param limits: the request :class:`~llava_next_plugin.validation.Limits` (client option ``request_limits=``);
        by default the server's limits except that ``http(s)`` image URLs from any host are fetched (this
        is the user's own process).
    :param allowed_url_domains: hosts whose ``http(s)`` image URLs are fetched (a domain allows its subdomains;
        ``()`` none), for apps that pass their users' URLs through; replaces the one in *limits*.
    :param retry_policy: how a request refused by a full queue is retried (default: as the HTTP transport).
    :param timeout: seconds one call may take in all once the model is loaded (its queueing, the whole answer or
        stream included), as for a server; beyond it the request is cancelled and the call raises
        ``APITimeoutError``. ``None`` (the default): no limit.
    :param engine_options: ``device``, ``dtype``, ``max_batch_size``, ... for the shared engine (``compile=True``:
        its decode step compiled on CPU too, after a warm-up of seconds; by default on CUDA only).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        engine: Engine | None = None,
        limits: Limits | None = None,
        allowed_url_domains: Any = None,
        retry_policy: RetryPolicy | None = None,
        timeout: float | None = None,
        **engine_options: Any,
    ) -> None:
        if engine is None and not model:
            raise ValueError("LocalTransport needs a model path or hub id (or an engine)")
        unknown = sorted(set(engine_options) - set(ENGINE_OPTIONS))
        if unknown:
            raise TypeError(
                f"unknown engine option(s) for a local model: {', '.join(unknown)}; "
                f"accepted: {', '.join(ENGINE_OPTIONS)}"
            )
        _check_engine_options(engine_options)
        limits = limits or Limits(allowed_url_domains=None)
        if allowed_url_domains is not None:
            limits = dataclasses.replace(limits, allowed_url_domains=_domains(allowed_url_domains))
        self.model = model
        self.limits = limits
        self.retry_policy = retry_policy or RetryPolicy()
        self.timeout = None if timeout is None else _timeout(timeout)
        self._engine = engine
        self._loads_engine = engine is None
        self._engine_options = engine_options
        self._lock = threading.Lock()  # see holding(): the client may be used from several event loops at once
        self._closed = False
        self._root = self  # the transport it was derived from by with_options (closing that one closes it too)

    def __repr__(self) -> str:
        return f"LocalTransport(model={self.model!r})"

    def _needs_engine(self) -> bool:
        """No engine yet, or the shared one it loaded has stopped (shut down, or its thread failed): the next
        request loads the model's shared engine again (while it drains, its refusals are retried). An engine
        given to it is its owner's to replace."""
        return self._engine is None or (self._loads_engine and self._engine.stopped)

    async def _get_engine(self) -> Engine:
        if self.closed:
            raise APIConnectionError("this client is closed; create a new one")
        if self._needs_engine():
            async with holding(self._lock):
                if self._needs_engine():
                    # Loading a model takes seconds: in a worker thread, never on the event loop.
                    try:
                        loaded = await anyio.to_thread.run_sync(self._load_engine)
                        if not self.closed:  # aclose() while it loaded: the closed client keeps no engine
                            self._engine = loaded
                    except LlavaNextError:
                        raise
                    except OSError as exc:  # transformers' word for a folder or hub id it cannot find or read
                        raise ModelNotFoundError(
                            f"cannot load model {self.model!r}: {first_line(exc)} (give a checkpoint folder or a "
                            "hub id; offline, a local folder)",
                            param="model",
                        ) from exc
                    except Exception as exc:  # only our error classes leave a transport
                        raise ServerError(f"loading model {self.model!r} failed: {first_line(exc)}") from exc
        engine = self._engine
        if engine is None or self.closed:  # closed while it loaded, or while this call waited for the load
            raise APIConnectionError("this client was closed while its model was loading")
        return engine

    def _load_engine(self) -> Engine:
        from .engine import get_shared_engine

        if self.model is None:  # __init__ refuses neither a model nor an engine: only a subclass could get here
            raise RuntimeError("this transport has no model to load")
        why = not_a_local_checkpoint(self.model)
        if why:
            raise ModelNotFoundError(f"model {self.model!r} {why}: give a checkpoint folder or a hub id", param="model")
        return get_shared_engine(self.model, **self._engine_options)

    async def _submit(self, request: ChatRequest) -> tuple[Engine, RequestHandle]:
        prepared, attempt, prepared_for = None, 0, None
        while True:
            engine = await self._get_engine()  # asked at each attempt: a stopped shared engine is replaced
            if engine is not prepared_for:
                prepared, prepared_for = None, engine
            try:
                engine.check_admission()  # cheap: a full queue refuses before any image work
                if prepared is None:
                    prepared = await in_worker_thread(_prepared, engine, request, self.limits)
                return engine, engine.submit(prepared)
            except OverloadedError as exc:  # not queued, so no token yet: retried as the HTTP transport does
                delay = self.retry_policy.delay(attempt, exc.retry_after)
                if delay is None:
                    raise
                attempt += 1
                await anyio.sleep(delay)
            except LlavaNextError:
                raise
            except Exception as exc:  # only our error classes leave a transport
                raise ServerError(f"the local engine failed to prepare the request: {exc!r}") from exc

    def _result(self, engine: Engine, outcome: Any) -> GenerationResult:
        # the model's name as a server started on it reports it (a folder by its base name, a hub id as it is)
        return outcome.to_generation_result(default_served_name(self.model or engine.model_name))

    async def _deadline(self) -> float:
        """When this call must be done (the model loaded first: its loading is not the call's time), or inf."""
        await self._get_engine()
        return float("inf") if self.timeout is None else anyio.current_time() + self.timeout

    async def _within(self, deadline: float, awaitable: Any, handle: RequestHandle | None = None) -> Any:
        """Await *awaitable*; past *deadline*, cancel *handle* and raise :class:`APITimeoutError`."""
        with anyio.move_on_after(deadline - anyio.current_time()) as scope:
            return await awaitable
        if scope.cancelled_caught:
            if handle is not None:
                handle.cancel()
            raise APITimeoutError(
                f"timed out: the call to local model {self.model!r} took longer than its total timeout of "
                f"{self.timeout:g} s; pass a larger timeout="
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def generate(self, request: ChatRequest) -> GenerationResult:
        deadline = await self._deadline()
        engine, handle = await self._within(deadline, self._submit(request))
        try:
            outcome = await self._within(deadline, handle.aresult(), handle)
        finally:
            handle.cancel()  # no-op when finished; stops generation when this task is cancelled
        return self._result(engine, outcome)

    @asynccontextmanager
    async def stream(self, request: ChatRequest) -> AsyncIterator[AsyncIterator[Any]]:
        deadline = await self._deadline()
        engine, handle = await self._within(deadline, self._submit(request))

        async def items() -> AsyncGenerator[Any, None]:
            deltas = handle.__aiter__()
            while True:
                try:
                    delta = await self._within(deadline, deltas.__anext__(), handle)
                except StopAsyncIteration:
                    break
                yield delta
            yield self._result(engine, await self._within(deadline, handle.aresult(), handle))

        iterator = items()
        try:
            yield iterator
        finally:
            handle.cancel()
            await iterator.aclose()

    def with_options(
        self, *, timeout: float | None = None, max_retries: int | None = None, headers: Any = None
    ) -> LocalTransport:
        """This transport with another *timeout* or *max_retries*, on the same engine; closing the one derived
        closes only it. (*headers* are for an HTTP endpoint: refused.)"""
        if headers:
            raise UnsupportedParameterError(
                "headers are sent to an HTTP endpoint; a local model has none to take", param="headers"
            )
        twin = copy.copy(self)
        if timeout is not None:
            twin.timeout = _timeout(timeout)
        if max_retries is not None:
            twin.retry_policy = dataclasses.replace(self.retry_policy, max_retries=max_retries)
        twin._root = self._root
        return twin

    @property
    def closed(self) -> bool:
        return self._closed or self._root._closed

    async def aclose(self) -> None:
        """Forget the engine (it is shared and stays up for the process's other clients)."""
        self._closed = True
        self._engine = None


def _prepared(engine: Engine, request: ChatRequest, limits: Limits) -> PreparedRequest:
    """:func:`prepare_request`, once each decoded image passed the size check an HTTP client makes of its PNG before
    sending it (a server refuses an encoded image over ``max_image_bytes``): the same image, the same error."""
    for index, part in enumerate(request.images):
        if part.image is not None:
            check_png_size(part.image, limits.max_image_bytes, index=index)
    return prepare_request(engine, request, limits)


def _timeout(timeout: Any) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise TypeError(f"timeout={timeout!r}: give the seconds one call may take, a number above 0")
    return float(timeout)


def _check_engine_options(options: dict[str, Any]) -> None:
    """``device=`` and ``dtype=`` that cannot work are refused when the client is made, not at a model load."""
    import torch

    from .engine.scheduler import device_problem
    from .engine.shared import _normalized  # the shared engines' own reading of these options

    device, dtype = options.get("device"), options.get("dtype")
    problem = None if device is None else device_problem(device)
    if problem:
        raise ValueError(f"device={device!r} {problem}")
    if dtype is not None and not isinstance(_normalized("dtype", dtype), (torch.dtype, type(None))):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype: use 'auto', 'float32', 'bfloat16' or 'float16'")


def _domains(value: Any) -> tuple[str, ...]:
    """``allowed_url_domains=``: a host name or a list of them, lower-cased, without a trailing dot."""
    names = (value,) if isinstance(value, str) else value
    if not isinstance(names, (list, tuple, set, frozenset)) or not all(isinstance(n, str) and n for n in names):
        raise TypeError(
            f"allowed_url_domains={value!r} must be a list of host names such as ['example.com'] "
            "(a domain allows its subdomains; [] allows none)"
        )
    return tuple(n.lower().strip(".") for n in names)


@hookimpl
def llava_next_sdk_transport(url: str, options: dict) -> LocalTransport | None:
    """Serve ``local:<path or hub id>`` URLs with a :class:`LocalTransport`."""
    if not isinstance(url, str) or not url.startswith(LOCAL_SCHEME):
        return None
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        server_only = sorted(set(unknown) & {"api_key", "connect_timeout", "read_timeout", "headers", "http_client"})
        hint = f" ({', '.join(server_only)}: options of a server client, with base_url=)" if server_only else ""
        raise TypeError(
            f"unknown option(s) for a local model: {', '.join(unknown)}; accepted: {', '.join(sorted(OPTIONS))}{hint}"
        )
    engine_options = {k: options[k] for k in ENGINE_OPTIONS if options.get(k) is not None}
    retry_policy = RetryPolicy(**{k: options[k] for k in RETRY_OPTIONS if options.get(k) is not None})
    return LocalTransport(
        url[len(LOCAL_SCHEME) :],
        engine=options.get("engine"),
        limits=options.get("request_limits"),
        allowed_url_domains=options.get("allowed_url_domains"),
        retry_policy=retry_policy,
        timeout=options.get("timeout"),
        **engine_options,
    )
