"""The Chat Completions wire format: what the server and the HTTP transport both rely on."""

from __future__ import annotations

import base64
import json

import openai.types.chat as openai_chat
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llava_next_sdk import wire
from llava_next_sdk.errors import (
    AuthenticationError,
    BadRequestError,
    ContextLengthExceededError,
    InvalidImageError,
    NotFoundError,
    OverloadedError,
    ServerError,
    UnsupportedParameterError,
)
from llava_next_sdk.types import (
    ChatMessage,
    ChatRequest,
    GenerationParams,
    GenerationResult,
    ImagePart,
    TextPart,
    Timings,
    Usage,
)

PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)


def user_request(*parts, **params) -> ChatRequest:
    return ChatRequest((ChatMessage("user", parts),), GenerationParams(**params))


# ------------------------------------------------------------------------------------------ requests


def test_a_request_survives_the_round_trip():
    request = ChatRequest(
        (
            ChatMessage("system", "Be brief."),
            ChatMessage(
                "user", (ImagePart(data=PNG_1PX), TextPart("What is this?"), ImagePart(url="https://example.com/a.jpg"))
            ),
        ),
        GenerationParams(max_tokens=7, temperature=0.0, top_p=0.9, stop=("\n", "END"), seed=1),
    )
    body = wire.build_chat_request(request, model="tiny", stream=True)
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["messages"][1]["content"][0] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG_1PX).decode()},
    }
    assert body["stream_options"] == {"include_usage": True}
    parsed = wire.parse_chat_request(json.loads(json.dumps(body)))
    assert parsed.stream and parsed.include_usage
    assert parsed.request.params == request.params
    assert parsed.request.model == "tiny"
    assert parsed.request.messages[0] == request.messages[0]
    assert parsed.request.images[0].url == request.images[0].as_url()
    assert parsed.request.images[1].url == "https://example.com/a.jpg"
    assert wire.decode_data_url(parsed.request.images[0].url) == ("image/png", PNG_1PX)


def test_several_text_parts_of_a_message_stay_parts_so_the_chat_template_renders_them_as_locally():
    """One text part goes as a plain string; several stay parts (joined, they made another prompt than the
    local transport's, which hands the template the parts)."""
    parts = (TextPart("You are terse."), TextPart(" Answer in French."))
    request = ChatRequest((ChatMessage("system", parts), ChatMessage("user", "Hi")))
    body = wire.build_chat_request(request)
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "You are terse."},
        {"type": "text", "text": " Answer in French."},
    ]
    assert body["messages"][1]["content"] == "Hi"
    assert wire.parse_chat_request(json.loads(json.dumps(body))).request.messages == request.messages


def test_openai_aliases_are_understood():
    parsed = wire.parse_chat_request(
        {
            "model": "m",
            "max_completion_tokens": 5,
            "n": 1,
            "user": "someone",
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "sys"}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": "https://x.org/i.png"},
                        {"type": "text", "text": "hi"},
                    ],
                },
            ],
        }
    )
    assert parsed.request.params.max_tokens == 5
    assert parsed.request.messages[0].role == "system"
    assert parsed.request.images[0].url == "https://x.org/i.png"
    assert not parsed.stream


@pytest.mark.parametrize(
    "body, error, match",
    [
        (
            {"messages": [{"role": "user", "content": "x"}], "logit_bias": {}, "tools": []},
            UnsupportedParameterError,
            "logit_bias, tools",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, UnsupportedParameterError, "only n=1"),
        ({"messages": []}, BadRequestError, "non-empty list .* got an empty list"),
        (
            {"messages": [{"role": "user", "content": "x"}], "stream": True, "stream_options": {"include_usage": "no"}},
            BadRequestError,
            "include_usage' must be true or false",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 5, "max_completion_tokens": "5"},
            BadRequestError,
            "'max_completion_tokens' must be an integer",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, BadRequestError, "unsupported role 'tool'"),
        ({"messages": [{"role": "user", "content": 3}]}, BadRequestError, "'content' must be"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            BadRequestError,
            "unsupported content part type 'input_audio'",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            InvalidImageError,
            "image 0",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, BadRequestError, "temperature"),
        (
            {"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]},
            BadRequestError,
            "at most 4",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, BadRequestError, "'stream'"),
        ([1, 2], BadRequestError, "JSON object"),
    ],
)
def test_bad_request_bodies_get_clear_typed_errors(body, error, match):
    with pytest.raises(error, match=match):
        wire.parse_chat_request(body)


