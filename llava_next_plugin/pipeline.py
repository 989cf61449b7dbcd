"""The image-to-text pipeline for LLaVA-NeXT: images (and an optional prompt) in, generated text out.

    >>> import llava_next_plugin
    >>> from transformers import pipeline
    >>> pipe = pipeline("image-to-text", model="llava-hf/llava-v1.6-mistral-7b-hf", device="cuda")
    >>> pipe(image, prompt="What does this chart show?")
    [{'generated_text': 'The chart shows ...'}]

What it accepts (each image may be a PIL image, a path, ``bytes``, or an ``http(s)://`` URL):

- ``pipe(image)``: a caption, asked with :data:`DEFAULT_PROMPT`.
- ``pipe(image, prompt="...")``: a question. The prompt is wrapped in the checkpoint's chat template
  and gets its ``<image>`` placeholder when it has none, so the same call works for Mistral, Vicuna,
  ChatML and Llama-3 checkpoints. A prompt that is already formatted (``[INST] <image>\\n... [/INST]``)
  is kept as is.
- ``pipe([img1, img2], prompt=...)``: a batch; ``prompt`` may be one string for all or a list with
  one per image. An item may itself be a list of images for a multi-image prompt; a single string
  prompt with ``k >= 2`` ``<image>`` placeholders and ``k`` images is one multi-image request.
- ``pipe(messages)``: chat format, ``[{"role": "user", "content": [{"type": "image", "image": img},
  {"type": "text", "text": "..."}]}]`` (or a list of such conversations). ``{"type": "image"}``
  parts without an image take the images given with ``images=``.
- Any generate argument (``max_new_tokens``, ``do_sample``, ``streamer``...) passes through, either as
  a keyword or in ``generate_kwargs={...}``.
- ``detail="low"``: OpenAI's ``detail`` for every image of the call: the base view only (one tile's
  tokens, 576 on llava-v1.6-mistral); ``"high"``/``"auto"`` (the default) the full any-resolution tiles.
  It goes to the processor and to ``generate`` alike (``image_detail=``).

A single request returns ``[{"generated_text": answer}]``; a batch returns one such list per item.
The answer holds only the generated text, never the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Pipeline

from .errors import InputError

__all__ = ["LlavaNextImageToTextPipeline", "DEFAULT_PROMPT", "DEFAULT_MAX_NEW_TOKENS"]

DEFAULT_PROMPT = "Describe this image."
"""The instruction used when the pipeline is called with images only."""

DEFAULT_MAX_NEW_TOKENS = 256
"""Used when neither the call nor the checkpoint's generation config bounds the answer's length."""

DEFAULT_IMAGE_TIMEOUT = 10.0
"""Seconds allowed for fetching one image from an ``http(s)://`` URL."""

IMAGE_PLACEHOLDER = "<image>"


@dataclass
class _Request:
    """One item of a call: its images, and either a prompt string or chat messages."""

    images: list = field(default_factory=list)
    prompt: str | None = None
    messages: list | None = None


def _is_message(obj: Any) -> bool:
    return isinstance(obj, dict) and "role" in obj and "content" in obj


def _is_conversation(obj: Any) -> bool:
    return isinstance(obj, (list, tuple)) and len(obj) > 0 and all(_is_message(m) for m in obj)


def _as_list(obj: Any) -> list:
    return list(obj) if isinstance(obj, (list, tuple)) else [obj]


def _image_of_part(part: dict) -> Any:
    """The image a chat content part carries, or ``None`` for a bare ``{"type": "image"}``."""
    if part.get("type") == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    for key in ("image", "url", "path"):
        if part.get(key) is not None:
            return part[key]
    return None


