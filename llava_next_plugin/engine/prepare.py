"""From a chat and its images to a :class:`~.request.PreparedRequest`, on the caller's thread.

The prompt is built with the model's chat format, tokenized with the images' placeholders expanded (by the
processor, from geometry.py), each ``detail: "low"`` image's placeholder cut to one base view, and checked
against the context; the images are hashed for reuse. All of it runs in the thread that calls
:meth:`Engine.prepare <.scheduler.Engine.prepare>`, so requests prepared in different threads do not wait for
each other, nor for the engine thread.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from llava_next_sdk.errors import BadRequestError, ContextLengthExceededError

from ..errors import InputError, as_api_error
from .request import PreparedRequest, SamplingParams

__all__ = ["Preparer"]


class Preparer:
    """Prepares requests for one model: its processor, chat format and context.

    :param processor: the model's ``LlavaNextProcessor``; each thread tokenizes with its own copy (tokenizers
        must not encode in two threads at once).
    :param config: the model's config (the chat format may depend on it).
    :param max_context: prompt + completion tokens at most.
    :param default_max_tokens: completion tokens when a request gives no ``max_tokens`` (capped by the context).
    :param image_token_id: the ``<image>`` placeholder's id.
    :param base_view_tokens: tokens of one image at ``detail: "low"`` (its base view), asked when a request has
        such an image.
    """

    def __init__(
        self,
        processor,
        config,
        *,
        max_context: int,
        default_max_tokens: int,
        image_token_id: int,
        base_view_tokens: Callable[[], int],
    ) -> None:
        self.processor = processor
        self.config = config
        self.max_context = max_context
        self.default_max_tokens = default_max_tokens
        self.image_token_id = image_token_id
        self.base_view_tokens = base_view_tokens
        #: The most prompt characters the context could hold (its length times the longest token's text): a
        #: longer prompt is refused before it is tokenized, here and by the fronts' validation.
        self.max_prompt_chars = max_context * _longest_token_chars(getattr(processor, "tokenizer", processor))
        self._local = threading.local()

    def _processor(self):
        """This thread's own copy of the processor."""
        processor = getattr(self._local, "processor", None)
        if processor is None:
            processor = self._local.processor = copy.deepcopy(self.processor)
        return processor

    def __call__(
        self,
        messages: list[dict],
        images: Sequence[Any],
        params: SamplingParams,
        prompt: str | None = None,
        image_detail: Sequence[str] | None = None,
    ) -> PreparedRequest:
        """See :meth:`Engine.prepare <.scheduler.Engine.prepare>`."""
        detail = _image_detail(image_detail, len(images))
        try:
            return self._prepare(messages, images, params, prompt, detail)
        except InputError as exc:  # the model package's error: the serving layer's typed (HTTP 400) one
            raise as_api_error(exc) from exc

    def _prepare(
        self,
        messages: list[dict],
        images: Sequence[Any],
        params: SamplingParams,
        prompt: str | None,
        detail: tuple[str, ...],
    ) -> PreparedRequest:
        if prompt is None:
            from ..prompts import build_prompt

            prompt = build_prompt(messages, self._processor(), self.config, num_images=len(images))
        if len(prompt) > self.max_prompt_chars:  # certainly too long: refuse before tokenizing it all
            raise ContextLengthExceededError(
                f"the prompt is {len(prompt)} characters, more than the model's context of {self.max_context} "
                f"tokens can hold; shorten it",
                param="messages",
            )
        inputs = self._processor()(images=list(images) or None, text=prompt, return_tensors="pt")
        input_ids = inputs["input_ids"]
        if "low" in detail:
            input_ids = self._base_view_placeholders(input_ids, detail)
        prompt_tokens = int(input_ids.shape[-1])
        room = self.max_context - prompt_tokens
        if room < 1:
            raise ContextLengthExceededError(
                f"the prompt is {prompt_tokens} tokens (images included) but the model's context is "
                f"{self.max_context} tokens; use fewer or smaller images or a shorter prompt",
                param="messages",
            )
        if params.max_tokens is not None and params.max_tokens > room:
            raise ContextLengthExceededError(
                f"the prompt is {prompt_tokens} tokens and max_tokens is {params.max_tokens}, which exceeds the "
                f"model's context length of {self.max_context} tokens; ask for at most {room} tokens",
                param="max_tokens",
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else min(self.default_max_tokens, room)
        prepared = PreparedRequest(
            input_ids=input_ids,
            pixel_values=inputs.get("pixel_values"),
            image_sizes=inputs.get("image_sizes"),
            params=params,
            max_tokens=max_tokens,
            num_images=len(images),
            image_tokens=int((input_ids == self.image_token_id).sum()),
            image_detail=detail,
        )
        prepared.images  # noqa: B018  (hashed here, on the caller's thread; the engine thread reads the result)
        return prepared

    def _base_view_placeholders(self, input_ids: torch.Tensor, detail: tuple[str, ...]) -> torch.Tensor:
        """*input_ids* with each ``low`` image's run of ``<image>`` tokens shortened to one base view's."""
        ids = input_ids[0].tolist()
        runs, start = [], None  # (start, end) of each run of image tokens, in order
        for i, token in enumerate(ids + [None]):
            if token == self.image_token_id and start is None:
                start = i
            elif token != self.image_token_id and start is not None:
                runs.append((start, i))
                start = None
        if len(runs) != len(detail):
            raise BadRequestError(
                f"detail='low' needs each image's placeholder apart from the others; the prompt "
                f"has {len(runs)} runs of image tokens for {len(detail)} images",
                param="messages",
            )
        out, previous = [], 0
        for (begin, end), level in zip(runs, detail, strict=True):
            tokens = self.base_view_tokens() if level == "low" else end - begin
            out += ids[previous:begin] + [self.image_token_id] * tokens
            previous = end
        out += ids[previous:]
        return torch.tensor([out], dtype=input_ids.dtype)


def _image_detail(detail: Sequence[str] | None, count: int) -> tuple[str, ...]:
    """One ``"low"`` / ``"high"`` per image (``"auto"`` is high)."""
    if detail is None:
        return ()
    detail = tuple(detail)
    if len(detail) != count:
        raise BadRequestError(
            f"image_detail has {len(detail)} values for {count} images; give one per image", param="messages"
        )
    for value in detail:
        if value not in ("low", "high", "auto"):
            raise BadRequestError(f"image detail must be 'low', 'high' or 'auto', got {value!r}", param="messages")
    return tuple("low" if value == "low" else "high" for value in detail)


def _longest_token_chars(tokenizer) -> int:
    """Characters one token can stand for at most: its vocabulary string's length (a bound for refusing
    prompts before tokenizing them)."""
    try:
        return max((len(token) for token in tokenizer.get_vocab() if isinstance(token, str)), default=1) or 1
    except Exception:
        return 64
