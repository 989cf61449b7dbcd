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
  {"type": "text", "text": "..."}]}]`` (or a list of such conversations), in any shape the SDK's one
  message parser reads (:func:`llava_next_sdk.messages.read_messages`: OpenAI ``image_url`` parts,
  ``ChatMessage`` objects...). ``{"type": "image"}`` parts without an image take the images given with
  ``images=``.
- Any generate argument (``max_new_tokens``, ``do_sample``, ``num_return_sequences``, ``streamer``...) passes
  through, either as a keyword or in ``generate_kwargs={...}`` (the same name in both must agree).
- transformers' pipeline arguments: ``stop_sequence`` (generation stops with the token that completes it),
  ``continue_final_message`` (chat messages ending with an assistant turn are continued, by default),
  ``processor_kwargs``,
  ``return_tensors=True`` (token ids instead of text), ``skip_special_tokens``, ``clean_up_tokenization_spaces``;
  ``return_full_text`` may only be ``False`` (the answer never holds the prompt).
- ``detail="low"``: OpenAI's ``detail`` for every image of the call: the base view only (one tile's
  tokens, 576 on llava-v1.6-mistral); ``"high"``/``"auto"`` (the default) the full any-resolution tiles.
  An image part of chat messages may set its own (``{"type": "image", "image": img, "detail": "low"}``, or
  in an OpenAI ``image_url``); a part's ``low`` or ``high`` wins over the call's. It goes to the processor
  and to ``generate`` alike (``image_detail=``, one per image of a batch).

A single request returns ``[{"generated_text": answer}]`` (one dict per returned sequence); a batch returns
one such list per item. The answer holds only the generated text, never the prompt.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from llava_next_sdk.messages import ImageRef, ParsedMessage
from llava_next_sdk.types import ChatMessage, ImagePart
from transformers import GenerationMixin, Pipeline, ProcessorMixin
from transformers.utils import ModelOutput

from .errors import InputError

__all__ = ["LlavaNextImageToTextPipeline", "DEFAULT_PROMPT", "DEFAULT_MAX_NEW_TOKENS"]

DEFAULT_PROMPT = "Describe this image."
"""The instruction used when the pipeline is called with images only."""

DEFAULT_MAX_NEW_TOKENS = 256
"""Used when neither the call nor the checkpoint's generation config bounds the answer's length."""

DEFAULT_IMAGE_TIMEOUT = 10.0
"""Seconds allowed for fetching one image from an ``http(s)://`` URL."""

IMAGE_PLACEHOLDER = "<image>"

PREPROCESS_PARAMETERS = frozenset({"continue_final_message", "processor_kwargs"})
"""transformers' pipeline arguments that shape the prompt and the processor's call."""
POSTPROCESS_PARAMETERS = frozenset(
    {"return_full_text", "return_tensors", "skip_special_tokens", "clean_up_tokenization_spaces"}
)
"""transformers' pipeline arguments that shape the answer."""


@dataclass
class _Request:
    """One item of a call: its images, and either a prompt string or chat messages."""

    images: list[Any] = field(default_factory=list)
    prompt: str | None = None
    messages: tuple[ParsedMessage, ...] | None = None
    details: list[str] = field(default_factory=list)  # per image, as its chat part set it (none: all "auto")

    def image_detail(self, default: str | None) -> list[str]:
        """Each image's ``detail``: its part's ``low``/``high``, else *default* (the call's), else ``auto``."""
        details = self.details or ["auto"] * len(self.images)
        return [d if d != "auto" else (default or "auto") for d in details]


def _seconds(value: Any) -> float:
    """A ``timeout``: seconds, a number > 0 (else :class:`InputError` naming it)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    raise InputError(f"timeout must be a number of seconds > 0, got {value!r}", param="timeout")


def _batch_size(value: Any) -> int:
    """A ``batch_size``: a whole number >= 1 (else :class:`InputError` naming it)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise InputError(f"batch_size must be a whole number of at least 1, got {value!r}", param="batch_size")


def _is_item(obj: Any) -> bool:
    """transformers' ``{"images": ..., "text": ...}`` input item (not a chat message, which has a role or content)."""
    return (
        isinstance(obj, Mapping)
        and not {"role", "content"} & set(obj)
        and bool({"images", "image", "text", "prompt"} & set(obj))
    )


