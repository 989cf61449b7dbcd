"""The OpenAI Chat Completions wire format, defined once for the server and the HTTP transport.

Pure functions over JSON-ready dicts and bytes: no I/O, nothing heavy imported. The server parses
requests and builds responses with it; the HTTP transport builds requests and parses responses with
the same functions, so the two cannot drift apart.

Request body (``POST /v1/chat/completions``)::

    {"model": "...", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}],
     "max_tokens": 32, "temperature": 0, "top_p": 1, "stop": ["\\n"], "seed": 0,
     "stream": true, "stream_options": {"include_usage": true}}

Response body::

    {"id": "chatcmpl-...", "object": "chat.completion", "created": 1700000000, "model": "...",
     "choices": [{"index": 0, "message": {"role": "assistant", "content": "..."},
                  "finish_reason": "stop", "logprobs": null}],
     "usage": {"prompt_tokens": 1200, "completion_tokens": 20, "total_tokens": 1220,
               "prompt_tokens_details": {"image_tokens": 1176}},          # our extension field
     "timings": {"queue_seconds": 0.01, "time_to_first_token": 0.2, "total_seconds": 1.3}}  # ours

Stream: Server-Sent Events ``data: <chunk JSON>\\n\\n`` ending with ``data: [DONE]\\n\\n``. Chunks are
``{"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "..."},
"finish_reason": null}], ...}``; the last choice chunk has the ``finish_reason``; with
``stream_options.include_usage`` one more chunk follows with ``"choices": []`` and ``usage`` (and
our ``timings``). An error after the stream started is sent as ``data: {"error": {...}}``.

Error body (any non-2xx status): ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import email.utils
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import (
    APIError,
    BadRequestError,
    InvalidImageError,
    LlavaNextError,
    ServerError,
    UnsupportedParameterError,
    error_from_status,
)
from .messages import ImageRef, read_messages, to_chat_messages
from .types import ChatMessage, ChatRequest, GenerationParams, GenerationResult, ImagePart, TextPart, Timings, Usage

__all__ = [
    "CHAT_COMPLETIONS_PATH",
    "MODELS_PATH",
    "REQUEST_ID_HEADER",
    "SSE_DONE",
    "ParsedChatRequest",
    "StreamChunk",
    "build_chat_request",
    "parse_chat_request",
    "build_chat_response",
    "parse_chat_response",
    "build_stream_chunk",
    "parse_stream_chunk",
    "encode_sse",
    "SSEDecoder",
    "usage_to_wire",
    "usage_from_wire",
    "timings_to_wire",
    "timings_from_wire",
    "build_error_body",
    "parse_error",
    "parse_retry_after",
    "decode_data_url",
    "build_models_list",
]

CHAT_COMPLETIONS_PATH = "/chat/completions"
"""Relative to the ``/v1`` base URL."""
MODELS_PATH = "/models"
REQUEST_ID_HEADER = "x-request-id"
SSE_DONE = b"data: [DONE]\n\n"
_SSE_LINE_END = re.compile(r"\r\n|\r|\n")

# Request fields we understand, besides the sampling parameters of GenerationParams.
_REQUEST_FIELDS = {"model", "messages", "stream", "stream_options", "max_completion_tokens", "n", "user"}
# Fields OpenAI clients send with their default value: accepted with that value only.
_DEFAULT_ONLY = {
    "n": 1,
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logprobs": False,
    "response_format": {"type": "text"},
}
_STATUS_BY_ERROR_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "not_found_error": 404,
    "overloaded_error": 429,
    "server_error": 500,
}


# ---------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class ParsedChatRequest:
    """A request body as the server sees it: the wire-neutral request plus the transport options."""

    request: ChatRequest
    stream: bool = False
    include_usage: bool = False


def _message_to_wire(message: ChatMessage) -> dict:
    if len(message.content) <= 1 and all(isinstance(p, TextPart) for p in message.content):
        # Plain-string content is what every endpoint understands for a turn of one text; several text parts
        # stay parts, for the chat template renders them itself (joining them here would change the prompt)
        return {"role": message.role, "content": message.text}
    parts: list[dict[str, Any]] = []
    for part in message.content:
        if isinstance(part, TextPart):
            parts.append({"type": "text", "text": part.text})
        else:
            detail = {} if part.detail == "auto" else {"detail": part.detail}
            parts.append({"type": "image_url", "image_url": {"url": part.as_url(), **detail}})
    return {"role": message.role, "content": parts}


def build_chat_request(
    request: ChatRequest, *, model: str | None = None, stream: bool = False, include_usage: bool = True
) -> dict:
    """The JSON body for *request*. ``model`` fills in when ``request.model`` is ``None``; with neither, the
    body names no model and the endpoint answers with its own.

    Images with ``data`` become base64 data URLs. With *stream*, ``stream_options.include_usage`` asks
    for the final usage chunk (set *include_usage* False for endpoints that reject it).
    """
    body: dict[str, Any] = {"messages": [_message_to_wire(m) for m in request.messages]}
    if request.model or model:  # else the endpoint's default model answers
        body = {"model": request.model or model, **body}
    body.update(request.params.to_dict())
    if stream:
        body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    return body


def _bad(message: str, param: str | None = "messages") -> BadRequestError:
    return BadRequestError(message, param=param)


def _brief(value: Any) -> str:
    """A short repr of a client's value for an error message (never the whole of it)."""
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    text = repr(value)
    return text if len(text) <= 60 else text[:50] + "...'"


