"""OpenAI's ``detail`` on ``image_url``, end to end: parsed from the wire, carried by the SDK's ImagePart, and over
HTTP ``low`` costs one base view of image tokens (usage says so) while ``high``/``auto`` cost the full anyres."""

from __future__ import annotations

import base64
import io

import checkpoints
import httpx
import pytest
import transformers
from llava_next_sdk.errors import BadRequestError
from llava_next_sdk.types import ImagePart
from llava_next_sdk.wire import parse_chat_request

from llava_next_plugin.engine import Engine
from llava_next_plugin.server import create_app, serve_in_thread
from llava_next_plugin.validation import Limits


def data_url(width: int, height: int) -> str:
    buffer = io.BytesIO()
    checkpoints.real_photo().convert("RGB").resize((width, height)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def body(detail: str | None) -> dict:
    image_url = {"url": data_url(96, 32)} | ({} if detail is None else {"detail": detail})
    return {
        "model": "tiny",
        "max_tokens": 2,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": image_url}, {"type": "text", "text": "What?"}],
            }
        ],
    }


def test_detail_is_parsed_from_the_wire_and_checked():
    assert parse_chat_request(body("low")).request.images[0].detail == "low"
    assert parse_chat_request(body(None)).request.images[0].detail == "auto"
    with pytest.raises(BadRequestError, match="'low', 'high' or 'auto'"):
        parse_chat_request(body("medium"))
    with pytest.raises(BadRequestError, match="'low', 'high' or 'auto'"):
        ImagePart(url="https://example.com/a.png", detail="tiny")


def test_low_detail_over_http_costs_one_base_view_of_image_tokens(tiny_checkpoint):
    model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_checkpoint)
    engine = Engine(model, transformers.AutoProcessor.from_pretrained(tiny_checkpoint), model_name="tiny").start()
    with serve_in_thread(create_app(engine, limits=Limits(), shutdown_engine=False)) as running:
        usage = {}
        for detail in ("low", "high", None):
            response = httpx.post(running.url + "/chat/completions", json=body(detail), timeout=120)
            assert response.status_code == 200, response.text
            usage[detail] = response.json()["usage"]["prompt_tokens_details"]["image_tokens"]
        bad = httpx.post(running.url + "/chat/completions", json=body("medium"), timeout=60)
    engine.shutdown(drain=False)
    assert usage["low"] == (checkpoints.TINY_TILE // checkpoints.TINY_PATCH) ** 2
    assert usage["high"] == usage[None] > usage["low"]
    assert bad.status_code == 400 and "'low', 'high' or 'auto'" in bad.json()["error"]["message"]


def test_the_sdk_takes_detail_on_both_transports_and_in_chat_image_url_parts(tiny_checkpoint):
    from llava_next_sdk import Client

    model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_checkpoint)
    engine = Engine(model, transformers.AutoProcessor.from_pretrained(tiny_checkpoint), model_name="tiny").start()
    photo = checkpoints.photo(96, 32)
    base_view = (checkpoints.TINY_TILE // checkpoints.TINY_PATCH) ** 2
    chat = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(96, 32), "detail": "low"}},
                {"type": "text", "text": "What?"},
            ],
        }
    ]
    try:
        with serve_in_thread(create_app(engine, limits=Limits(), shutdown_engine=False)) as running:
            with Client(base_url=running.url) as remote, Client(str(tiny_checkpoint), device="cpu") as local:
                for client in (remote, local):
                    low = client.generate(photo, "What?", detail="low", max_tokens=2, temperature=0)
                    full = client.generate(photo, "What?", max_tokens=2, temperature=0)
                    assert low.usage.image_tokens == base_view < full.usage.image_tokens
                    assert client.chat(chat, max_tokens=2, temperature=0).usage.image_tokens == base_view
                    with pytest.raises(BadRequestError, match="'low', 'high' or 'auto'"):
                        client.generate(photo, "What?", detail="medium", max_tokens=2)
    finally:
        engine.shutdown(drain=False)