def _is_lazy(obj: Any) -> bool:
    """A generator, an iterator or a torch dataset (not a list, an image, an array or a file object, which is
    an iterator of lines but one image)."""
    if isinstance(obj, torch.utils.data.Dataset):
        return True
    return isinstance(obj, Iterator) and not callable(getattr(obj, "read", None))  # generators are iterators


def _is_conversation(obj: Any) -> bool:
    """Chat messages: a list holding a message (a dict, or the SDK's message objects; no image source is one
    of those), to be read by the message parser, which says what is wrong with the others."""
    return isinstance(obj, (list, tuple)) and any(isinstance(m, (Mapping, ChatMessage, ParsedMessage)) for m in obj)


def _is_conversations(obj: Any) -> bool:
    """A non-empty list of conversations (a batch of chats)."""
    return isinstance(obj, (list, tuple)) and bool(obj) and all(_is_conversation(c) for c in obj)


def _as_list(obj: Any) -> list[Any]:
    return list(obj) if isinstance(obj, (list, tuple)) else [obj]


def _source(ref: ImageRef) -> Any:
    """What :func:`~llava_next_plugin.images.load_image` reads for an image part (an ``ImagePart`` of a
    ``ChatMessage`` gives its decoded image, bytes or URL)."""
    part = ref.source
    if not isinstance(part, ImagePart):
        return part
    return next(value for value in (part.image, part.data, part.url) if value is not None)