def _wire_image(ref: ImageRef) -> ImagePart:
    """An image of a request body: a URL (fetched or decoded later, by the engine under its URL policy), or the
    bytes of a ``base64`` image part."""
    if isinstance(ref.source, ImagePart):
        return ref.source
    if isinstance(ref.source, bytes):  # a {"type": "image", "base64": ...} part, its base64 decoded already
        return ImagePart(data=ref.source, detail=ref.detail)
    if not isinstance(ref.source, str):
        raise InvalidImageError(
            f"{ref.where}: an image's URL must be a string, got {_json_type(ref.source)}",
            index=ref.index,
            param="messages",
        )
    return ImagePart(url=ref.source, detail=ref.detail)


def _json_type(value: Any) -> str:
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def parse_chat_request(body: Any) -> ParsedChatRequest:
    """Validate a request body and turn it into a :class:`ParsedChatRequest`.

    Raises :class:`UnsupportedParameterError` naming every field we do not support (``n`` other than 1
    included) and :class:`BadRequestError` (``InvalidImageError`` for image parts) for malformed input.
    Image URLs are not fetched or decoded here: that is the engine's job, under its URL policy.
    """
    if not isinstance(body, Mapping):
        raise _bad("the request body must be a JSON object", param=None)
    known = _REQUEST_FIELDS | set(_DEFAULT_ONLY) | set(GenerationParams.names())
    # a field sent as null is not set (OpenAI's clients and vLLM read it so): only fields given a value count
    unknown = sorted(k for k in body if k not in known and body[k] is not None)
    not_default = sorted(
        k for k, default in _DEFAULT_ONLY.items() if body.get(k) is not None and not _is_default(body[k], default)
    )
    if unknown or not_default:
        shown = [_brief(k)[1:-1] for k in unknown[:5]] + ([f"and {len(unknown) - 5} more"] if len(unknown) > 5 else [])
        named = shown + [f"{k}={_brief(body[k])} (only {k}={json.dumps(_DEFAULT_ONLY[k])})" for k in not_default]
        defaults = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(_DEFAULT_ONLY.items()))
        raise UnsupportedParameterError(
            f"unsupported parameter(s): {', '.join(named)}; supported: {', '.join(sorted(known - set(_DEFAULT_ONLY)))}"
            f", and {defaults} (their defaults only)",
            param=_brief((unknown + not_default)[0])[1:-1],
        )
    read = read_messages(body.get("messages"))
    parsed_messages = to_chat_messages(read, [_wire_image(ref) for m in read for ref in m.images])

    params = {name: body[name] for name in GenerationParams.names() if body.get(name) is not None}
    if body.get("max_completion_tokens") is not None:
        given = body["max_completion_tokens"]
        if isinstance(given, bool) or not isinstance(given, int):
            raise _bad(
                f"'max_completion_tokens' must be an integer, got {_brief(given)}", param="max_completion_tokens"
            )
        if "max_tokens" in params and params["max_tokens"] != given:
            raise _bad("max_tokens and max_completion_tokens disagree; send one", param="max_completion_tokens")
        params["max_tokens"] = body["max_completion_tokens"]
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("'model' must be a string", param="model")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise _bad("'stream_options' must be an object", param="stream_options")
    if body.get("stream_options") and not stream:  # as vLLM answers it (an empty object passes)
        raise _bad("'stream_options' is only allowed with \"stream\": true", param="stream_options")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad(f"'user' must be a string, got {_json_type(user)}", param="user")
    include_usage = options.get("include_usage") or False
    if not isinstance(include_usage, bool):  # "false" as a string would read as true
        raise _bad("'stream_options.include_usage' must be true or false", param="stream_options")
    request = ChatRequest(tuple(parsed_messages), GenerationParams.from_kwargs(params), model)
    return ParsedChatRequest(request, stream=stream, include_usage=include_usage)