def test_unsupported_parameter_error_names_the_parameter():
    with pytest.raises(UnsupportedParameterError) as info:
        wire.parse_chat_request({"messages": [{"role": "user", "content": "x"}], "presence_penalty": 1})
    assert info.value.param == "presence_penalty" and info.value.status == 400
    assert wire.build_error_body(info.value)["error"]["code"] == "unsupported_parameter"


# ------------------------------------------------------------------------------------------ responses

RESULT = GenerationResult("A cat.", "stop", Usage(1200, 3, 1176), Timings(0.01, 0.2, 1.5))


def test_a_response_survives_the_round_trip_and_is_valid_for_the_openai_client():
    body = wire.build_chat_response(RESULT, request_id="chatcmpl-1", model="tiny", created=5)
    completion = openai_chat.ChatCompletion.model_validate(body)
    assert completion.choices[0].message.content == "A cat."
    assert completion.usage.prompt_tokens == 1200 and completion.usage.total_tokens == 1203
    parsed = wire.parse_chat_response(json.loads(json.dumps(body)))
    assert (parsed.text, parsed.finish_reason, parsed.usage, parsed.timings) == (
        RESULT.text,
        RESULT.finish_reason,
        RESULT.usage,
        RESULT.timings,
    )
    assert parsed.id == "chatcmpl-1" and parsed.model == "tiny"


