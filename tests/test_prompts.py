"""Prompt formats: each checkpoint family's format, family detection, chat templates, placeholders, errors."""

from __future__ import annotations

import checkpoints
import pytest
from transformers import LlavaNextImageProcessor
from transformers import LlavaNextProcessor as ReferenceProcessor

from llava_next_plugin.errors import InputError
from llava_next_plugin.prompts import FAMILIES, VICUNA_SYSTEM, build_prompt, detect_family

MISTRAL = {"text_config": {"model_type": "mistral"}}
LLAMA = {"text_config": {"model_type": "llama"}}
QWEN2 = {"text_config": {"model_type": "qwen2"}}
UNKNOWN = {"text_config": {"model_type": "gemma"}}

EXPECTED = {
    "mistral": "[INST] <image>\nWhat is shown? [/INST]",
    "vicuna": VICUNA_SYSTEM + " USER: <image>\nWhat is shown? ASSISTANT:",
    "llama3": (
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is shown?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "chatml": "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """The real Mistral v1 tokenizer without a chat template, and copies that carry Llama-3's and ChatML's
    special tokens, as those checkpoints' tokenizers do."""
    made = {}
    for name, extra in (
        ("plain", []),
        ("llama3", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
        ("chatml", ["<|im_start|>", "<|im_end|>"]),
    ):
        tokenizer = checkpoints.build_tokenizer(tmp_path_factory.mktemp(f"tok-{name}"))
        tokenizer.chat_template = None
        if extra:
            tokenizer.add_special_tokens({"additional_special_tokens": extra})
        made[name] = tokenizer
    return made


def test_the_four_family_formats():
    assert FAMILIES == ("mistral", "vicuna", "llama3", "chatml")
    assert VICUNA_SYSTEM.startswith("A chat between a curious human and an artificial intelligence assistant.")
    for family, expected in EXPECTED.items():
        assert build_prompt("What is shown?", None, None, family=family) == expected


def test_formats_render_the_same_through_a_tokenizer_and_keep_one_image_token_per_image(tokenizers):
    tokenizer = tokenizers["plain"]
    for family, expected in EXPECTED.items():
        assert build_prompt("What is shown?", tokenizer, None, family=family) == expected
        prompt = build_prompt("Compare them.", tokenizer, None, family=family, num_images=2)
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        assert ids.count(checkpoints.IMAGE_TOKEN_ID) == 2, family


@pytest.mark.parametrize(
    ("tokenizer_name", "config", "family"),
    [
        ("plain", MISTRAL, "mistral"),
        ("plain", LLAMA, "vicuna"),  # llama without Llama-3's or ChatML's tokens: llava-v1.6-vicuna
        ("llama3", LLAMA, "llama3"),  # llama3-llava-next-8b reports model type llama too
        ("chatml", LLAMA, "chatml"),  # llava-v1.6-34b (Yi) as well
        ("plain", QWEN2, "chatml"),  # llava-next-72b/110b
        ("plain", UNKNOWN, ""),
        (None, None, ""),
    ],
)
def test_family_detection(tokenizers, tokenizer_name, config, family):
    tokenizer = tokenizers[tokenizer_name] if tokenizer_name else None
    assert detect_family(tokenizer, config) == family
    if family:
        assert build_prompt("What is shown?", tokenizer, config) == EXPECTED[family]


def test_detection_reads_config_objects_and_processors(tokenizers):
    config = checkpoints.reference_config(text="llama")
    processor = ReferenceProcessor(image_processor=LlavaNextImageProcessor(), tokenizer=tokenizers["llama3"])
    assert detect_family(processor, config) == "llama3"
    assert detect_family(tokenizers["plain"], config) == "vicuna"
    assert detect_family(None, checkpoints.reference_config(text="mistral")) == "mistral"


def test_the_checkpoint_chat_template_is_used_when_there_is_one(tokenizers):
    """Same text as the reference processor's apply_chat_template on the model doc's conversation."""
    tokenizer = checkpoints.build_tokenizer(tokenizers["plain"].name_or_path)  # carries MISTRAL_CHAT_TEMPLATE
    processor = ReferenceProcessor(
        image_processor=LlavaNextImageProcessor(), tokenizer=tokenizer, chat_template=checkpoints.MISTRAL_CHAT_TEMPLATE
    )
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What does this chart show?"}]}
    ]
    expected = processor.apply_chat_template(conversation, add_generation_prompt=True)
    for owner in (processor, tokenizer):
        assert build_prompt("What does this chart show?", owner, UNKNOWN) == expected  # no family needed
        assert build_prompt(conversation, owner, UNKNOWN) == expected
    # An explicit family overrides the checkpoint's template.
    assert build_prompt("What is shown?", processor, LLAMA, family="chatml") == EXPECTED["chatml"]


def test_placeholders_are_added_when_missing_and_checked_when_counted():
    assert (
        build_prompt("Q", None, None, family="mistral", num_images=3) == "[INST] <image>\n<image>\n<image>\nQ [/INST]"
    )
    assert build_prompt("Text only.", None, None, family="mistral", num_images=0) == "[INST] Text only. [/INST]"
    assert build_prompt("Left <image> right", None, None, family="mistral") == "[INST] Left <image> right [/INST]"
    with pytest.raises(InputError, match=r"the prompt has 2 <image> placeholder\(s\) for 1 image\(s\)"):
        build_prompt("<image> and <image>", None, None, family="mistral", num_images=1)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "data:..."}}, {"type": "text", "text": "Q"}],
        }
    ]
    assert build_prompt(messages, None, None, family="chatml", num_images=1) == (
        "<|im_start|>user\n<image>\nQ<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_prompt_already_in_chat_format_is_kept():
    formatted = "[INST] <image>\nWhat is shown? [/INST]"
    assert build_prompt(formatted, None, MISTRAL) == formatted
    assert build_prompt(EXPECTED["llama3"], None, MISTRAL) == EXPECTED["llama3"]
    with pytest.raises(InputError, match=r"already in a chat format and has 0 <image> placeholder\(s\) for 1"):
        build_prompt("USER: What is shown? ASSISTANT:", None, LLAMA)
    # A question that merely mentions one marker is a question.
    assert build_prompt("Who is USER: in this log?", None, LLAMA) == (
        VICUNA_SYSTEM + " USER: <image>\nWho is USER: in this log? ASSISTANT:"
    )


def test_multi_turn_conversations_with_a_system_message():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q1"}]},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    assert (
        build_prompt(messages, None, None, family="mistral")
        == "[INST] Be brief.\n\n<image>\nQ1 [/INST] A1</s>[INST] Q2 [/INST]"
    )
    assert (
        build_prompt(messages, None, None, family="vicuna")
        == "Be brief. USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
    )
    assert build_prompt(messages, None, None, family="chatml") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n"
    )