def _is_default(value: Any, default: Any) -> bool:
    """*value* is *default* and of its JSON type (``true`` is not ``1``, ``0.0`` is ``0``)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return value is default
    if isinstance(default, Mapping):  # response_format: {"type": "text"}, the plain text it always is
        return isinstance(value, Mapping) and dict(value) == default
    if isinstance(default, int) and default == 1:  # n: an integer
        return type(value) is int and value == default
    return isinstance(value, (int, float)) and value == default


# --------------------------------------------------------------------------------------------- responses


def usage_to_wire(usage: Usage) -> dict:
    out: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    if usage.image_tokens is not None:
        out["prompt_tokens_details"] = {"image_tokens": usage.image_tokens}
    return out


def usage_from_wire(data: Any) -> Usage | None:
    """Our :class:`Usage` from an OpenAI ``usage`` object (``None`` when absent or malformed)."""
    if not isinstance(data, Mapping):
        return None
    details = data.get("prompt_tokens_details")
    image_tokens = details.get("image_tokens") if isinstance(details, Mapping) else None
    prompt, completion = data.get("prompt_tokens") or 0, data.get("completion_tokens") or 0
    if not all(_is_count(n) for n in (prompt, completion)):
        return None
    return Usage(
        prompt_tokens=int(prompt),
        completion_tokens=int(completion),
        image_tokens=int(image_tokens) if image_tokens is not None and _is_count(image_tokens) else None,
    )


def _is_count(value: Any) -> bool:
    """A token count as JSON carries one: a whole number >= 0 (``3.0`` too, never ``True`` or ``"3"``)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 and float(value).is_integer()


def timings_to_wire(timings: Timings) -> dict:
    return {
        "queue_seconds": timings.queue_seconds,
        "time_to_first_token": timings.time_to_first_token,
        "total_seconds": timings.total_seconds,
    }


def timings_from_wire(data: Any) -> Timings | None:
    if not isinstance(data, Mapping):
        return None

    def seconds(key: str) -> float | None:
        value = data.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    return Timings(seconds("queue_seconds"), seconds("time_to_first_token"), seconds("total_seconds"))


