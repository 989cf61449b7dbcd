"""Prompt formats: wrap a user's prompt in the checkpoint's chat format, with its ``<image>`` placeholders.

LLaVA-NeXT checkpoints were trained on four chat formats, one per family of text backbone:

====================  =========================================================================
family                a one-image prompt, as the model must see it
====================  =========================================================================
``mistral``           ``[INST] <image>\\nWhat is shown? [/INST]``
``vicuna``            ``<llava system line> USER: <image>\\nWhat is shown? ASSISTANT:``
``llama3``            ``<|start_header_id|>user<|end_header_id|>\\n\\n<image>\\nWhat is shown?<|eot_id|>``
                      ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``
``chatml`` (Yi, Qwen) ``<|im_start|>user\\n<image>\\nWhat is shown?<|im_end|>\\n<|im_start|>assistant\\n``
====================  =========================================================================

:func:`build_prompt` uses the checkpoint's own chat template (processor or tokenizer) when it has one,
else the family's format, which it asks of the ``llava_next_prompt_format`` hook (the formats above
are this module's hookimpl; a plugin may add families or replace ours). The family is told from the
tokenizer's special tokens (``<|eot_id|>`` means llama3, ``<|im_start|>`` chatml) and the text
backbone's ``model_type`` (``mistral``; ``qwen2`` is chatml; ``llama`` without those tokens is vicuna),
since Vicuna, Llama-3 and Yi all report ``llama``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from llava_next_sdk import messages as sdk_messages
from llava_next_sdk.errors import BadRequestError, LlavaNextError
from llava_next_sdk.messages import ParsedMessage
from llava_next_sdk.types import TextPart

from llava_next_plugin.hooks import first_answer, get_plugin_manager, hookimpl, plugin_fault

from .errors import InputError, as_model_error

__all__ = [
    "FAMILIES",
    "FAMILY_TEMPLATES",
    "IMAGE_PLACEHOLDER",
    "build_prompt",
    "detect_family",
    "read_messages",
    "text_model_type",
]

IMAGE_PLACEHOLDER = "<image>"

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# How every family renders one message's content: its images first, one placeholder line each, then its
# texts joined by newlines (the layout LLaVA was trained on). Content is a list of {"type": ...} parts.
_CONTENT = (
    "{% macro content(message) %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') }}"
    "{% endmacro %}"
)
# The leading system message, if any, becomes `system`; the others are `turns`.
_SPLIT_SYSTEM = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = content(messages[0]) %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
)
_UNKNOWN_ROLE = "{% else %}{{ raise_exception('unsupported message role: ' + message['role']) }}{% endif %}"

FAMILY_TEMPLATES: dict[str, str] = {
    "mistral": _CONTENT
    + _SPLIT_SYSTEM
    + (
        "{% for message in turns %}"
        "{% if message['role'] == 'user' %}[INST] "
        "{% if loop.first and system %}{{ system + '\\n\\n' }}{% endif %}{{ content(message) }} [/INST]"
        "{% elif message['role'] == 'assistant' %} {{ content(message) }}</s>" + _UNKNOWN_ROLE + "{% endfor %}"
    ),
    "vicuna": _CONTENT
    + _SPLIT_SYSTEM
    + (
        "{{ (system or '" + VICUNA_SYSTEM.replace("'", "\\'") + "') + ' ' }}"
        "{% for message in turns %}"
        "{% if message['role'] == 'user' %}USER: {{ content(message) }} "
        "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ content(message) }}</s>"
        + _UNKNOWN_ROLE
        + "{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    ),
    "llama3": _CONTENT
    + (
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + content(message) + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "chatml": _CONTENT
    + (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + content(message) + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}
"""Our Jinja chat templates, one per family (rendered with ``add_generation_prompt=True``)."""

FAMILIES: tuple[str, ...] = tuple(FAMILY_TEMPLATES)

_FAMILY_ALIASES = {"yi": "chatml", "qwen": "chatml", "qwen2": "chatml", "llama-3": "llama3", "llama_3": "llama3"}
_FAMILY_BY_MODEL_TYPE = {"mistral": "mistral", "mixtral": "mistral", "qwen2": "chatml", "llama": "vicuna"}
# Marker sets that show a string prompt is already in some family's chat format (all of a set present).
_FORMATTED_MARKERS = (("[INST]", "[/INST]"), ("USER:", "ASSISTANT:"), ("<|im_start|>",), ("<|start_header_id|>",))


@hookimpl
def llava_next_prompt_format(family: str, model_type: str, tokenizer: Any) -> str | None:
    """Our built-in families' templates; None for a family we do not know."""
    return FAMILY_TEMPLATES.get(family)


def text_model_type(config: Any) -> str:
    """The text backbone's ``model_type`` from a config object or a ``config.json`` dict ('' if unknown)."""
    if config is None:
        return ""
    text_config = config.get("text_config") if isinstance(config, Mapping) else getattr(config, "text_config", None)
    if text_config is None:
        return ""
    if isinstance(text_config, Mapping):
        return str(text_config.get("model_type") or "")
    return str(getattr(text_config, "model_type", "") or "")


