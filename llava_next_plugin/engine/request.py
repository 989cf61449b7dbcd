"""What a request is to the engine: its sampling parameters, its prepared tensors, and its outcome."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from llava_next_sdk.errors import LlavaNextError, OverloadedError, ServerError
from llava_next_sdk.types import GenerationParams

from ..errors import InputError, as_api_error
from .reuse import image_key

__all__ = ["SamplingParams", "PreparedRequest", "EngineResult", "generation_error"]

#: One image of a request: its content key, its pixels, its size ``[1, 2]``, whether it is low detail.
Image = tuple[bytes, torch.Tensor, torch.Tensor, bool]


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. ``temperature == 0`` means greedy (argmax).

    Checked as the SDK's :class:`~llava_next_sdk.types.GenerationParams` checks them (the same
    :class:`~llava_next_sdk.errors.BadRequestError`, naming the parameter): ``max_tokens >= 1`` or ``None`` (as
    many as the context allows), ``0 <= temperature <= 2``, ``0 < top_p <= 1``, up to 4 non-empty stop strings
    (one string is one stop), a seed from 0 to 2**64 - 1. ``None`` for ``temperature``, ``top_p`` or ``stop``
    means the default, as ``null`` does in OpenAI's API.
    """

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        checked = GenerationParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, stop=self.stop, seed=self.seed
        )
        for field in dataclasses.fields(self):
            value = getattr(checked, field.name)
            object.__setattr__(self, field.name, field.default if value is None else value)


@dataclass
class PreparedRequest:
    """A request ready for the engine: tokens and pixels, counted and checked.

    ``input_ids [1, L]`` (image placeholders already expanded to ``image_tokens`` positions),
    ``pixel_values [num_images, patches, 3, h, w]`` or ``None``, ``image_sizes [num_images, 2]`` or ``None``.
    ``image_detail``: per image, ``"low"`` (the base view only: its tile's features, no grid) or ``"high"``
    (full anyres); empty means all high.
    """

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_sizes: torch.Tensor | None
    params: SamplingParams
    max_tokens: int
    num_images: int
    image_tokens: int
    image_detail: tuple[str, ...] = ()

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[-1])

    @functools.cached_property
    def images(self) -> list[Image]:
        """Each image as ``(content key, pixels, size [1, 2], low detail)``: the pixels are ``[1, tiles, 3, h, w]``,
        or the base view ``[1, 3, h, w]`` for a low-detail image; the key is :func:`~.reuse.image_key`.

        Computed once: :meth:`Engine.prepare` asks for it, so the pixels are hashed on the caller's thread, not on
        the engine's.
        """
        pixel_values, image_sizes = self.pixel_values, self.image_sizes
        if pixel_values is None or image_sizes is None or not self.num_images:
            return []
        images: list[Image] = []
        for i in range(self.num_images):
            low = i < len(self.image_detail) and self.image_detail[i] == "low"
            pixels, size = pixel_values[i : i + 1], image_sizes[i : i + 1]
            if low:
                pixels = pixels[:, 0]  # the base view: [1, 3, h, w]
            images.append((image_key(pixels, size[0].tolist() + [low]), pixels, size, low))
        return images


@dataclass
class EngineResult:
    """The outcome of one request: its text, why it ended, its token counts and timings (seconds)."""

    id: str
    text: str
    finish_reason: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    image_tokens: int
    queue_seconds: float
    time_to_first_token: float
    total_seconds: float

    def to_generation_result(self, model: str | None = None):
        """The SDK's :class:`~llava_next_sdk.types.GenerationResult` for this outcome (what both fronts return)."""
        from llava_next_sdk.types import GenerationResult, Timings, Usage

        return GenerationResult(
            text=self.text,
            finish_reason=self.finish_reason,
            usage=Usage(self.prompt_tokens, self.completion_tokens, self.image_tokens),
            timings=Timings(self.queue_seconds, self.time_to_first_token, self.total_seconds),
            model=model,
            id=self.id,
        )


def generation_error(exc: BaseException) -> LlavaNextError:
    """The typed error a request's caller gets when the model raised *exc* while generating it."""
    if isinstance(exc, LlavaNextError):
        return exc
    if isinstance(exc, InputError):  # bad input found by the model itself (e.g. image features vs tokens)
        return as_api_error(exc)
    if isinstance(exc, torch.OutOfMemoryError):
        return OverloadedError(
            f"the device ran out of memory while generating ({exc}); retry later, or with "
            "fewer or smaller images or a smaller max_tokens",
            status=503,
            retry_after=1.0,
        )
    return ServerError(f"generation failed: {exc!r}")
