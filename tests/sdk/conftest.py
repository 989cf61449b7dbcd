"""Fixtures of the SDK tests: both anyio backends, and the loopback OpenAI stand-in server."""

from __future__ import annotations

import pytest
from standin_server import StandinServer


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    """Every ``@pytest.mark.anyio`` test runs on asyncio and on trio."""
    return request.param


@pytest.fixture(scope="session")
def standin():
    server = StandinServer().start()
    yield server
    server.stop()