class LlavaNextImageToTextPipeline(Pipeline):
    """Answer prompts about images with a LLaVA-NeXT checkpoint (see the module docstring for inputs).

    Built by ``transformers.pipeline("image-to-text", model=...)`` once ``llava_next_plugin`` is
    imported, or directly: ``LlavaNextImageToTextPipeline(model=model, processor=processor)``.

    Args:
        model: a LLaVA-NeXT model (ours or transformers').
        processor: its processor (tokenizer with a chat template, anyres image processor).
        timeout (`float`): seconds allowed to fetch each image URL.
        prompt_family (`str`): the prompt format for a checkpoint without a chat template
            (``"mistral"``, ``"vicuna"``, ``"chatml"``, ``"llama3"``); detected when not given.
        default_prompt (`str`): the instruction for calls without a prompt.
        Generate arguments (``max_new_tokens``...) given here apply to every call.
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(
        self,
        *args: Any,
        timeout: float | None = None,
        prompt_family: str | None = None,
        default_prompt: str = DEFAULT_PROMPT,
        **kwargs: Any,
    ) -> None:
        self.timeout = DEFAULT_IMAGE_TIMEOUT if timeout is None else float(timeout)
        self.prompt_family = prompt_family
        self.default_prompt = default_prompt
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError(
                "LlavaNextImageToTextPipeline needs the checkpoint's processor: pass processor=, or "
                "build it with pipeline('image-to-text', model=<checkpoint folder or hub id>)"
            )

    # --- transformers' Pipeline protocol --------------------------------------------------
    def _sanitize_parameters(self, generate_kwargs: dict | None = None, **kwargs: Any):
        """Every keyword that is not the pipeline's own is a generate argument."""
        forward_params = dict(generate_kwargs or {})
        forward_params.update(kwargs)
        return {}, forward_params, {}

    def preprocess(self, requests: list[_Request], timeout: float | None = None, image_detail: str | None = None):
        """Load the images of a batch, format the prompts, and run the processor (left padding)."""
        timeout = self.timeout if timeout is None else float(timeout)
        images, prompts = [], []
        for request in requests:
            for source in request.images:
                images.append(self._load_image(source, index=len(images), timeout=timeout))
            prompts.append(self._format(request))
        # Left padding: generation continues every row from its last column.
        detail = {} if image_detail is None else {"image_detail": image_detail}
        return self.processor(
            images=images or None, text=prompts, padding=True, padding_side="left", return_tensors="pt", **detail
        )

    def _forward(self, model_inputs, **generate_kwargs):
        """``model.generate`` on one padded batch; returns only the new tokens, ``[batch, new]``."""
        generate_kwargs = dict(generate_kwargs)
        config = getattr(self.model, "generation_config", None)
        bounded = any(k in generate_kwargs for k in ("max_new_tokens", "max_length"))
        if not bounded and getattr(config, "max_new_tokens", None) is None:
            generate_kwargs["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
        if "pad_token_id" not in generate_kwargs and self.processor.tokenizer.pad_token_id is not None:
            generate_kwargs["pad_token_id"] = self.processor.tokenizer.pad_token_id
        model_inputs = dict(model_inputs)
        if "pixel_values" in model_inputs and self.model.dtype.is_floating_point:
            model_inputs["pixel_values"] = model_inputs["pixel_values"].to(self.model.dtype)
        prompt_length = model_inputs["input_ids"].shape[1]
        output = self.model.generate(**model_inputs, **generate_kwargs)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        return {"new_tokens": sequences[:, prompt_length:]}

    def postprocess(self, model_outputs):
        texts = self.processor.tokenizer.batch_decode(model_outputs["new_tokens"], skip_special_tokens=True)
        return [[{"generated_text": text.strip()}] for text in texts]

    # --- the call ---------------------------------------------------------------------------
    def __call__(
        self,
        inputs: Any = None,
        prompt: Any = None,
        *,
        images: Any = None,
        text: Any = None,
        batch_size: int | None = None,
        timeout: float | None = None,
        num_workers: int | None = None,
        **kwargs: Any,
    ):
        """Generate an answer for each request (see the module docstring for the accepted shapes).

        Returns ``[{"generated_text": str}]`` for one request, a list of those for a batch.
        ``num_workers`` is accepted for transformers' signature and unused (batches run in this thread).
        """
        if text is not None:
            if prompt is not None:
                raise InputError("give the prompt once: either prompt= or text=, not both")
            prompt = text
        if inputs is None:
            inputs, images = images, None
        if inputs is None:
            raise InputError("no image given: call pipe(image, prompt=...) or pipe(messages)")
        requests, single = self._requests(inputs, prompt, images)
        batch_size = batch_size or self._batch_size or 1
        _, forward_params, _ = self._sanitize_parameters(**kwargs)
        forward_params = {**self._forward_params, **forward_params}
        detail = forward_params.pop("detail", None)  # OpenAI's detail: for the processor and generate alike
        if detail is not None:
            forward_params["image_detail"] = detail
        results = []
        for start in range(0, len(requests), batch_size):
            model_inputs = self.preprocess(requests[start : start + batch_size], timeout=timeout, image_detail=detail)
            results.extend(self.postprocess(self.forward(model_inputs, **forward_params)))
        return results[0] if single else results

    def _requests(self, inputs: Any, prompt: Any, images: Any) -> tuple[list[_Request], bool]:
        """Turn the call's arguments into requests; ``single`` says whether one result is returned."""
        if _is_conversation(inputs):
            return [self._chat_request(inputs, images)], True
        if isinstance(inputs, (list, tuple)) and inputs and all(_is_conversation(c) for c in inputs):
            if images is not None:
                raise InputError(
                    "images= cannot be combined with a batch of conversations: put each "
                    "image in its conversation's content"
                )
            return [self._chat_request(c, None) for c in inputs], False
        if _is_conversation(prompt):
            return [self._chat_request(prompt, _as_list(inputs))], True
        if images is not None:
            raise InputError("images were given twice: pass them as the first argument or as images=")

        if not isinstance(inputs, (list, tuple)):
            if isinstance(prompt, (list, tuple)):
                raise InputError(
                    f"{len(prompt)} prompts were given for one image: give one prompt, "
                    "or a list of images as long as the list of prompts"
                )
            return [_Request([inputs], prompt)], True
        items = list(inputs)
        if not items:
            raise InputError("the list of images is empty")
        if (
            isinstance(prompt, str)
            and len(items) > 1
            and prompt.count(IMAGE_PLACEHOLDER) == len(items)
            and not any(isinstance(item, (list, tuple)) for item in items)
        ):
            return [_Request(items, prompt)], True  # one multi-image prompt
        prompts = _as_list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * len(items)
        if len(prompts) != len(items):
            raise InputError(
                f"{len(items)} images but {len(prompts)} prompts: give one prompt for all, or exactly one per image"
            )
        return [_Request(_as_list(item), p) for item, p in zip(items, prompts)], False

    def _chat_request(self, messages: Sequence[dict], images: Any) -> _Request:
        """A request from chat messages: images come from content parts, bare parts take *images*."""
        spare = list(images or [])
        found, cleaned = [], []
        for message in messages:
            content = message["content"]
            if isinstance(content, str):
                cleaned.append({"role": message["role"], "content": [{"type": "text", "text": content}]})
                continue
            parts = []
            for part in content:
                if part.get("type") in ("image", "image_url"):
                    source = _image_of_part(part)
                    if source is None:
                        if not spare:
                            raise InputError(
                                "the messages have more image parts than images: give each "
                                "{'type': 'image'} part an 'image' (PIL, path, bytes or URL) or pass images="
                            )
                        source = spare.pop(0)
                    found.append(source)
                    parts.append({"type": "image"})
                elif part.get("type") == "text":
                    parts.append({"type": "text", "text": part.get("text", "")})
                else:
                    raise InputError(f"unsupported content part type {part.get('type')!r}: use 'image' or 'text'")
            cleaned.append({"role": message["role"], "content": parts})
        if spare:
            raise InputError(
                f"{len(spare)} image(s) given but the messages have no image part for them: "
                "add a {'type': 'image'} part per image"
            )
        return _Request(found, None, cleaned)

    # --- images and prompts -------------------------------------------------------------------
    def _load_image(self, source: Any, index: int, timeout: float):
        from .images import load_image

        return load_image(source, index, timeout=timeout)

    def _format(self, request: _Request) -> str:
        """The model-ready prompt string for one request."""
        from .prompts import build_prompt

        if request.messages is not None:
            return build_prompt(
                request.messages,
                self.processor,
                self.model.config,
                family=self.prompt_family,
                num_images=len(request.images),
            )
        text = self.default_prompt if request.prompt is None else request.prompt
        if not isinstance(text, str):
            raise InputError(f"the prompt must be a string or chat messages, got {type(text).__name__}")
        placeholders = text.count(IMAGE_PLACEHOLDER)
        if placeholders > len(request.images):
            raise InputError(
                f"the prompt has {placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(request.images)} "
                f"image(s) were given: give one image per placeholder, or remove the extra placeholders"
            )
        return build_prompt(
            text, self.processor, self.model.config, family=self.prompt_family, num_images=len(request.images)
        )