def test_a_third_party_response_without_our_extensions_parses():
    parsed = wire.parse_chat_response(
        {
            "id": "x",
            "choices": [{"message": {"content": "hi"}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    )
    assert parsed.usage == Usage(3, 1, None) and parsed.timings == Timings()


@pytest.mark.parametrize("body", [{}, {"choices": []}, {"choices": [{"message": {"content": 5}}]}, "text"])
def test_a_malformed_response_is_a_server_error(body):
    with pytest.raises(ServerError, match="malformed"):
        wire.parse_chat_response(body)


def test_a_chunk_whose_delta_is_not_an_object_is_a_server_error():
    with pytest.raises(ServerError, match="malformed stream chunk"):
        wire.parse_stream_chunk({"choices": [{"index": 0, "delta": "oops"}]})


@pytest.mark.parametrize("usage", [{"prompt_tokens": "n/a"}, {"completion_tokens": -1}, {"prompt_tokens": 1.5}])
def test_usage_that_is_not_token_counts_is_unknown_not_an_exception(usage):
    """Only our error classes leave the SDK: a third party's odd usage reads as no usage."""
    body = {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}
    assert wire.parse_chat_response(dict(body, usage=usage)).usage == wire.parse_chat_response(body).usage
    chunk = {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}], "usage": usage}
    assert wire.parse_stream_chunk(chunk).usage is None


def test_stream_chunks_are_valid_for_the_openai_client_and_parse_back():
    common = {"request_id": "chatcmpl-1", "model": "tiny", "created": 5}
    chunks = [
        wire.build_stream_chunk(role="assistant", delta="", **common),
        wire.build_stream_chunk(delta="A", **common),
        wire.build_stream_chunk(delta=" cat.", **common),
        wire.build_stream_chunk(finish_reason="stop", **common),
        wire.build_stream_chunk(usage=RESULT.usage, timings=RESULT.timings, **common),
    ]
    for chunk in chunks:
        openai_chat.ChatCompletionChunk.model_validate(chunk)
    assert chunks[-1]["choices"] == []
    parsed = [wire.parse_stream_chunk(c) for c in chunks]
    assert "".join(p.delta for p in parsed) == "A cat."
    assert parsed[3].finish_reason == "stop"
    assert parsed[4].usage == RESULT.usage and parsed[4].timings == RESULT.timings


@pytest.mark.parametrize(
    "error",
    [
        ContextLengthExceededError("too long", param="messages"),
        BadRequestError("bad"),
        OverloadedError("busy"),
        ServerError("boom"),
    ],
)
def test_an_error_chunk_raises_its_error_class(error):
    with pytest.raises(type(error), match=error.message) as info:
        wire.parse_stream_chunk(wire.build_error_body(error))
    assert type(info.value) is type(error) and info.value.status == error.status


@pytest.mark.parametrize(
    "err, error, status",
    [
        # ours: the server adds the status (a stream cut by a drain, an engine shutting down)
        (
            {"message": "shutting down", "type": "overloaded_error", "code": "overloaded", "status": 503},
            OverloadedError,
            503,
        ),
        ({"message": "stopped", "type": "server_error", "code": "server_error", "status": 503}, ServerError, 503),
        # vLLM's: a numeric code and its own type names
        ({"message": "bad", "type": "BadRequestError", "code": 400}, BadRequestError, 400),
    ],
)
def test_an_error_chunk_keeps_the_status_it_carries(err, error, status):
    with pytest.raises(error) as info:
        wire.parse_stream_chunk({"error": err})
    assert type(info.value) is error and info.value.status == status


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(st.text(), min_size=1, max_size=5),
    cuts=st.lists(st.integers(0, 400), max_size=6),
    crlf=st.booleans(),
)
def test_sse_events_decode_whatever_the_chunking(texts, cuts, crlf):
    events = [{"delta": t} for t in texts]
    raw = b"".join(wire.encode_sse(e) for e in events) + wire.SSE_DONE
    if crlf:
        raw = raw.replace(b"\n", b"\r\n")
    decoder, decoded, start = wire.SSEDecoder(), [], 0
    for cut in sorted(cuts) + [len(raw)]:
        decoded += decoder.feed(raw[start:cut])
        start = max(start, cut)
    decoded += decoder.end()
    assert decoded[-1] == "[DONE]"
    assert [json.loads(d) for d in decoded[:-1]] == events


def test_sse_comments_and_other_fields_are_ignored():
    decoder = wire.SSEDecoder()
    assert decoder.feed(b": keep-alive\n\nevent: message\nid: 3\ndata: a\ndata: b\n\ndata: tail") == ["a\nb"]
    assert decoder.end() == ["tail"]


def test_sse_events_with_empty_data_are_not_dispatched_and_a_leading_byte_order_mark_is_dropped():
    """WHATWG's event-stream rules: an event whose data is empty (a bare ``data:`` keep-alive) is not dispatched;
    a U+FEFF starting the stream is no part of its first line."""
    decoder = wire.SSEDecoder()
    assert decoder.feed(b"data:\n\n") == [] and decoder.feed(b"data: \n\ndata: x\n\n") == ["x"]
    for cut in range(1, 5):  # the BOM's three bytes split anywhere
        raw = "\ufeffdata: hi\n\n".encode()
        decoder = wire.SSEDecoder()
        assert decoder.feed(raw[:cut]) + decoder.feed(raw[cut:]) == ["hi"]
    decoder = wire.SSEDecoder()
    assert decoder.feed(b"data: a\n\n") + decoder.feed("data: \ufeffb\n\n".encode()) == ["a", "\ufeffb"]


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "status, content, error",
    [
        (
            401,
            b'{"error": {"message": "bad key", "type": "invalid_request_error", "code": "invalid_api_key"}}',
            AuthenticationError,
        ),
        (400, b'{"error": {"message": "context length is 4096", "code": null}}', ContextLengthExceededError),
        (429, "slow down", OverloadedError),
        (503, b"", OverloadedError),
        (502, b"<html>bad gateway</html>", ServerError),
        (
            413,
            b'{"error": {"message": "too big", "type": "invalid_request_error", "code": "bad_request"}}',
            BadRequestError,
        ),
        (405, b'{"error": {"message": "use POST", "type": "invalid_request_error", "code": null}}', BadRequestError),
        # OpenAI's own 401 and 404 carry this type too: their status still decides
        (401, b'{"error": {"message": "no key", "type": "invalid_request_error", "code": null}}', AuthenticationError),
        (404, b'{"error": {"message": "Invalid URL", "type": "invalid_request_error", "code": null}}', NotFoundError),
    ],
)
def test_error_responses_map_to_classes(status, content, error):
    err = wire.parse_error(status, content, request_id="req-1", retry_after=2.0)
    assert type(err) is error
    assert err.status == status and err.request_id == "req-1"
    assert err.message


