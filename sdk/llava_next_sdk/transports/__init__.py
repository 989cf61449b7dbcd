"""Transports: how a ``ChatRequest`` reaches a model. See ``base.py`` for the contract.

Only the light seam is imported here. ``http`` (httpx) is the SDK's own; the in-process transport for
``local:`` URLs is llava-next-plugin's (``llava_next_plugin.local_transport``), found by entry point and
imported at a client's first request through :class:`~llava_next_sdk.transports.deferred.DeferredTransport`.
"""

from .base import AsyncTransport, StreamItem

__all__ = ["AsyncTransport", "StreamItem"]
