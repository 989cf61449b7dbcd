"""The request handle: one request's stream of text, readable from threads, asyncio and trio, cancellable anywhere.

The engine thread pushes text deltas and the ending (:meth:`RequestHandle._push`, :meth:`RequestHandle._finish`);
readers wait on a condition (threads) or on an event of their own loop, woken from the engine thread.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING

from .request import EngineResult, PreparedRequest

if TYPE_CHECKING:
    import anyio

    from .scheduler import Engine

__all__ = ["RequestHandle"]


def _loop_waker() -> tuple[anyio.Event, Callable[[], None]]:
    """An event of the current event loop and a function that sets it from any thread."""
    import asyncio

    import anyio
    from anyio.lowlevel import current_token  # anyio's own loop detection: no sniffio needed

    event = anyio.Event()
    native = getattr(current_token(), "native_token", None)  # the asyncio loop, or trio's TrioToken
    if native is not None and hasattr(native, "run_sync_soon"):
        run_sync_soon = native.run_sync_soon
        return event, lambda: run_sync_soon(event.set)
    loop = native if native is not None else asyncio.get_running_loop()

    def wake() -> None:
        loop.call_soon_threadsafe(event.set)

    return event, wake


class RequestHandle:
    """One submitted request. Iterate it for text deltas; :meth:`result` / :meth:`aresult` for the end.

    Thread-safe: the engine thread pushes, any thread or event loop reads, anyone may :meth:`cancel`.
    When the request fails, iteration and ``result`` raise the error (an ``llava_next_sdk.errors`` class);
    a cancelled request raises :class:`RequestCancelledError`. Leaving either iteration early (``break``,
    an exception, a cancelled task) cancels the request.
    """

    def __init__(self, request_id: str, prepared: PreparedRequest, engine: Engine) -> None:
        self.id = request_id
        self.prepared = prepared
        self._engine = engine
        self._cond = threading.Condition()
        self._ended = threading.Event()  # for result(): set once, so a waiter does not wake at every delta
        self._deltas: collections.deque[str] = collections.deque()
        self._result: EngineResult | None = None
        self._error: BaseException | None = None
        self._wakers: list[Callable[[], None]] = []
        self.cancelled = False
        self.submitted_at = time.monotonic()
        self.started = False  # before_generate was called (once, on the engine thread)
        self._recorded = False  # its ending was counted and after_generate called (once; under the stats lock)

    # --- engine side
    def _notify(self) -> None:
        self._cond.notify_all()
        wakers, self._wakers = self._wakers, []
        for wake in wakers:
            try:
                wake()
            except RuntimeError:  # that event loop is closed: nobody is waiting there any more
                pass

    def _push(self, text: str) -> None:
        if not text:
            return
        with self._cond:
            self._deltas.append(text)
            self._notify()

    def _finish(self, result: EngineResult | None = None, error: BaseException | None = None) -> None:
        with self._cond:
            if self.done:
                return
            self._result, self._error = result, error
            self._ended.set()
            self._notify()

    # --- consumer side
    @property
    def done(self) -> bool:
        return self._result is not None or self._error is not None

    def cancel(self) -> None:
        """Stop this request: a queued one leaves the queue now (ending cancelled), a running one leaves the
        batch at the engine's next step."""
        if not self.done:
            self.cancelled = True
            self._engine._withdraw(self)

    def _outcome(self) -> EngineResult:
        """The ending of a finished request: its result, or its error raised."""
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise RuntimeError(f"request {self.id} has not finished")
        return self._result

    def _take(self) -> tuple[list[str], bool]:
        deltas = list(self._deltas)
        self._deltas.clear()
        return deltas, self.done

    def __iter__(self) -> Iterator[str]:
        """Blocking iteration over text deltas (for plain threads); leaving it early cancels the request."""
        finished = False
        try:
            while True:
                with self._cond:
                    while not self._deltas and not self.done:
                        self._cond.wait()
                    deltas, done = self._take()
                yield from deltas
                if done:
                    finished = True
                    if self._error is not None:
                        raise self._error
                    return
        finally:
            if not finished:
                self.cancel()

    def result(self, timeout: float | None = None) -> EngineResult:
        """Block until the request ends; the :class:`EngineResult` (or raise its error)."""
        if not self._ended.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        return self._outcome()

    async def _wait(self, deltas: bool = True) -> None:
        """Until there is text to read (with *deltas*) or the request has ended; at least until the next push."""
        with self._cond:
            if (deltas and self._deltas) or self.done:
                return
            event, wake = _loop_waker()
            self._wakers.append(wake)
        await event.wait()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[str]:
        """Text deltas without blocking the event loop (asyncio or trio); cancelling the reader cancels the request."""
        try:
            while True:
                await self._wait()
                with self._cond:
                    deltas, done = self._take()
                for delta in deltas:
                    yield delta
                if done:
                    if self._error is not None:
                        raise self._error
                    return
        except BaseException:
            self.cancel()
            raise

    async def aresult(self) -> EngineResult:
        """Wait for the end without blocking the event loop; cancelling the waiter cancels the request."""
        try:
            while not self.done:
                await self._wait(deltas=False)  # the text stays for a reader of the stream
        except BaseException:
            self.cancel()
            raise
        return self._outcome()
