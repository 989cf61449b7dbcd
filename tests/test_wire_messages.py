"""One chat-message parser: the wire (server), the SDK client, the pipeline and the prompt formats accept
the same message shapes and refuse the same bad ones with the same message."""

from __future__ import annotations

import base64
import io

import anyio
import pytest
from llava_next_sdk import AsyncClient, BadRequestError, ChatMessage, GenerationResult, ImagePart, TextPart, Usage, wire
from llava_next_sdk.messages import ROLE_ALIASES
from PIL import Image

from llava_next_plugin.errors import InputError
from llava_next_plugin.prompts import build_prompt


def _png_data_url(color: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


RED = _png_data_url("red")
IMG = object()  # stands for an image in an expected message

# (id, messages, expected [(role, parts)] with IMG for each image, JSON-able (so the wire can carry it))
ACCEPTED = [
    ("string content", [{"role": "user", "content": "Hi"}], [("user", ["Hi"])], True),
    (
        "developer is system",
        [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [("system", ["Be brief."]), ("user", ["Hi"])],
        True,
    ),
    (
        "openai image_url object",
        [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": RED, "detail": "low"}},
                    {"type": "text", "text": "Q"},
                ],
            }
        ],
        [("user", [IMG, "Q"])],
        True,
    ),
    (
        "openai image_url string",
        [{"role": "user", "content": [{"type": "text", "text": "Q"}, {"type": "image_url", "image_url": RED}]}],
        [("user", ["Q", IMG])],
        True,
    ),
    (
        "transformers image",
        [{"role": "user", "content": [{"type": "image", "image": RED}, {"type": "text", "text": "Q"}]}],
        [("user", [IMG, "Q"])],
        True,
    ),
    (
        "transformers image url",
        [{"role": "user", "content": [{"type": "image", "url": RED}, {"type": "text", "text": "Q"}]}],
        [("user", [IMG, "Q"])],
        True,
    ),
    (
        "responses input_image",
        [{"role": "user", "content": [{"type": "input_image", "image_url": RED}, {"type": "text", "text": "Q"}]}],
        [("user", [IMG, "Q"])],
        True,
    ),
    (
        "multi-turn with null content",
        [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": RED}}, {"type": "text", "text": "Q1"}],
            },
            {"role": "assistant", "content": None},
            {"role": "user", "content": "Q2"},
        ],
        [("user", [IMG, "Q1"]), ("assistant", [""]), ("user", ["Q2"])],
        True,
    ),
    (
        "ChatMessage objects",
        [ChatMessage("system", "Be brief."), ChatMessage("user", (ImagePart(url=RED), TextPart("Q")))],
        [("system", ["Be brief."]), ("user", [IMG, "Q"])],
        False,
    ),
    (
        "a PIL image",
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": Image.new("RGB", (4, 4))}, {"type": "text", "text": "Q"}],
            }
        ],
        [("user", [IMG, "Q"])],
        False,
    ),
]

# (id, messages, the message every entry point gives)
REFUSED = [
    (
        "unknown role",
        [{"role": "tool", "content": "x"}],
        "messages[0]: unsupported role 'tool'; use system (or developer), user or assistant",
    ),
    (
        "role not a string",
        [{"role": None, "content": "x"}],
        "messages[0]: unsupported role None; use system (or developer), user or assistant",
    ),
    ("no role", [{"content": "x"}], "messages[0] has no 'role'; use system (or developer), user or assistant"),
    ("no content", [{"role": "user"}], "messages[0] has no 'content'; give a string or a list of content parts"),
    (
        "content a number",
        [{"role": "user", "content": 3}],
        "messages[0]: 'content' must be a string or a list of content parts, got a number",
    ),
    (
        "message not an object",
        [{"role": "user", "content": "x"}, 3],
        "messages[1] must be an object {'role': ..., 'content': ...}, got a number",
    ),
    (
        "unknown part type",
        [{"role": "user", "content": [{"type": "input_audio"}]}],
        "messages[0].content[0]: unsupported content part type 'input_audio'; use {'type': 'text', 'text': ...}, "
        "{'type': 'image_url', 'image_url': {'url': ...}} or {'type': 'image', 'image': ...}",
    ),
    (
        "part not an object",
        [{"role": "user", "content": ["words"]}],
        "messages[0].content[0]: a content part must be an object such as {'type': 'text', 'text': ...}, "
        "{'type': 'image_url', 'image_url': {'url': ...}} or {'type': 'image', 'image': ...}; got a string",
    ),
    (
        "text part without text",
        [{"role": "user", "content": [{"type": "text"}]}],
        "messages[0].content[0]: a text part needs a string 'text', got null (None)",
    ),
    (
        "lone surrogate",
        [{"role": "user", "content": [{"type": "text", "text": "a\ud800"}]}],
        "messages[0].content[0]: the text holds a lone UTF-16 surrogate",
    ),
    (
        "bad image detail",
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": RED, "detail": "huge"}}]}],
        "messages[0].content[0]: image detail must be 'low', 'high' or 'auto', got 'huge'",
    ),
]


