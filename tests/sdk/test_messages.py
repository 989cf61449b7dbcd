"""The SDK's one chat-message parser, on its own (tests/test_wire_messages.py runs it through every entry point)."""

from __future__ import annotations

import pytest
from llava_next_sdk import BadRequestError, ChatMessage, ImagePart, InvalidImageError, TextPart
from llava_next_sdk.messages import ROLE_ALIASES, ImageRef, ParsedMessage, read_messages, to_chat_messages
from llava_next_sdk.types import ROLES


def test_the_role_table_maps_every_alias_onto_a_role():
    assert set(ROLE_ALIASES.values()) == set(ROLES)
    assert ROLE_ALIASES["developer"] == "system"


def test_images_are_numbered_in_order_across_messages_and_named_by_place():
    parsed = read_messages(
        [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": "https://a"}, {"type": "text", "text": "Q"}],
            },
            ChatMessage("assistant", "A"),
            ChatMessage("user", (TextPart("x"), ImagePart(url="https://b", detail="high"))),
            {"role": "user", "content": [{"type": "image", "path": "c.png", "detail": "low"}]},
        ]
    )
    refs = [ref for message in parsed for ref in message.images]
    assert [(r.index, r.where, r.detail) for r in refs] == [
        (0, "messages[0].content[0]", "auto"),
        (1, "messages[2].content[1]", "high"),
        (2, "messages[3].content[0]", "low"),
    ]
    assert refs[0].source == "https://a" and refs[2].source == "c.png"
    assert isinstance(refs[1].source, ImagePart)  # a ChatMessage's image is kept as it is
    assert parsed[1] == ParsedMessage("assistant", (TextPart("A"),))


def test_parsed_messages_read_again_are_renumbered():
    first = read_messages([{"role": "user", "content": [{"type": "image"}]}], bare_images=True)
    again = read_messages([*first, *first], bare_images=True)
    assert [ref.index for m in again for ref in m.images] == [0, 1]
    assert again[0].images[0].source is None


def test_to_chat_messages_puts_images_in_place_with_their_detail():
    parsed = read_messages(
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u", "detail": "low"}}]}]
    )
    (message,) = to_chat_messages(parsed, [ImagePart(data=b"png")])
    assert message.images == (ImagePart(data=b"png", detail="low"),)
    with pytest.raises(ValueError, match="0 image parts given for 1 image references"):
        to_chat_messages(parsed, [])


def test_a_bare_image_is_refused_unless_allowed_and_its_error_names_the_image():
    messages = [{"role": "user", "content": [{"type": "text", "text": "Q"}, {"type": "image_url", "image_url": {}}]}]
    with pytest.raises(InvalidImageError) as info:
        read_messages(messages)
    assert info.value.index == 0 and info.value.param == "messages"
    assert str(info.value).startswith("image 0: messages[0].content[1]: an image_url part needs its URL")
    assert read_messages(messages, bare_images=True)[0].images == (ImageRef(None, "auto", 0, "messages[0].content[1]"),)


@pytest.mark.parametrize("messages", [[], "Hi", {"role": "user", "content": "Hi"}, None, b"x"])
def test_messages_must_be_a_non_empty_list(messages):
    with pytest.raises(BadRequestError, match="messages must be a non-empty list of"):
        read_messages(messages)


def test_transformers_base64_image_part_is_read_as_the_images_bytes():
    import base64

    data = b"\x89PNG\r\n\x1a\n not really"
    for value in (base64.b64encode(data).decode(), "data:image/png;base64," + base64.b64encode(data).decode()):
        (message,) = read_messages([{"role": "user", "content": [{"type": "image", "base64": value}]}])
        assert message.images[0].source == data
    with pytest.raises(InvalidImageError, match=r"content\[0\]: its 'base64' is not base64 data"):
        read_messages([{"role": "user", "content": [{"type": "image", "base64": "no!"}]}])


def test_a_lone_surrogate_in_a_stop_string_is_refused_naming_stop_before_any_transport():
    """The HTTP transport could not encode it as JSON, while the local one took it: both refuse it alike now."""
    from llava_next_sdk.errors import BadRequestError
    from llava_next_sdk.types import GenerationParams

    with pytest.raises(BadRequestError, match="lone UTF-16 surrogate") as error:
        GenerationParams(stop=["ok", "\ud800"])
    assert error.value.param == "stop"
    assert GenerationParams(stop=["\U0001f600"]).stop == ("\U0001f600",)  # a pair is fine