def build_chat_response(result: GenerationResult, *, request_id: str, model: str, created: int | None = None) -> dict:
    """The non-stream response body for *result*."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage_to_wire(result.usage) if result.usage is not None else None,
        "timings": timings_to_wire(result.timings),
    }


def _malformed(what: str, body: Any) -> ServerError:
    return ServerError(f"the endpoint sent a malformed {what}: {str(body)[:200]}", body=body)


def parse_chat_response(body: Any) -> GenerationResult:
    """A :class:`GenerationResult` from a response body (``ServerError`` when it is malformed)."""
    if isinstance(body, Mapping) and body.get("error"):  # "error": null in a success body is no error
        raise error_from_status(500, dict(body))
    try:
        choice = body["choices"][0]
        message = choice.get("message") or {}
        text = message.get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError):
        raise _malformed("chat completion", body) from None
    if not isinstance(text, str):
        raise _malformed("chat completion", body)
    return GenerationResult(
        text=text,
        finish_reason=choice.get("finish_reason"),
        usage=usage_from_wire(body.get("usage")),
        timings=timings_from_wire(body.get("timings")) or Timings(),
        model=body.get("model"),
        id=body.get("id"),
    )


# ------------------------------------------------------------------------------------------------ stream


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """What one stream chunk says: a text delta, and/or the finish reason, and/or the usage."""

    delta: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    id: str | None = None
    model: str | None = None


def build_stream_chunk(
    *,
    request_id: str,
    model: str,
    created: int,
    delta: str | None = None,
    role: str | None = None,
    finish_reason: str | None = None,
    usage: Usage | None = None,
    timings: Timings | None = None,
) -> dict:
    """One ``chat.completion.chunk``. With *usage* (and no delta/finish) it is the final usage chunk
    (``choices: []``), as ``stream_options.include_usage`` asks."""
    chunk: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model}
    if usage is not None and delta is None and role is None and finish_reason is None:
        chunk["choices"] = []
        chunk["usage"] = usage_to_wire(usage)
        if timings is not None:
            chunk["timings"] = timings_to_wire(timings)
        return chunk
    delta_obj: dict[str, Any] = {}
    if role is not None:
        delta_obj["role"] = role
    if delta is not None:
        delta_obj["content"] = delta
    chunk["choices"] = [{"index": 0, "delta": delta_obj, "finish_reason": finish_reason, "logprobs": None}]
    if usage is not None:
        chunk["usage"] = usage_to_wire(usage)
    return chunk


def parse_stream_chunk(data: Any) -> StreamChunk:
    """Read one decoded chunk. An ``{"error": ...}`` chunk raises its error class (mid-stream errors)."""
    if not isinstance(data, Mapping):
        raise _malformed("stream chunk", data)
    if data.get("error"):  # "error": null in an ordinary chunk is no error
        err = data["error"] if isinstance(data["error"], Mapping) else {}
        # No HTTP status mid-stream: the event's own "status" (ours), else a numeric "code" (vLLM's), else the
        # error's type stands for it.
        kind = err.get("type")
        status = _STATUS_BY_ERROR_TYPE.get(kind, 500) if isinstance(kind, str) else 500
        for given in (err.get("status"), err.get("code")):
            if isinstance(given, int) and not isinstance(given, bool) and 400 <= given <= 599:
                status = given
                break
        raise error_from_status(status, dict(data))
    delta, finish_reason = "", None
    choices = data.get("choices") or []
    if not isinstance(choices, list):
        raise _malformed("stream chunk", data)
    if choices:
        choice = choices[0]
        if not isinstance(choice, Mapping):
            raise _malformed("stream chunk", data)
        delta_part = choice.get("delta") or {}
        if not isinstance(delta_part, Mapping):
            raise _malformed("stream chunk", data)
        content = delta_part.get("content")
        delta = content if isinstance(content, str) else ""
        finish_reason = choice.get("finish_reason")
    return StreamChunk(
        delta=delta,
        finish_reason=finish_reason,
        usage=usage_from_wire(data.get("usage")),
        timings=timings_from_wire(data.get("timings")),
        id=data.get("id"),
        model=data.get("model"),
    )


def encode_sse(data: Mapping | str) -> bytes:
    """One Server-Sent Event carrying *data* (a dict is JSON-encoded)."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return b"".join(b"data: " + line.encode() + b"\n" for line in text.split("\n")) + b"\n"


