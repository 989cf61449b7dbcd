"""Transports: how a ``ChatRequest`` reaches a model. See ``base.py`` for the contract.

Only the light seam is imported here; ``http`` (httpx) and ``local`` (torch, via the plugin) are
imported when a client asks for them.
"""

from .base import AsyncTransport, StreamItem

__all__ = ["AsyncTransport", "StreamItem"]
