"""A transport whose provider is installed but not imported yet: it is loaded on first use, off the loop.

``AsyncClient(model="./checkpoint")`` needs the ``local:`` transport, which the model package
(llava-next-plugin) provides under the entry-point group ``llava_next_sdk.transports``. Importing that
package imports torch and transformers (seconds), so building a client must not do it: the client gets a
:class:`DeferredTransport`, which imports the provider in a worker thread when the first request comes,
asks the ``llava_next_sdk_transport`` hook again, and from then on hands every call to the transport the
hook gave. The event loop never waits for the import.

Options the provider refuses (a misspelt ``device=``) therefore raise at the first request, not when
the client is built, unless the provider was already loaded in this process.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio

from ..errors import APIConnectionError, BadRequestError, LlavaNextError
from ..types import ChatRequest, GenerationResult
from .base import AsyncTransport, StreamItem, checked_transport, holding, with_options

__all__ = ["DeferredTransport"]


class _Forwarding:
    """A transport that hands every call to the one ``_get()`` gives."""

    async def _get(self) -> AsyncTransport:
        raise NotImplementedError

    async def generate(self, request: ChatRequest) -> GenerationResult:
        return await (await self._get()).generate(request)

    @asynccontextmanager
    async def stream(self, request: ChatRequest) -> AsyncIterator[AsyncIterator[StreamItem]]:
        async with (await self._get()).stream(request) as items:
            yield items


class DeferredTransport(_Forwarding):
    """Stands in for the transport of *url* until its provider (of URL *scheme*) is loaded.

    :param url: the URL given to the ``llava_next_sdk_transport`` hook (``local:<model>``).
    :param options: the client's options, passed to the hook unchanged.
    :param scheme: the entry-point name of the provider to load (``"local"``).
    """

    def __init__(self, url: str, options: dict, scheme: str) -> None:
        self.url = url
        self.scheme = scheme
        self._options = options
        self._transport: AsyncTransport | None = None
        self._lock = threading.Lock()  # see holding(): the client may be used from several event loops at once
        self._closed = False

    def __repr__(self) -> str:
        return f"DeferredTransport({self.url!r}, loaded={self._transport!r})"

    @property
    def loaded(self) -> AsyncTransport | None:
        """The transport the provider gave, once the first request has loaded it (else ``None``)."""
        return self._transport

    def _load(self) -> AsyncTransport:
        """Import the provider and ask the hook (blocking: runs in a worker thread)."""
        from ..plugins import TransportProviderError, get_plugin_manager

        manager = get_plugin_manager()
        try:
            manager.load_transport_providers(self.scheme)
        except TransportProviderError as exc:
            raise LlavaNextError(str(exc)) from exc
        given = manager.hook.llava_next_sdk_transport(url=self.url, options=self._options)
        transport = checked_transport(given, self.url)
        if transport is None:
            raise LlavaNextError(
                f"the installed transport for {self.scheme}: URLs loaded but did not take "
                f"{self.url!r}; reinstall the package that provides it"
            )
        return transport

    async def _get(self) -> AsyncTransport:
        if self._closed:
            raise APIConnectionError("this client is closed; create a new one")
        if self._transport is None:
            async with holding(self._lock):
                if self._transport is None:
                    transport = await anyio.to_thread.run_sync(self._load)
                    if self._closed:  # closed while it loaded: nobody would close what it holds
                        with anyio.CancelScope(shield=True):
                            await transport.aclose()
                        raise APIConnectionError("this client was closed while its transport was loading")
                    self._transport = transport
        return self._transport

    async def aclose(self) -> None:
        self._closed = True
        transport, self._transport = self._transport, None
        if transport is not None:
            await transport.aclose()

    def with_options(self, **options: Any) -> AsyncTransport:
        """The loaded transport's ``with_options(**options)``, once the first request has loaded it."""
        return _WithOptions(self, options)


class _WithOptions(_Forwarding):
    """What :meth:`DeferredTransport.with_options` gives: the transport the provider gives, derived with *options*
    when it is loaded (closing this one closes only it; closing the deferred one closes both)."""

    def __init__(self, deferred: DeferredTransport, options: dict[str, Any]) -> None:
        self._deferred = deferred
        self._options = options
        self._transport: AsyncTransport | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"{self._deferred!r}.with_options({self._options!r})"

    async def _get(self) -> AsyncTransport:
        if self._closed or self._deferred._closed:
            raise APIConnectionError("this client is closed; create a new one")
        if self._transport is None:
            loaded = await self._deferred._get()
            try:
                self._transport = with_options(loaded, **self._options)
            except (TypeError, ValueError) as exc:  # a value the transport cannot take: bad input
                if isinstance(exc, LlavaNextError):
                    raise
                raise BadRequestError(str(exc)) from None
        return self._transport

    def with_options(self, **options: Any) -> AsyncTransport:
        return _WithOptions(self._deferred, {**self._options, **{k: v for k, v in options.items() if v is not None}})

    async def aclose(self) -> None:
        self._closed = True