@pytest.mark.parametrize(
    "status, content, error, message",
    [
        (400, b'{"error": "max_tokens is too large"}', BadRequestError, "max_tokens is too large"),
        (404, b'{"detail": "Model \'foo\' not found"}', NotFoundError, "Model 'foo' not found"),
        (
            400,
            b'{"object": "error", "message": "This model\'s maximum context length is 4096 tokens", "code": 400}',
            ContextLengthExceededError,
            "This model's maximum context length is 4096 tokens",
        ),
        (
            422,
            b'{"detail": [{"loc": ["body", "messages", 0, "content"], "msg": "Field required", "type": "missing"},'
            b' {"loc": ["body", "max_tokens"], "msg": "Input should be a valid integer", "type": "int_type"}]}',
            BadRequestError,
            "body.messages.0.content: Field required; body.max_tokens: Input should be a valid integer",
        ),
    ],
    ids=["error-string", "fastapi-detail", "vllm-top-level", "fastapi-validation-list"],
)
def test_error_messages_are_read_from_the_shapes_servers_send(status, content, error, message):
    err = wire.parse_error(status, content)
    assert type(err) is error and err.message == message


def test_a_long_error_page_is_cut_and_an_error_that_is_null_is_no_error():
    err = wire.parse_error(502, b"<html>" + b"x" * 5000 + b"</html>")
    assert type(err) is ServerError and len(err.message) <= 503 and err.message.endswith("...")
    ok = {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}], "error": None}
    assert wire.parse_chat_response(ok).text == "hi"
    assert wire.parse_stream_chunk({"choices": [{"delta": {"content": "hi"}}], "error": None}).delta == "hi"
    with pytest.raises(ServerError, match="CUDA out of memory"):
        wire.parse_stream_chunk({"error": "CUDA out of memory"})


def test_a_5xx_keeps_its_retry_after_whatever_class_its_code_gives():
    busy = b'{"error": {"message": "busy", "type": "server_error", "code": "server_error"}}'
    err = wire.parse_error(503, busy, retry_after=7.0)
    assert type(err) is ServerError and err.retry_after == 7.0 and err.message == "busy"
    assert wire.parse_error(503, b"", retry_after=3.0).retry_after == 3.0  # OverloadedError, as before
    assert wire.parse_error(400, b'{"error": "no"}', retry_after=3.0).status == 400  # a 4xx takes no hint


def test_our_error_bodies_come_back_as_the_same_class():
    for original in (
        BadRequestError("too many pixels", status=413),
        InvalidImageError("cannot decode", index=2),
        UnsupportedParameterError("no", param="x"),
        OverloadedError("queue full"),
        AuthenticationError("no key"),
    ):
        body = json.dumps(wire.build_error_body(original)).encode()
        back = wire.parse_error(original.status, body)
        assert type(back) is type(original) and back.message == original.message
        if isinstance(original, InvalidImageError):  # the index, as the local transport's error has it
            assert back.index == original.index == 2
    # a message that names an image otherwise is not read as an index
    assert InvalidImageError("URLs from 'x' are not allowed", index=0).message.startswith("image 0: URLs from")
    assert InvalidImageError("image data URLs must be base64").index is None


