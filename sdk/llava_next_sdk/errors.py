"""The one error hierarchy of llava-next, shared by the SDK's transports, the engine and the server.

Every error a user can see derives from :class:`LlavaNextError` and carries an HTTP-like ``status``
and a ``message`` that says what was wrong and what to do. The server turns them into OpenAI-shaped
error bodies (``{"error": {"message", "type", "param", "code"}}``) and the HTTP transport turns those
bodies back into the same classes, so local and remote calls fail alike.

    LlavaNextError
    ├── APIError                      something answered with an error
    │   ├── BadRequestError  (400)    invalid input; also a ValueError
    │   │   ├── InvalidImageError     an image could not be read or is unusable
    │   │   ├── ContextLengthExceededError
    │   │   └── UnsupportedParameterError
    │   ├── AuthenticationError (401)
    │   ├── NotFoundError (404)
    │   │   └── ModelNotFoundError    the request names a model the endpoint does not serve
    │   ├── OverloadedError (429/503) queue full or rate limited; retry later
    │   └── ServerError (5xx)
    ├── APIConnectionError            nothing answered
    │   └── APITimeoutError           a connect/read timeout passed
    └── RequestCancelledError         the request was cancelled
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
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
    "error_from_status",
]


class LlavaNextError(Exception):
    """Base of every llava-next error."""

    status: int | None = None
    code: str = "error"
    type: str = "error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        param: str | None = None,
        request_id: str | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.param = param
        self.request_id = request_id
        self.body = body

    @property
    def status_code(self) -> int | None:
        """:attr:`status`, by the name openai-python's and ollama's errors give it."""
        return self.status

    def to_dict(self) -> dict:
        """The OpenAI-shaped error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class APIError(LlavaNextError):
    """An endpoint (or the in-process engine) answered with an error."""

    status = 500
    type = "api_error"


class BadRequestError(APIError, ValueError):
    status = 400
    type = "invalid_request_error"
    code = "bad_request"


class InvalidImageError(BadRequestError):
    """An image could not be read, decoded, or used (names the image's index where known)."""

    code = "invalid_image"

    def __init__(self, message: str, *, index: int | None = None, **kwargs: Any) -> None:
        if index is not None and not message.startswith(f"image {index}:"):
            message = f"image {index}: {message}"
        super().__init__(message, **kwargs)
        self.index = index

    @staticmethod
    def index_in(message: str) -> int | None:
        """The image index a message names as its ``image N:`` prefix (an error read back from a server)."""
        found = re.match(r"image (\d+): ", message)
        return int(found.group(1)) if found else None


class ContextLengthExceededError(BadRequestError):
    code = "context_length_exceeded"


class UnsupportedParameterError(BadRequestError):
    code = "unsupported_parameter"


class AuthenticationError(APIError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFoundError(APIError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class OverloadedError(APIError):
    """The queue is full or the endpoint rate-limits: retry later (``retry_after`` seconds if known)."""

    status = 429
    type = "overloaded_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ServerError(APIError):
    status = 500
    type = "server_error"
    code = "server_error"

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        #: Seconds the endpoint asked to wait (its ``Retry-After``), when it sent one with a 5xx (e.g. a 503).
        self.retry_after = retry_after


class APIConnectionError(LlavaNextError):
    """The endpoint could not be reached."""

    type = "connection_error"
    code = "connection_error"


class APITimeoutError(APIConnectionError):
    type = "timeout_error"
    code = "timeout"


class RequestCancelledError(LlavaNextError):
    type = "cancelled"
    code = "cancelled"


_BY_CODE: dict[str, type[APIError]] = {
    cls.code: cls
    for cls in (
        BadRequestError,
        InvalidImageError,
        ContextLengthExceededError,
        UnsupportedParameterError,
        AuthenticationError,
        NotFoundError,
        ModelNotFoundError,
        OverloadedError,
        ServerError,
    )
}


MESSAGE_LIMIT = 500
"""Characters of an error body kept as the message (an HTML page from a proxy can be long)."""


def _message_of(body: Any, err: Any) -> str | None:
    """The human message of an error body, in the shapes servers send: OpenAI's ``{"error": {"message"}}``, a
    plain ``{"error": "..."}``, vLLM's ``{"object": "error", "message"}``, FastAPI's ``{"detail": "..."}`` or its
    validation errors' list, or text."""
    candidates: list[Any] = []
    if isinstance(err, dict):
        candidates.append(err.get("message"))
    elif isinstance(err, str):
        candidates.append(err)
    if isinstance(body, dict):
        candidates += [body.get("message"), body.get("detail"), _validation_details(body.get("detail"))]
    elif isinstance(body, str):
        candidates.append(body)
    for candidate in candidates:
        if isinstance(candidate, str) and candidate.strip():
            text = candidate.strip()
            return text if len(text) <= MESSAGE_LIMIT else text[:MESSAGE_LIMIT] + "..."
    return None


def _validation_details(detail: Any) -> str | None:
    """FastAPI's (pydantic's) list of validation errors, ``[{"loc": [...], "msg": "..."}]``, in one line."""
    if not isinstance(detail, list):
        return None
    items = [
        f"{'.'.join(map(str, item.get('loc') or ())) or 'body'}: {item['msg']}"
        for item in detail
        if isinstance(item, dict) and isinstance(item.get("msg"), str)
    ]
    return "; ".join(items) or None


def error_from_status(
    status: int, body: Any = None, *, request_id: str | None = None, retry_after: float | None = None
) -> APIError:
    """Rebuild the error class for an HTTP *status* and an OpenAI-shaped error *body*."""
    err = body.get("error") if isinstance(body, dict) else None
    message = _message_of(body, err) or f"HTTP {status}"
    code = (err or {}).get("code") if isinstance(err, dict) else None
    param = (err or {}).get("param") if isinstance(err, dict) else None
    cls: type[APIError] | None = _BY_CODE.get(code) if isinstance(code, str) else None
    if cls is None:
        kind = (err or {}).get("type") if isinstance(err, dict) else None
        if status == 400 or status == 422:
            cls = ContextLengthExceededError if "context length" in str(message).lower() else BadRequestError
        elif status in (401, 403):
            cls = AuthenticationError
        elif status == 404:
            cls = NotFoundError
        elif status in (429, 503):
            cls = OverloadedError
        elif status < 500 and kind == "invalid_request_error":  # 405, 413, ...: the request itself was wrong
            cls = BadRequestError
        else:
            cls = ServerError if status >= 500 else APIError
    kwargs: dict = {"status": status, "param": param, "request_id": request_id, "body": body}
    if issubclass(cls, (OverloadedError, ServerError)):
        kwargs["retry_after"] = retry_after
    if issubclass(cls, InvalidImageError):  # the server's message names the image as the local error does
        kwargs["index"] = InvalidImageError.index_in(str(message))
    return cls(str(message), **kwargs)
