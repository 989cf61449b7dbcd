"""OpenAI's ``detail`` on ``image_url``, end to end: parsed from the wire, carried by the SDK's ImagePart, and over
HTTP ``low`` costs one base view of image tokens (usage says so) while ``high``/``auto`` cost the full anyres.
``pipeline("image-to-text")`` takes the same ``detail`` and gives the engine's prompt and greedy answer."""

from __future__ import annotations

import base64
import io

import checkpoints
import httpx
import pytest
import torch
import transformers
from llava_next_sdk.errors import BadRequestError
from llava_next_sdk.types import ImagePart
from llava_next_sdk.wire import parse_chat_request
from transformers import LogitsProcessor, LogitsProcessorList

from llava_next_plugin.engine import Engine, SamplingParams
from llava_next_plugin.errors import InputError
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


# --- the same detail through pipeline("image-to-text") and model.generate -----------------------------------
class _PromptRecorder(LogitsProcessor):
    """Keeps the token ids generate() starts from (the prompt the model received); changes no score."""

    def __init__(self) -> None:
        self.prompt_ids: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prompt_ids is None:
            self.prompt_ids = input_ids.clone()
        return scores


@pytest.fixture(scope="module")
def engine_and_pipe(tiny_checkpoint):
    model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_checkpoint).eval()
    processor = transformers.AutoProcessor.from_pretrained(tiny_checkpoint)
    engine = Engine(model, processor, model_name="tiny").start()
    pipe = transformers.pipeline("image-to-text", model=model, processor=processor, device="cpu")
    yield engine, pipe
    engine.shutdown(drain=False)


def _pipeline_run(pipe, image, detail_kwargs: dict) -> tuple[str, torch.Tensor]:
    recorder = _PromptRecorder()
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    answer = pipe(
        chat, max_new_tokens=8, do_sample=False, logits_processor=LogitsProcessorList([recorder]), **detail_kwargs
    )
    assert recorder.prompt_ids is not None
    return answer[0]["generated_text"], recorder.prompt_ids


@pytest.mark.parametrize("size", [(96, 32), (40, 90)])
def test_pipeline_detail_low_gives_the_engines_prompt_and_greedy_answer(engine_and_pipe, size):
    engine, pipe = engine_and_pipe
    image = checkpoints.photo(*size)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    served = engine.generate(chat, [image], SamplingParams(max_tokens=8, temperature=0), image_detail=["low"])
    base_view = (checkpoints.TINY_TILE // checkpoints.TINY_PATCH) ** 2
    for detail_kwargs in ({"detail": "low"}, {"generate_kwargs": {"detail": "low"}}):
        text, prompt_ids = _pipeline_run(pipe, image, detail_kwargs)
        assert int((prompt_ids == checkpoints.IMAGE_TOKEN_ID).sum()) == served.image_tokens == base_view
        assert prompt_ids.shape[1] == served.prompt_tokens
        assert text == served.text.strip()
    high = engine.generate(chat, [image], SamplingParams(max_tokens=8, temperature=0), image_detail=["high"])
    assert high.prompt_tokens > served.prompt_tokens


def test_pipeline_default_detail_is_the_full_view_unchanged(engine_and_pipe):
    engine, pipe = engine_and_pipe
    image = checkpoints.photo(96, 32)
    default_text, default_ids = _pipeline_run(pipe, image, {})
    for detail in ("auto", "high"):
        text, prompt_ids = _pipeline_run(pipe, image, {"detail": detail})
        assert text == default_text and torch.equal(prompt_ids, default_ids)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    served = engine.generate(chat, [image], SamplingParams(max_tokens=8, temperature=0))
    assert default_ids.shape[1] == served.prompt_tokens and default_text == served.text.strip()


def test_a_chat_parts_own_detail_reaches_the_pipeline_and_wins_over_the_calls(engine_and_pipe):
    engine, pipe = engine_and_pipe
    images = [checkpoints.photo(96, 32), checkpoints.photo(40, 90)]
    bare = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}]
    served = engine.generate(bare, images, SamplingParams(max_tokens=8, temperature=0), image_detail=["low", "high"])
    low_first = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": images[0], "detail": "low"},
                {"type": "image", "image": images[1]},
                {"type": "text", "text": "Compare."},
            ],
        }
    ]
    high_second = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": images[0]},
                {"type": "image", "image": images[1], "detail": "high"},
                {"type": "text", "text": "Compare."},
            ],
        }
    ]
    for messages, call_detail in ((low_first, {}), (high_second, {"detail": "low"})):
        recorder = _PromptRecorder()
        answer = pipe(
            messages, max_new_tokens=8, do_sample=False, logits_processor=LogitsProcessorList([recorder]), **call_detail
        )
        assert recorder.prompt_ids is not None
        assert recorder.prompt_ids.shape[1] == served.prompt_tokens
        assert int((recorder.prompt_ids == checkpoints.IMAGE_TOKEN_ID).sum()) == served.image_tokens
        assert answer[0]["generated_text"] == served.text.strip()
    # a batch of two conversations, padded together: each image keeps its own detail, the call's fills the rest
    answers = pipe([low_first, high_second], batch_size=2, max_new_tokens=8, do_sample=False, detail="high")
    for answer, image_detail in zip(answers, (["low", "high"], ["high", "high"]), strict=True):
        alone = engine.generate(bare, images, SamplingParams(max_tokens=8, temperature=0), image_detail=image_detail)
        assert answer[0]["generated_text"] == alone.text.strip()


def test_pipeline_refuses_an_unknown_detail_naming_the_accepted_values(engine_and_pipe):
    _, pipe = engine_and_pipe
    with pytest.raises(InputError, match="'low', 'high', 'auto'"):
        pipe(checkpoints.photo(96, 32), prompt="What?", detail="medium", max_new_tokens=1)


@pytest.mark.parametrize("vision,strategy", [("siglip", "full"), ("clip", "default")])
def test_low_detail_counts_the_towers_own_positions_in_the_engine_and_the_pipeline(tmp_path, vision, strategy):
    """One count for the base view (geometry.base_token_count): SigLIP has no CLS position, so its ``full``
    keeps side² features (the engine once counted side² + 1 there); the engine and the pipeline agree."""
    folder = checkpoints.build_checkpoint(tmp_path / vision, vision=vision, strategy=strategy)
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    engine = Engine(model, processor, model_name="tiny").start()
    try:
        image = checkpoints.photo(96, 32)
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
        served = engine.generate(chat, [image], SamplingParams(max_tokens=6, temperature=0), image_detail=["low"])
        side = checkpoints.TINY_TILE // checkpoints.TINY_PATCH
        assert served.image_tokens == side * side
        pipe = transformers.pipeline("image-to-text", model=model, processor=processor, device="cpu")
        text, prompt_ids = _pipeline_run(pipe, image, {"detail": "low"})
        assert int((prompt_ids == checkpoints.IMAGE_TOKEN_ID).sum()) == served.image_tokens
        assert prompt_ids.shape[1] == served.prompt_tokens
    finally:
        engine.shutdown(drain=False)