class SSEDecoder:
    """Decode Server-Sent Events line by line: ``decode(line)`` returns an event's data (``str``) when a
    blank line completes it, else ``None``. Comment lines and fields other than ``data`` are ignored;
    ``data: [DONE]`` comes back as the string ``"[DONE]"``."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._started = False  # whether the stream's first character has been seen (a BOM there is dropped)

    def feed(self, chunk: bytes) -> list[str]:
        """Decode a chunk of the raw body (any split, UTF-8) and return the data of the events it completes."""
        text = self._pending + self._text.decode(chunk)
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")  # the one byte-order mark a stream may begin with
        events, start = [], 0
        # SSE lines end in CRLF, LF or CR, and nothing else (U+2028 may sit inside a JSON string).
        for match in _SSE_LINE_END.finditer(text):
            if match.group() == "\r" and match.end() == len(text):
                break  # perhaps the first half of a CRLF split across chunks
            data = self.decode(text[start : match.start()])
            start = match.end()
            if data is not None:
                events.append(data)
        self._pending = text[start:]
        return events

    def end(self) -> list[str]:
        """The data of the events still pending at the end of the body."""
        events = [self.decode(self._pending + self._text.decode(b"", final=True)), self.flush()]
        self._pending = ""
        return [e for e in events if e is not None]

    def decode(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            data, self._data = "\n".join(self._data), []
            return data or None  # an event with empty data (a bare "data:" keep-alive) is not dispatched
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        """The pending event's data at end of input (a server that omitted the last blank line)."""
        return self.decode("")


# ------------------------------------------------------------------------------------------------ errors


def build_error_body(error: LlavaNextError) -> dict:
    """The OpenAI-shaped error body for *error* (its HTTP status is ``error.status or 500``)."""
    return error.to_dict()


def parse_error(
    status: int, content: bytes | str | Any, *, request_id: str | None = None, retry_after: float | None = None
) -> APIError:
    """The error class for an error response: *content* is the raw body (JSON or text)."""
    body: Any = content
    if isinstance(content, (bytes, bytearray)):
        content = bytes(content).decode("utf-8", errors="replace")
    if isinstance(content, str):
        try:
            body = json.loads(content)
        except ValueError:
            body = content.strip()
    return error_from_status(status, body, request_id=request_id, retry_after=retry_after)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date (``None`` if absent
    or unreadable; never negative)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


# ------------------------------------------------------------------------------------------------ misc


def decode_data_url(url: str, *, index: int | None = None, param: str | None = None) -> tuple[str, bytes]:
    """``(media_type, bytes)`` of a ``data:image/<type>;base64,<data>`` URL; ``InvalidImageError`` if it is not one.

    The one data-URL decoder: the server, the SDK and ``llava_next_plugin.load_image`` all read data URLs
    with it, so they accept and refuse the same ones. Whitespace inside the base64 (line-wrapped base64)
    is ignored; percent-encoded (non-base64) payloads and media types other than ``image/*`` are refused.
    *param*: the request field the URL came from, for the error (the server says ``"messages"``).
    """
    header, comma, payload = url.partition(",")
    if header[:5].lower() != "data:":
        raise InvalidImageError("not a data URL; expected 'data:image/<type>;base64,<data>'", index=index, param=param)
    if not comma:
        raise InvalidImageError(
            "the data URL has no ',' before its data; expected 'data:image/<type>;base64,<data>'",
            index=index,
            param=param,
        )
    meta = header[5:].split(";")
    media_type = meta[0].strip().lower() or "text/plain"
    if not media_type.startswith("image/"):
        raise InvalidImageError(
            f"a data URL of type {_brief(media_type)} is not an image; expected image/png, image/jpeg, ...",
            index=index,
            param=param,
        )
    if "base64" not in [m.strip().lower() for m in meta[1:]]:
        raise InvalidImageError(
            "image data URLs must be base64-encoded (';base64,'); encode the image bytes with base64.b64encode",
            index=index,
            param=param,
        )
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(
            f"the data URL's base64 payload is corrupt (invalid base64: {exc}); encode the "
            "image bytes with base64.b64encode",
            index=index,
            param=param,
        ) from None
    if not data:
        raise InvalidImageError("the data URL holds no data", index=index, param=param)
    return media_type, data


def build_models_list(model_ids: Iterable[str], *, created: int | None = None, owned_by: str = "llava-next") -> dict:
    """The ``GET /v1/models`` body."""
    created = int(time.time()) if created is None else created
    return {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": created, "owned_by": owned_by} for m in model_ids],
    }