def detect_family(tokenizer: Any, config: Any = None) -> str:
    """The checkpoint family (one of :data:`FAMILIES`), or ``""`` when it cannot be told.

    :param tokenizer: the tokenizer or the processor (its ``tokenizer`` is used), or None.
    :param config: the model config (object or dict) whose ``text_config.model_type`` is read, or None.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if tokenizer is not None:
        if _has_token(tokenizer, "<|eot_id|>") or _has_token(tokenizer, "<|start_header_id|>"):
            return "llama3"
        if _has_token(tokenizer, "<|im_start|>"):
            return "chatml"
    return _FAMILY_BY_MODEL_TYPE.get(text_model_type(config), "")


def _has_token(tokenizer: Any, token: str) -> bool:
    token_id = tokenizer.convert_tokens_to_ids(token)
    return token_id is not None and token_id != getattr(tokenizer, "unk_token_id", None)


def build_prompt(
    prompt_or_messages: str | list,
    tokenizer: Any = None,
    config: Any = None,
    *,
    family: str | None = None,
    num_images: int | None = None,
    continue_final_message: bool = False,
) -> str:
    """The text to hand the processor: the prompt in the checkpoint's chat format, ending where the
    assistant's answer starts, with one ``<image>`` placeholder per image.

    :param prompt_or_messages: a plain prompt (``"What does this chart show?"``), or chat messages
        ``[{"role": "user", "content": "..." | [{"type": "image"}, {"type": "text", "text": "..."}]}]``
        in any shape :func:`llava_next_sdk.messages.read_messages` reads (OpenAI ``image_url`` parts count
        as images; ``ChatMessage`` objects are accepted). A string already in a chat format (it contains
        ``[INST]`` and ``[/INST]``, ``USER:`` and ``ASSISTANT:``, ``<|im_start|>`` or
        ``<|start_header_id|>``) is returned unchanged.
    :param tokenizer: the checkpoint's processor or tokenizer; its ``chat_template`` is used when present.
    :param config: the checkpoint's config (object or dict), used to tell the family.
    :param family: use this family's format (see :data:`FAMILIES`, or one a plugin adds), even when the
        checkpoint has a chat template.
    :param num_images: how many images go with the prompt; placeholders are added at the start of the
        first user message when there are none (one when None), and a different count is an error.
    :param continue_final_message: end the text inside the last message (an assistant's answer begun, to be
        continued), without the turn's end or a new assistant turn.
    :raises InputError: for a malformed prompt, a placeholder count that does not match
        *num_images*, an unknown *family*, or a checkpoint whose family cannot be told.
    """
    wanted = 1 if num_images is None else num_images
    if isinstance(prompt_or_messages, str) and _is_formatted(prompt_or_messages):
        found = prompt_or_messages.count(IMAGE_PLACEHOLDER)
        if found != wanted:
            raise InputError(
                f"the prompt is already in a chat format and has {found} {IMAGE_PLACEHOLDER} "
                f"placeholder(s) for {wanted} image(s); put one {IMAGE_PLACEHOLDER} where "
                f"each image goes, or pass the plain question and let it be formatted"
            )
        return prompt_or_messages
    messages = _to_messages(prompt_or_messages)
    _fit_placeholders(messages, wanted, strict=num_images is not None)

    tok = getattr(tokenizer, "tokenizer", tokenizer)
    template = None
    if family is None:
        template = getattr(tokenizer, "chat_template", None) or getattr(tok, "chat_template", None)
    if not template:
        template = _family_template(family, tok, config)
    return _all_images_rendered(_render(template, messages, tok, continue_final_message), messages)


def _all_images_rendered(text: str, messages: list[dict]) -> str:
    """*text*, unless the chat format left out images that are outside user messages (chat templates render
    images in user messages only): the request then says so, rather than fail later on a placeholder count that
    the client cannot fix."""
    elsewhere = [
        f"messages[{i}] (role {message['role']!r})"
        for i, message in enumerate(messages)
        if message["role"] != "user" and any(part["type"] == "image" for part in message["content"])
    ]
    if not elsewhere or text.count(IMAGE_PLACEHOLDER) >= _placeholders(messages):
        return text
    where = f"{elsewhere[0]} holds an image" if len(elsewhere) == 1 else f"{', '.join(elsewhere)} hold images"
    raise InputError(
        f"{where}, which this model's chat format leaves out: images go in user messages; move them there",
        param="messages",
    )


def _is_formatted(prompt: str) -> bool:
    return any(all(marker in prompt for marker in markers) for markers in _FORMATTED_MARKERS)


def _family_template(family: str | None, tokenizer: Any, config: Any) -> str:
    model_type = text_model_type(config)
    if family is not None:
        name = _FAMILY_ALIASES.get(family.strip().lower(), family.strip().lower())
    else:
        name = detect_family(tokenizer, config)
    template = first_answer(
        get_plugin_manager().hook.llava_next_prompt_format,
        {"family": name, "model_type": model_type, "tokenizer": tokenizer},
        plugin_fault("llava_next_prompt_format", f"family {name!r}", lambda m: InputError(m, param="family")),
        (LlavaNextError,),
    )
    if template is not None and not isinstance(template, str):  # a plugin's bug, said where it happens
        raise InputError(
            f"a llava_next_prompt_format plugin returned {type(template).__name__} for family {name!r}, not a "
            "Jinja chat template string: fix that plugin",
            param="family",
        )
    if template is not None:
        return template
    accepted = ", ".join(FAMILIES)
    if family is not None:
        raise InputError(
            f"unknown prompt family {family!r}; accepted: {accepted} (or one a plugin adds)", param="family"
        )
    raise InputError(
        f"cannot tell this checkpoint's prompt format: it has no chat template, and its text model type "
        f"{model_type or '(none)'!r} and tokenizer match no known family; pass family= one of {accepted} "
        f"(the pipeline's prompt_family=, the command line's --prompt-format)",
        param="family",
    )


def read_messages(messages: Any) -> tuple[ParsedMessage, ...]:
    """Chat *messages* read by the SDK's one parser (:func:`llava_next_sdk.messages.read_messages`), bare
    ``{"type": "image"}`` parts allowed; its errors become :class:`InputError` / :class:`ImageError`, with
    the same message, as model-level code raises."""
    try:
        return sdk_messages.read_messages(messages, bare_images=True)
    except BadRequestError as exc:  # InvalidImageError included
        raise as_model_error(exc) from None


def _to_messages(prompt_or_messages: Any) -> list[dict]:
    """Chat messages with list content of ``{"type": "image"}`` / ``{"type": "text", "text": str}`` parts."""
    if isinstance(prompt_or_messages, str):
        return [{"role": "user", "content": [{"type": "text", "text": prompt_or_messages}]}]
    if isinstance(prompt_or_messages, Mapping):
        prompt_or_messages = [prompt_or_messages]
    if not isinstance(prompt_or_messages, (list, tuple)) or not prompt_or_messages:
        raise InputError(
            f"the prompt must be a string or a non-empty list of chat messages "
            f"{{'role': ..., 'content': ...}}, not {type(prompt_or_messages).__name__}",
            param="prompt",
        )
    return [
        {
            "role": message.role,
            "content": [
                {"type": "text", "text": part.text} if isinstance(part, TextPart) else {"type": "image"}
                for part in message.content
            ],
        }
        for message in read_messages(prompt_or_messages)
    ]


def _placeholders(messages: list[dict]) -> int:
    """The images *messages* place: their image parts and the ``<image>`` placeholders typed in their text."""
    return sum(
        1 if part["type"] == "image" else part["text"].count(IMAGE_PLACEHOLDER)
        for message in messages
        for part in message["content"]
    )


def _fit_placeholders(messages: list[dict], wanted: int, *, strict: bool) -> None:
    """Add *wanted* image parts to the first user message when the prompt has no placeholder at all."""
    found = _placeholders(messages)
    if found == 0 and wanted > 0:
        user = next((m for m in messages if m["role"] == "user"), None)
        if user is None:
            raise InputError("the messages have no user message to attach the image to", param="messages")
        user["content"] = [{"type": "image"} for _ in range(wanted)] + user["content"]
    elif strict and found != wanted:
        raise InputError(
            f"the prompt has {found} {IMAGE_PLACEHOLDER} placeholder(s) for {wanted} image(s); "
            f"use one per image, or none to have them added",
            param="prompt",
        )


def _render(template: str, messages: list[dict], tokenizer: Any, continue_final_message: bool = False) -> str:
    from jinja2 import TemplateError

    try:
        if tokenizer is not None and hasattr(tokenizer, "apply_chat_template"):
            return tokenizer.apply_chat_template(
                messages,
                chat_template=template,
                tokenize=False,
                add_generation_prompt=not continue_final_message,
                continue_final_message=continue_final_message,
            )
        text = _compile(template).render(
            messages=messages, add_generation_prompt=not continue_final_message, bos_token="", eos_token=""
        )
    except TemplateError as exc:  # raise_exception() in a template, or a template that does not fit the messages
        raise InputError(f"the chat template refused these messages: {exc}", param="messages") from exc
    except ValueError as exc:  # transformers: a final message it cannot find in the text to continue it
        raise InputError(f"cannot continue the final message: {exc}", param="messages") from exc
    if continue_final_message:  # cut the text right after the last message's own words
        texts = [part["text"] for part in messages[-1]["content"] if part["type"] == "text"]
        last = texts[-1].strip() if texts else ""
        end = text.rfind(last)
        if not last or end < 0:
            raise InputError("cannot continue the final message: it has no text to continue", param="messages")
        text = text[: end + len(last)]
    return text


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    """A Jinja template compiled as chat templates are (sandboxed, trimmed blocks), for use without a tokenizer."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)
