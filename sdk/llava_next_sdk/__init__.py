"""Async client for LLaVA-NeXT, in-process or remote, behind one API.

    from llava_next_sdk import AsyncClient

    async with AsyncClient(base_url="http://127.0.0.1:8000/v1", model="tiny") as client:   # remote
        result = await client.generate("cat.png", "What is this?", max_tokens=32)
    async with AsyncClient(model="path/to/checkpoint") as client:                           # in-process
        async with client.stream("cat.png", "Describe it.") as stream:
            async for delta in stream:
                print(delta, end="")

Importing this package imports neither torch nor transformers, nor anything of llava-next-plugin. A
local model needs that package installed (``pip install llava-next-plugin``): it offers its in-process
transport by entry point, and torch is loaded, in a worker thread, at the first request.
"""

import importlib.metadata

from .client import AsyncClient, Client, SyncTextStream, TextStream
from .errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ContextLengthExceededError,
    InvalidImageError,
    LlavaNextError,
    ModelNotFoundError,
    NotFoundError,
    OverloadedError,
    RequestCancelledError,
    ServerError,
    UnsupportedParameterError,
)
from .transports.base import AsyncTransport
from .types import (
    ChatMessage,
    ChatRequest,
    GenerationParams,
    GenerationResult,
    ImagePart,
    TextPart,
    Timings,
    Usage,
)

try:
    __version__ = importlib.metadata.version("llava-next-sdk")  # written once, in sdk/pyproject.toml
except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "unknown"

__all__ = [
    "AsyncClient",
    "Client",
    "TextStream",
    "SyncTextStream",
    "AsyncTransport",
    "ChatMessage",
    "ChatRequest",
    "GenerationParams",
    "GenerationResult",
    "ImagePart",
    "TextPart",
    "Timings",
    "Usage",
    "LlavaNextError",
    "APIError",
    "BadRequestError",
    "InvalidImageError",
    "ContextLengthExceededError",
    "UnsupportedParameterError",
    "AuthenticationError",
    "NotFoundError",
    "ModelNotFoundError",
    "OverloadedError",
    "ServerError",
    "APIConnectionError",
    "APITimeoutError",
    "RequestCancelledError",
]