def test_family_names_are_forgiving_and_unknown_ones_are_listed():
    assert build_prompt("What is shown?", None, None, family="Yi") == EXPECTED["chatml"]
    assert build_prompt("What is shown?", None, None, family="llama-3") == EXPECTED["llama3"]
    with pytest.raises(
        InputError, match=r"unknown prompt family 'gemma'; accepted: mistral, vicuna, llama3, chatml"
    ) as caught:
        build_prompt("Q", None, None, family="gemma")
    assert isinstance(caught.value, ValueError) and caught.value.param == "family"


def test_an_undetectable_checkpoint_says_how_to_choose(tokenizers):
    with pytest.raises(
        InputError,
        match=r"cannot tell this checkpoint's prompt format: it has no chat template, "
        r"and its text model type 'gemma'.*pass family= one of mistral, vicuna, llama3, chatml",
    ):
        build_prompt("Q", tokenizers["plain"], UNKNOWN)
    assert build_prompt("What is shown?", tokenizers["plain"], UNKNOWN, family="mistral") == EXPECTED["mistral"]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        (42, r"the prompt must be a string or a non-empty list of chat messages"),
        ([], r"the prompt must be a string or a non-empty list"),
        ([{"content": "no role"}], r"messages\[0\] has no 'role'; use system \(or developer\), user or assistant"),
        ([{"role": "user", "content": 3}], r"messages\[0\]: 'content' must be a string or a list of content parts"),
        (
            [{"role": "user", "content": [{"type": "video"}]}],
            r"messages\[0\].content\[0\]: unsupported content part type 'video'",
        ),
        ([{"role": "system", "content": "only a system message"}], r"no user message to attach the image to"),
        (
            [{"role": "tool", "content": "x"}, {"role": "user", "content": "Q"}],
            r"messages\[0\]: unsupported role 'tool'",
        ),
    ],
)
def test_malformed_prompts_are_bad_requests(prompt, message):
    with pytest.raises(InputError, match=message):
        build_prompt(prompt, None, None, family="mistral")