def test_retry_after_reads_seconds_and_dates():
    assert wire.parse_retry_after("2") == 2.0
    assert wire.parse_retry_after("0.5") == 0.5
    assert wire.parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert wire.parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT") == 0.0  # in the past
    assert wire.parse_retry_after("soon") is None and wire.parse_retry_after(None) is None


def test_line_wrapped_base64_data_urls_decode_to_the_same_bytes():
    encoded = base64.b64encode(PNG_1PX * 3).decode()
    wrapped = "\r\n".join(encoded[i : i + 16] for i in range(0, len(encoded), 16))
    assert wire.decode_data_url("data:image/png;base64," + wrapped) == ("image/png", PNG_1PX * 3)


@pytest.mark.parametrize(
    "url, match",
    [
        ("https://example.com/x.png", "not a data URL"),
        ("data:image/png;base64", "no ','"),
        ("data:text/plain;base64,aGk=", "not an image"),
        ("data:image/png,rawbytes", "base64-encoded"),
        ("data:image/png;base64,@@@", "corrupt"),
        ("data:image/png;base64,", "no data"),
    ],
)
def test_bad_data_urls_are_invalid_images(url, match):
    with pytest.raises(InvalidImageError, match=match) as info:
        wire.decode_data_url(url, index=4)
    assert info.value.index == 4


# ------------------------------------------------------------------------------------------ types


@pytest.mark.parametrize(
    "params, param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop": [""]}, "stop"),
        ({"stop": 3}, "stop"),
        ({"seed": "x"}, "seed"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 2**70}, "seed"),
    ],
)
def test_generation_params_reject_bad_values_naming_them(params, param):
    with pytest.raises(BadRequestError) as info:
        GenerationParams(**params)
    assert info.value.param == param and param in info.value.message


def test_generation_params_take_every_seed_a_generator_takes():
    assert GenerationParams(seed=0).seed == 0 and GenerationParams(seed=2**64 - 1).seed == 2**64 - 1
    with pytest.raises(BadRequestError, match=r"seed=1180591620717411303424 is invalid: .* from 0 to"):
        wire.parse_chat_request({"messages": [{"role": "user", "content": "Hi"}], "seed": 2**70})


def test_generation_params_normalise_and_merge():
    params = GenerationParams.from_kwargs({"stop": "END", "temperature": 0})
    assert params.stop == ("END",) and params.temperature == 0.0
    assert params.merged(max_tokens=4, temperature=None).to_dict() == {
        "max_tokens": 4,
        "temperature": 0.0,
        "stop": ["END"],
    }
    with pytest.raises(UnsupportedParameterError, match="top_k"):
        params.merged(top_k=5)


def test_an_image_part_holds_exactly_one_source():
    with pytest.raises(BadRequestError):
        ImagePart()
    with pytest.raises(BadRequestError):
        ImagePart(url="https://x.org/a.png", data=b"x")
    assert ImagePart(data=b"\x01", media_type="image/jpeg").as_url() == "data:image/jpeg;base64,AQ=="


def test_huge_values_are_quoted_short_and_tool_call_turns_are_refused():
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(BadRequestError) as info:
        wire.parse_chat_request({"messages": messages, "temperature": "x" * 1_000_000})
    assert len(info.value.message) < 300
    with pytest.raises(UnsupportedParameterError) as info:
        wire.parse_chat_request({"messages": messages, "k" * 1_000_000: 1, **{f"extra{i}": 1 for i in range(1000)}})
    assert len(info.value.message) < 600 and "more" in info.value.message and len(info.value.param) < 80
    called = [
        {"role": "user", "content": "What is the weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function", "function": {}}]},
    ]
    with pytest.raises(BadRequestError, match=r"messages\[1\] has 'tool_calls': tools and function calls"):
        wire.parse_chat_request({"messages": called})
    answered = [{"role": "assistant", "content": "Sunny.", "tool_calls": None, "refusal": None}]
    wire.parse_chat_request({"messages": [messages[0], *answered]})  # an OpenAI reply appended as it came back