def _shape(messages) -> list[tuple[str, list]]:
    """``[(role, parts)]`` of ChatMessage objects, each image as IMG."""
    return [(m.role, [IMG if isinstance(p, ImagePart) else p.text for p in m.content]) for m in messages]


class RecordingTransport:
    """A transport of our own that answers at once and keeps the request the client built."""

    def __init__(self) -> None:
        self.requests: list = []

    async def generate(self, request):
        self.requests.append(request)
        return GenerationResult("ok", "stop", Usage(1, 1))

    def stream(self, request):  # not used here
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


def _client_chat(messages):
    """The request ``AsyncClient.chat`` hands its transport for *messages*."""
    transport = RecordingTransport()

    async def chat():
        async with AsyncClient(transport=transport) as client:
            await client.chat(messages)

    anyio.run(chat)
    return transport.requests[0]


def _chatml(expected) -> str:
    """What the chatml prompt format renders for *expected* (each message: its images, then its texts)."""
    out = ""
    for role, parts in expected:
        texts = "\n".join(p for p in parts if p is not IMG)
        out += f"<|im_start|>{role}\n" + "<image>\n" * sum(p is IMG for p in parts) + texts + "<|im_end|>\n"
    return out + "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def pipe(demo_checkpoint):
    from transformers import pipeline

    return pipeline("image-to-text", model=str(demo_checkpoint), device="cpu")


# ------------------------------------------------------------------------------------------ accepted


@pytest.mark.parametrize(("messages", "expected", "json_able"), [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_the_wire_and_the_client_read_every_shape_alike(messages, expected, json_able):
    client_request = _client_chat(messages)
    assert _shape(client_request.messages) == expected
    if json_able:
        wire_request = wire.parse_chat_request({"messages": messages}).request
        assert _shape(wire_request.messages) == expected
        assert [p.detail for p in wire_request.images] == [p.detail for p in client_request.images]


def test_the_image_detail_of_a_part_is_kept_by_wire_and_client():
    messages = ACCEPTED[2][1]
    assert [p.detail for p in wire.parse_chat_request({"messages": messages}).request.images] == ["low"]
    assert [p.detail for p in _client_chat(messages).images] == ["low"]


@pytest.mark.parametrize(("messages", "expected"), [c[1:3] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_prompt_formats_read_every_shape_alike(messages, expected):
    images = sum(p is IMG for _, parts in expected for p in parts)
    assert build_prompt(messages, None, None, family="chatml", num_images=images) == _chatml(expected)


@pytest.mark.parametrize(("messages", "expected"), [c[1:3] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_the_pipeline_reads_every_shape_alike(pipe, messages, expected):
    (request,), single = pipe._requests(messages, None, None)
    assert single
    images = sum(p is IMG for _, parts in expected for p in parts)
    assert len(request.images) == images
    canonical = [
        {"role": role, "content": [{"type": "image"} if p is IMG else {"type": "text", "text": p} for p in parts]}
        for role, parts in expected
    ]
    assert pipe._format(request) == build_prompt(canonical, pipe.processor, pipe.model.config, num_images=images)
    for i, source in enumerate(request.images):  # every source loads as the image it names
        assert pipe._load_image(source, i, timeout=1).size == (4, 4)


def test_role_aliases_are_the_one_table():
    assert dict(ROLE_ALIASES) == {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
    assert not hasattr(wire, "_ROLE_ALIASES")
    from llava_next_sdk import client

    assert not hasattr(client, "_ROLE_ALIASES")


# ------------------------------------------------------------------------------------------- refused


@pytest.mark.parametrize(("messages", "message"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_every_entry_point_refuses_the_same_messages_with_the_same_words(pipe, messages, message):
    with pytest.raises(BadRequestError) as from_wire:
        wire.parse_chat_request({"messages": messages})
    with pytest.raises(BadRequestError) as from_client:
        _client_chat(messages)
    with pytest.raises(InputError) as from_prompts:
        build_prompt(messages, None, None, family="chatml")
    with pytest.raises(InputError) as from_pipeline:
        pipe(messages, max_new_tokens=1)
    words = {str(e.value) for e in (from_wire, from_client, from_prompts, from_pipeline)}
    assert len(words) == 1, words
    assert words.pop().startswith(message)
    assert not isinstance(from_prompts.value, BadRequestError)  # model-level code raises model-level errors
    assert not isinstance(from_pipeline.value, BadRequestError)


def test_a_bare_image_part_takes_an_image_given_apart_only_on_the_model_side(pipe):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}]
    needs = "image 0: messages[0].content[0]: an image part needs its image"
    for read in (lambda: wire.parse_chat_request({"messages": messages}), lambda: _client_chat(messages)):
        with pytest.raises(BadRequestError, match=needs.replace("[", r"\[").replace("]", r"\]")):
            read()
    # The model side gets its images separately: prompt formats count the part, the pipeline fills it.
    assert build_prompt(messages, None, None, family="chatml", num_images=1) == _chatml([("user", [IMG, "Q"])])
    (request,), _ = pipe._requests(messages, None, [RED])
    assert request.images == [RED]