class LlavaNextImageToTextPipeline(Pipeline):
    """Answer prompts about images with a LLaVA-NeXT checkpoint (see the module docstring for inputs).

    Built by ``transformers.pipeline("image-to-text", model=...)`` once ``llava_next_plugin`` is
    imported, or directly: ``LlavaNextImageToTextPipeline(model=model, processor=processor)``.
    Generate arguments (``max_new_tokens``...) given here apply to every call.

    :param model: a LLaVA-NeXT model (ours or transformers').
    :param processor: its processor (tokenizer with a chat template, anyres image processor).
    :param timeout: seconds allowed to fetch each image URL.
    :param prompt_family: the prompt format for a checkpoint without a chat template (``"mistral"``,
        ``"vicuna"``, ``"chatml"``, ``"llama3"``); detected when not given.
    :param default_prompt: the instruction for calls without a prompt.
    """

    # transformers declares these None in Pipeline while its own pipelines set them to bools.
    _load_processor = True  # type: ignore[assignment]
    _load_image_processor = False  # type: ignore[assignment]
    _load_feature_extractor = False  # type: ignore[assignment]
    _load_tokenizer = False  # type: ignore[assignment]

    def __init__(
        self,
        *args: Any,
        timeout: float | None = None,
        prompt_family: str | None = None,
        default_prompt: str = DEFAULT_PROMPT,
        **kwargs: Any,
    ) -> None:
        misplaced = sorted({"prompt", "text", "images", "image"} & set(kwargs))
        if misplaced:  # they would become generate arguments, and every call would fail on them
            raise InputError(
                f"{', '.join(misplaced)} given when building the pipeline: give prompts and images to each call "
                "(pipe(image, prompt=...)), and default_prompt= for the instruction of calls without a prompt",
                param=misplaced[0],
            )
        self.timeout = DEFAULT_IMAGE_TIMEOUT if timeout is None else _seconds(timeout)
        self.prompt_family = prompt_family
        self.default_prompt = default_prompt
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError(
                "LlavaNextImageToTextPipeline needs the checkpoint's processor: pass processor=, or "
                "build it with pipeline('image-to-text', model=<checkpoint folder or hub id>)"
            )

    @property
    def _processor(self) -> ProcessorMixin:
        """The processor, which ``__init__`` made sure of."""
        if self.processor is None:
            raise InputError("this pipeline has no processor: build it with processor=")
        return self.processor

    # --- transformers' Pipeline protocol --------------------------------------------------
    def _sanitize_parameters(
        self, generate_kwargs: dict[str, Any] | None = None, stop_sequence: Any = None, **kwargs: Any
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """``(preprocess, generate, postprocess)`` arguments: transformers' pipeline arguments go where they act;
        every other keyword is a generate argument, as is each of *generate_kwargs*."""
        if generate_kwargs is not None and not isinstance(generate_kwargs, Mapping):
            raise InputError(f"generate_kwargs must be a dict, got {type(generate_kwargs).__name__}")
        forward_params = dict(generate_kwargs or {})
        for name, value in kwargs.items():
            if name in PREPROCESS_PARAMETERS or name in POSTPROCESS_PARAMETERS:
                continue
            if value is None and name in forward_params:  # None is "not given": generate_kwargs' value stands
                continue
            if name in forward_params and forward_params[name] != value:
                raise InputError(
                    f"{name} was given twice, as {value!r} and in generate_kwargs as {forward_params[name]!r}: "
                    "give it once"
                )
            forward_params[name] = value
        if stop_sequence is not None:  # generation stops with the token completing it (kept in the answer)
            stops = [stop_sequence] if isinstance(stop_sequence, str) else stop_sequence
            if not isinstance(stops, (list, tuple)) or not stops or not all(isinstance(x, str) and x for x in stops):
                raise InputError(f"stop_sequence must be a non-empty string (or a list of them), got {stop_sequence!r}")
            forward_params["stop_strings"] = list(stops)
        for name in ("max_new_tokens", "num_return_sequences"):
            value = forward_params.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"{name} must be a whole number of at least 1, got {value!r}")
        preprocess_params = {k: v for k, v in kwargs.items() if k in PREPROCESS_PARAMETERS}
        postprocess_params = {k: v for k, v in kwargs.items() if k in POSTPROCESS_PARAMETERS}
        if postprocess_params.get("return_full_text"):
            raise InputError(
                "return_full_text=True is not offered: this pipeline's answer is the generated text alone "
                "(prepend the prompt yourself if you need it)"
            )
        processor_kwargs = preprocess_params.get("processor_kwargs")
        if processor_kwargs is not None and not isinstance(processor_kwargs, Mapping):
            raise InputError(f"processor_kwargs must be a dict, got {type(processor_kwargs).__name__}")
        if processor_kwargs and "image_detail" in processor_kwargs:  # the model must be told too
            raise InputError("give the image detail as detail=, not in processor_kwargs: the model needs it too")
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, input_: list[_Request], **preprocess_parameters: Any) -> dict[str, Any]:
        """Load the images of a batch of requests, format the prompts, and run the processor (left padding).

        :param input_: the batch's requests.
        :param timeout: (keyword) seconds allowed to fetch each image URL (default: the pipeline's).
        :param image_detail: (keyword) OpenAI's ``detail``, one for every image or one per image (default: full
            any-resolution).
        """
        timeout = preprocess_parameters.get("timeout")
        image_detail = preprocess_parameters.get("image_detail")
        first = preprocess_parameters.get("first_image", 0)  # the batch's first image's index in the whole call
        timeout = self.timeout if timeout is None else _seconds(timeout)
        images: list[Any] = []
        prompts: list[str] = []
        for request in input_:
            for source in request.images:
                images.append(self._load_image(source, index=first + len(images), timeout=timeout))
            prompts.append(self._format(request, preprocess_parameters.get("continue_final_message")))
        # Left padding: generation continues every row from its last column.
        settings = {**(preprocess_parameters.get("processor_kwargs") or {})}
        settings.update(padding=True, padding_side="left", return_tensors="pt")
        if image_detail is not None:
            settings["image_detail"] = image_detail
        return dict(self._processor(images=images or None, text=prompts, **settings))

    def _forward(self, input_tensors: dict[str, Any], **forward_parameters: Any) -> ModelOutput:
        """``model.generate`` on one padded batch; returns only the new tokens, ``new_tokens: [batch, new]``."""
        model = self.model
        if not isinstance(model, GenerationMixin):
            raise TypeError(f"{type(model).__name__} cannot generate; pass a LLaVA-NeXT model")
        generate_kwargs = {k: v for k, v in forward_parameters.items() if v is not None}  # None: the default
        given_config = generate_kwargs.pop("generation_config", None)
        config = given_config if given_config is not None else getattr(model, "generation_config", None)
        defaults: dict[str, Any] = {}
        bounded = any(k in generate_kwargs for k in ("max_new_tokens", "max_length"))
        if given_config is not None:  # a length the caller's config sets (not the class default) is a choice
            bounded = bounded or bool({"max_new_tokens", "max_length"} & set(given_config.to_diff_dict()))
        # a config's max_length of 20 is transformers' model-agnostic default, not a choice
        if not bounded and getattr(config, "max_new_tokens", None) is None:
            defaults["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
        pad_token_id = self._processor.tokenizer.pad_token_id
        if (
            "pad_token_id" not in generate_kwargs
            and pad_token_id is not None
            and getattr(config, "pad_token_id", None) is None
        ):
            defaults["pad_token_id"] = pad_token_id
        if given_config is not None:  # the defaults go into (a copy of) the caller's config, as transformers does
            given_config = copy.deepcopy(given_config)
            for name, value in defaults.items():
                setattr(given_config, name, value)
            generate_kwargs["generation_config"] = given_config
        else:
            generate_kwargs.update(defaults)
        if "stop_strings" in generate_kwargs:
            generate_kwargs.setdefault("tokenizer", self._processor.tokenizer)
        model_inputs = dict(input_tensors)
        pixels = model_inputs.get("pixel_values")
        if pixels is not None and model.dtype.is_floating_point:  # a list with do_pad=False: one tensor per image
            model_inputs["pixel_values"] = (
                [p.to(model.dtype) for p in pixels] if isinstance(pixels, list) else pixels.to(model.dtype)
            )
        prompt_length = model_inputs["input_ids"].shape[1]
        output = model.generate(**model_inputs, **generate_kwargs)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        # num_return_sequences: each request's sequences are consecutive rows
        per_request = sequences.shape[0] // model_inputs["input_ids"].shape[0]
        return ModelOutput(
            {
                "new_tokens": sequences[:, prompt_length:],
                "per_request": per_request,
                "last_prompt_tokens": sequences[:, prompt_length - 1],  # left padded: every prompt ends there
            }
        )

    def postprocess(self, model_outputs: ModelOutput, **postprocess_parameters: Any) -> list[list[dict[str, Any]]]:
        """One list per request, of one dict per returned sequence: ``{"generated_text": str}``, or with
        ``return_tensors=True`` ``{"generated_token_ids": list[int]}``."""
        tokens, per_request = model_outputs["new_tokens"], int(model_outputs.get("per_request", 1))
        if postprocess_parameters.get("return_tensors"):
            items: list[dict[str, Any]] = [{"generated_token_ids": row.tolist()} for row in tokens]
        else:
            decode = {
                "skip_special_tokens": postprocess_parameters.get("skip_special_tokens", True),
                "clean_up_tokenization_spaces": postprocess_parameters.get("clean_up_tokenization_spaces"),
            }
            tokenizer = self._processor.tokenizer
            continued = postprocess_parameters.get("continued") or []
            items = []
            for i, row in enumerate(tokens):
                if i // per_request < len(continued) and continued[i // per_request]:
                    # a continued assistant turn: decoded after its last token, so that the space joining the
                    # two stays (a sentencepiece word decoded alone loses it), as transformers gives it
                    last = model_outputs["last_prompt_tokens"][i : i + 1]
                    joined = tokenizer.decode(torch.cat([last, row]), **decode)
                    text = joined[len(tokenizer.decode(last, **decode)) :].rstrip()
                else:  # the answer alone, stripped
                    text = tokenizer.decode(row, **decode).strip()
                items.append({"generated_text": text})
        return [items[start : start + per_request] for start in range(0, len(items), per_request)]

    # --- the call ---------------------------------------------------------------------------
    def __call__(
        self,
        inputs: Any = None,
        *args: Any,
        prompt: Any = None,
        images: Any = None,
        text: Any = None,
        batch_size: int | None = None,
        timeout: float | None = None,
        num_workers: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """Generate an answer for each request (see the module docstring for the accepted shapes).

        ``pipe(image, "question")`` is ``pipe(image, prompt="question")``. ``num_workers`` is accepted for
        transformers' signature and unused (batches run in this thread).

        :return: ``[{"generated_text": str}]`` for one request, a list of those for a batch.
        """
        if args:
            if len(args) > 1 or prompt is not None:
                raise InputError(
                    f"{1 + len(args) + (prompt is not None)} positional arguments and prompts were given: "
                    "call pipe(images, prompt) or pipe(messages)"
                )
            prompt = args[0]
        if text is not None:
            if prompt is not None:
                raise InputError("give the prompt once: either prompt= or text=, not both")
            prompt = text
        if inputs is None:
            inputs, images = images, None
        if inputs is None and (_is_conversation(prompt) or _is_conversations(prompt)):
            inputs, prompt = prompt, None  # pipe(text=messages), as transformers' image-text-to-text is called
        # the keywords again, for the calls a generator's or a dict item's items make (None: not given)
        again = {k: v for k, v in dict(batch_size=batch_size, timeout=timeout, **kwargs).items() if v is not None}
        if _is_lazy(inputs):  # a generator or a dataset: answers come back as an iterator, one per item
            return self._lazily(inputs, prompt, again)
        if _is_item(inputs) or (
            isinstance(inputs, (list, tuple)) and inputs and all(_is_item(i) for i in inputs)
        ):  # transformers' {"images": ..., "text": ...} items
            return self._dict_items(inputs, prompt, images, again)
        if inputs is None and isinstance(prompt, str) and images is None:
            inputs = []  # a text-only prompt
        if inputs is None and isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            inputs = [[] for _ in prompt]  # text-only prompts
        if inputs is None:
            raise InputError("nothing to answer: call pipe(image, prompt=...), pipe(messages) or pipe(text=...)")
        batch_size = _batch_size(batch_size if batch_size is not None else (self._batch_size or 1))
        requests, single = self._requests(inputs, prompt, images)
        preprocess_params, forward_params, postprocess_params = self._sanitize_parameters(**kwargs)
        preprocess_params = {**self._preprocess_params, **preprocess_params}
        # None given in this call means "the default": the pipeline's own, if it was built with one
        forward_params = {**self._forward_params, **{k: v for k, v in forward_params.items() if v is not None}}
        postprocess_params = {**self._postprocess_params, **postprocess_params}
        detail = forward_params.pop("detail", None)  # OpenAI's detail: for the processor and generate alike
        results: list[Any] = []
        first_image = 0  # errors name an image by its index in the whole call
        for start in range(0, len(requests), batch_size):
            batch = requests[start : start + batch_size]
            image_detail: str | list[str] | None = detail
            if any(d != "auto" for r in batch for d in r.details):  # a part set its own: one value per image
                image_detail = [d for r in batch for d in r.image_detail(detail)]
            model_inputs = self.preprocess(
                batch, timeout=timeout, image_detail=image_detail, first_image=first_image, **preprocess_params
            )
            first_image += sum(len(r.images) for r in batch)
            detail_kwargs = {} if image_detail is None else {"image_detail": image_detail}
            outputs = self.forward(model_inputs, **forward_params, **detail_kwargs)
            continued = [self._continues(r, preprocess_params.get("continue_final_message")) for r in batch]
            results.extend(self.postprocess(outputs, **postprocess_params, continued=continued))
        return results[0] if single else results

    def _requests(self, inputs: Any, prompt: Any, images: Any) -> tuple[list[_Request], bool]:
        """Turn the call's arguments into requests; ``single`` says whether one result is returned."""
        if prompt is not None and (_is_conversation(inputs) or _is_conversations(inputs)):
            raise InputError(
                "chat messages and a prompt were both given: put the question in the messages (a last user "
                "message), or call pipe(images, prompt=...) without messages",
                param="prompt",
            )
        if _is_conversation(inputs):
            return [self._chat_request(inputs, images)], True
        if _is_conversations(inputs):
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

        if isinstance(inputs, (list, tuple)) and not inputs and isinstance(prompt, str):
            return [_Request([], prompt)], True  # a text-only prompt
        if not isinstance(inputs, (list, tuple)):
            if isinstance(prompt, (list, tuple)) and len(prompt) == 1:
                return [_Request([inputs], prompt[0])], False  # a batch of one
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
        return [_Request(_as_list(item), p) for item, p in zip(items, prompts, strict=True)], False

    def _lazily(self, items: Any, prompt: Any, kwargs: dict[str, Any]) -> Iterator[Any]:
        """Answers for a generator's or a dataset's items (a map-style dataset: its ``len()`` items, as
        transformers reads it), as they are asked for: ``batch_size`` items at a time in one batched call where
        they are alike (images, chat conversations or ``{"images", "text"}`` items), else one call each."""
        size = _batch_size(kwargs.get("batch_size") or self._batch_size or 1)
        if isinstance(items, torch.utils.data.IterableDataset) or not hasattr(items, "__len__"):
            source = iter(items)
        else:  # for-in over a dataset would read past its length, until an IndexError that may never come
            source = (items[index] for index in range(len(items)))
        with_prompt = {} if prompt is None else {"prompt": prompt}
        while chunk := list(itertools.islice(source, size)):
            if len(chunk) == 1:
                yield self(chunk[0], **with_prompt, **kwargs)
            elif all(_is_item(item) for item in chunk) or all(_is_conversation(item) for item in chunk):
                yield from self(chunk, **with_prompt, **kwargs)
            elif not any(isinstance(item, (Mapping, list, tuple)) for item in chunk):  # single images
                yield from self([[item] for item in chunk], **with_prompt, **kwargs)  # a request per item
            else:  # a mix: each item as it would be called alone
                for item in chunk:
                    yield self(item, **with_prompt, **kwargs)

    def _dict_items(self, inputs: Any, prompt: Any, images: Any, kwargs: dict[str, Any]) -> Any:
        """transformers' ``{"images": ..., "text": ...}`` item, or a list of them (a batch)."""
        if prompt is not None or images is not None:
            raise InputError("give the prompt and images inside the {'images': ..., 'text': ...} items, not again")
        items = [inputs] if isinstance(inputs, Mapping) else list(inputs)
        answers: list[Any] = [None] * len(items)
        batched: list[tuple[int, list[Any], Any]] = []  # items of images and a prompt: answered in one call
        for index, item in enumerate(items):
            unknown = set(item) - {"images", "image", "text", "prompt"}
            if unknown:
                raise InputError(
                    f"input item {index} has key(s) {sorted(unknown)}: an item is {{'images': ..., 'text': ...}} "
                    "(or chat messages, each with a 'role')"
                )
            item_images = item.get("images", item.get("image"))
            item_text = item.get("text", item.get("prompt"))
            if item_images is None:
                answers[index] = self(text=item_text, **kwargs)
            elif _is_conversation(item_text):  # chat messages whose image parts take these images
                answers[index] = self(_as_list(item_images), text=item_text, **kwargs)
            else:  # one request, whatever the number of images (a list is not a batch here)
                batched.append((index, _as_list(item_images), item_text))
        if batched:
            found = self([images for _, images, _ in batched], prompt=[text for _, _, text in batched], **kwargs)
            for (index, _, _), answer in zip(batched, found, strict=True):
                answers[index] = answer
        return answers[0] if isinstance(inputs, Mapping) else answers

    def _chat_request(self, messages: Sequence[Any], images: Any) -> _Request:
        """A request from chat messages: images come from content parts, bare parts take *images*."""
        from .prompts import read_messages

        parsed = read_messages(messages)
        spare = list(images or [])
        found, details = [], []
        for ref in (ref for message in parsed for ref in message.images):
            details.append(ref.detail)
            if ref.source is None:
                if not spare:
                    raise InputError(
                        "the messages have more image parts than images: give each "
                        "{'type': 'image'} part an 'image' (PIL, path, bytes or URL) or pass images="
                    )
                found.append(spare.pop(0))
            else:
                found.append(_source(ref))
        if spare:
            raise InputError(
                f"{len(spare)} image(s) given but the messages have no image part for them: "
                "add a {'type': 'image'} part per image"
            )
        return _Request(found, None, parsed, details)

    # --- images and prompts -------------------------------------------------------------------
    def _load_image(self, source: Any, index: int, timeout: float) -> Any:
        """As transformers' pipelines read every image (its ``load_image``: ``convert("RGB")``), a transparent
        image's alpha is dropped (the command line's, server's and SDK's images are composited onto white)."""
        from .images import load_image

        return load_image(source, index, timeout=timeout, transparency="drop")

    @staticmethod
    def _continues(request: _Request, continue_final_message: bool | None) -> bool:
        """Whether *request*'s answer continues its last (assistant) message rather than starting a turn."""
        if request.messages is None or not request.messages:
            return False
        if continue_final_message is None:
            return request.messages[-1].role == "assistant"
        return bool(continue_final_message)

    def _format(self, request: _Request, continue_final_message: bool | None = None) -> str:
        """The model-ready prompt string for one request. Chat messages ending with an assistant turn are
        continued from its text unless *continue_final_message* is ``False`` (as transformers' pipeline)."""
        from .prompts import build_prompt

        if request.messages is not None:
            continue_final_message = self._continues(request, continue_final_message)
            return build_prompt(
                list(request.messages),
                self._processor,
                self.model.config,
                family=self.prompt_family,
                num_images=len(request.images),
                continue_final_message=bool(continue_final_message),
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
            text, self._processor, self.model.config, family=self.prompt_family, num_images=len(request.images)
        )
