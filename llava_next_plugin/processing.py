"""LlavaNextProcessor: a tokenizer and an image processor, with ``<image>`` expanded to the exact token count.

Each ``<image>`` placeholder in a prompt becomes as many ``<image>`` tokens as the model will produce
features for that image. The count comes from :mod:`llava_next_plugin.geometry` (the same arithmetic the
model uses to unpad and place newlines), so processor and model cannot disagree.

The count depends on three settings the image processor does not know: the vision tower's
``patch_size``, the ``vision_feature_select_strategy`` and ``num_additional_image_tokens`` (1 for towers
with a CLS position such as CLIP, 0 for SigLIP). llava-hf folders keep them in ``processor_config.json``.
When a folder lacks any of them, :meth:`LlavaNextProcessor.from_pretrained` derives it from the
``config.json`` next to it, and without one raises an error naming the keys to add: a missing
``num_additional_image_tokens`` would otherwise shift every image by one token.

Folder layouts read and written (see :meth:`LlavaNextProcessor.save_pretrained`):

- ``nested`` (transformers >= 5): ``processor_config.json`` holds the settings and the image processor's
  own settings under ``"image_processor"``.
- ``separate`` (llava-hf on the hub, older transformers): ``preprocessor_config.json`` holds the image
  processor, ``processor_config.json`` only the settings (or is missing).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from transformers import AutoTokenizer, BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin
from transformers.utils import CONFIG_NAME, IMAGE_PROCESSOR_NAME, PROCESSOR_NAME, cached_file

from . import geometry
from ._hub import IMAGE_BACKENDS, hub_kwargs, image_backend, image_processor_class
from .errors import ImageError, InputError
from .image_processing import ENCODED_SOURCES, load_image_sources

if TYPE_CHECKING:
    from .image_processing import LlavaNextImageProcessorBase

__all__ = ["LlavaNextProcessor", "TOKEN_COUNT_SETTINGS", "derive_token_count_settings"]

logger = logging.getLogger(__name__)

# processor_config.json keys that, with the image processor's tile size and pinpoints, fix an image's token count.
TOKEN_COUNT_SETTINGS = ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens")

_LAYOUTS = ("nested", "separate")


def derive_token_count_settings(model_config: dict) -> dict[str, Any]:
    """The three token-count settings as the model will use them, from a ``config.json`` dict.

    ``patch_size`` is ``vision_config.patch_size``; the strategy is the config's (its default
    ``"default"`` when absent); ``num_additional_image_tokens`` is 1 for CLIP towers, 0 otherwise
    (SigLIP has no CLS position). Our :class:`~llava_next_plugin.configuration.LlavaNextConfig` holds
    these rules; this function only reads them off it.
    """
    from .configuration import LlavaNextConfig

    config_dict = {k: v for k, v in model_config.items() if k not in ("architectures", "transformers_version")}
    config = LlavaNextConfig(**config_dict)
    return {
        "patch_size": config.patch_size,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "num_additional_image_tokens": config.num_additional_image_tokens,
    }


def _read_json_next_to(path: str | os.PathLike, filename: str, hub_kwargs: dict) -> dict | None:
    """``filename`` from the folder or hub repo *path* as a dict, or None when there is no such file."""
    if os.path.isfile(str(path)):
        return None
    resolved = cached_file(
        str(path),
        filename,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub_kwargs,
    )
    if resolved is None:
        return None
    with open(resolved, encoding="utf-8") as f:
        return json.load(f)


def _image_processor_class(backend: str | None, use_fast: bool | None) -> type[LlavaNextImageProcessorBase]:
    """Our fast processor unless the PIL backend is asked for (the rule of :func:`._hub.image_backend`)."""
    chosen = image_backend(backend, use_fast)
    if chosen is not None:
        return image_processor_class(chosen)
    raise InputError(
        f"unknown image processor backend {backend!r}: use one of {', '.join(map(repr, IMAGE_BACKENDS))} "
        f"('torchvision' is our torch processor, 'pil' the PIL one)",
        param="backend",
    )


def _is_single_image(item: Any) -> bool:
    if isinstance(item, ENCODED_SOURCES):
        return True
    ndim = getattr(item, "ndim", None)
    if ndim is not None:
        return ndim in (2, 3)
    return hasattr(item, "size") and hasattr(item, "mode")  # a PIL image


def _flatten_images(images: Any) -> tuple[list, list[int] | None]:
    """``(flat list of images, images per sample or None)`` from one image, a list, or a list per sample.

    A 4-d array or tensor is a batch of images. Per-sample counts are known only for a list of lists.
    """
    if _is_single_image(images):
        return [images], None
    if getattr(images, "ndim", None) == 4:
        return list(images), None
    if not isinstance(images, (list, tuple)):
        raise ImageError(
            f"images must be an image (PIL, numpy HWC array, torch CHW tensor, path or URL), a list of images, "
            f"or a list of lists of images (one list per prompt); got {type(images).__name__}"
        )
    if images and all(isinstance(item, (list, tuple)) for item in images):
        samples = [_unbatch(sample) for sample in images]
        return [image for sample in samples for image in sample], [len(sample) for sample in samples]
    return _unbatch(images), None


def _unbatch(items: Any) -> list:
    """*items* with each 4-d array or tensor (a batch) replaced by its images."""
    flat = []
    for item in items:
        if getattr(item, "ndim", None) == 4:
            flat.extend(list(item))
        else:
            flat.append(item)
    return flat


class LlavaNextProcessor(ProcessorMixin):
    r"""Tokenizer + image processor for LLaVA-NeXT, expanding each ``<image>`` to the model's feature count.

    :param image_processor: our ``LlavaNextImageProcessorFast`` (default) or ``LlavaNextImageProcessor``, or
        any image processor returning ``pixel_values`` [images, tiles, 3, tile, tile] and ``image_sizes``
        [images, 2] as (height, width).
    :param tokenizer: a tokenizer that knows ``image_token``.
    :param patch_size: pixels on a side of one vision patch (``vision_config.patch_size``).
    :param vision_feature_select_strategy: ``"default"`` (drop the first position of each tile) or
        ``"full"``, as in the model's config.
    :param chat_template: the Jinja chat template (optional).
    :param image_token: the placeholder, ``"<image>"``.
    :param num_additional_image_tokens: positions the tower emits before its patches (1 for CLIP, 0 for
        SigLIP; default 0). The default is transformers'; llava-hf's CLIP checkpoints need 1.
    :raises ValueError: a token-count setting missing or out of range, or a tokenizer without ``image_token``.

    ``patch_size`` and ``vision_feature_select_strategy`` are required: a processor without them would count
    image tokens wrongly. :meth:`from_pretrained` reads all three from the folder's ``processor_config.json``
    or derives them from its ``config.json`` (the constructor's default 0 does not apply there).

    Calling it: ``processor(images=..., text=..., return_tensors="pt", padding=True)`` returns
    ``input_ids`` and ``attention_mask`` [batch, seq] (padded on the tokenizer's ``padding_side``, as by
    transformers; batched generation needs ``padding_side="left"``, given here or set on the tokenizer), and
    ``pixel_values`` [images, max_tiles, 3, tile, tile] with ``image_sizes`` [images, 2]. ``images`` may be a
    flat list (given to the ``<image>`` placeholders in order) or one list per prompt.
    """

    images_kwargs = {"do_pad": True}

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        num_additional_image_tokens=0,
    ):
        missing = [
            name
            for name, value in zip(
                TOKEN_COUNT_SETTINGS,
                (patch_size, vision_feature_select_strategy, num_additional_image_tokens),
                strict=False,
            )
            if value is None
        ]
        if missing:
            raise ValueError(
                f"LlavaNextProcessor needs {', '.join(missing)} to count image tokens exactly. Pass them, e.g. "
                f"patch_size=14, vision_feature_select_strategy='default', num_additional_image_tokens=1 "
                f"(1 for CLIP towers, 0 for SigLIP), with the values of the model's config; or use "
                f"LlavaNextProcessor.from_pretrained on a folder with a config.json."
            )
        if vision_feature_select_strategy not in geometry.VALID_STRATEGIES:
            raise ValueError(
                f"vision_feature_select_strategy must be one of {geometry.VALID_STRATEGIES}, got "
                f"{vision_feature_select_strategy!r}"
            )
        if int(patch_size) < 1 or int(num_additional_image_tokens) < 0:
            raise ValueError(
                f"patch_size must be positive and num_additional_image_tokens non-negative, got "
                f"patch_size={patch_size}, num_additional_image_tokens={num_additional_image_tokens}"
            )
        self.patch_size = int(patch_size)
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.num_additional_image_tokens = int(num_additional_image_tokens)
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        image_token_id = getattr(tokenizer, "image_token_id", None)
        if image_token_id is None:
            image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if image_token_id is None or image_token_id == getattr(tokenizer, "unk_token_id", object()):
            raise ValueError(
                f"the tokenizer has no {self.image_token!r} token: add it with "
                f"tokenizer.add_tokens([{self.image_token!r}], special_tokens=True) and give the model's "
                f"image_token_index the id it gets"
            )
        self.image_token_id = int(image_token_id)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    # --- token counts ------------------------------------------------------------------------
    def image_geometry(
        self,
        height: int,
        width: int,
        tile_size: int | None = None,
        pinpoints: Sequence[Sequence[int]] | None = None,
        *,
        detail: str = "auto",
    ) -> geometry.ImageGeometry:
        """The token layout of one ``height x width`` image (see :func:`geometry.image_geometry`).

        :param detail: ``"low"`` for the base view only, ``"high"``/``"auto"`` for the full any-resolution tiles.
        :raises InputError: a size, pinpoint or setting the geometry cannot use (what, and the value).
        """
        try:
            return geometry.image_geometry(
                int(height),
                int(width),
                pinpoints if pinpoints is not None else self.image_processor.image_grid_pinpoints,
                int(tile_size) if tile_size is not None else self.tile_size,
                self.patch_size,
                self.vision_feature_select_strategy,
                self.num_additional_image_tokens,
                detail=detail,
            )
        except InputError:
            raise
        except ValueError as err:  # geometry's own checks: say which image size it was
            raise InputError(f"an image of height {height} and width {width}: {err}", param="image_sizes") from err

    def num_image_tokens(self, height: int, width: int, *, detail: str = "auto") -> int:
        """How many ``<image>`` tokens one ``height x width`` image becomes (at OpenAI's *detail*)."""
        return self.image_geometry(height, width, detail=detail).num_tokens

    @property
    def tile_size(self) -> int:
        """Pixels on a side of one vision-tower tile: the image processor's ``crop_size``."""
        crop = self.image_processor.crop_size
        height = crop["height"] if isinstance(crop, dict) else getattr(crop, "height", None)
        width = crop["width"] if isinstance(crop, dict) else getattr(crop, "width", None)
        if height is None or height != width:
            raise ValueError(f"the image processor's crop_size must be a square tile, got {crop}")
        return int(height)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        """The text one ``<image>`` becomes for image *image_idx* of *image_inputs* (this processor's image
        outputs): the image token repeated its feature count (transformers' processor hook)."""
        height, width = (int(v) for v in image_inputs["image_sizes"][image_idx])
        return self.image_token * self.num_image_tokens(height, width)

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        """Token counts for images of the given (height, width) sizes, without processing pixels."""
        from transformers.processing_utils import MultiModalData

        if image_sizes is None:
            return MultiModalData()
        counts = [self.num_image_tokens(h, w) for h, w in image_sizes]
        return MultiModalData(num_image_tokens=counts, num_image_patches=[1] * len(counts))

    # --- calling -----------------------------------------------------------------------------
    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        videos: Any = None,
        audio: Any = None,
        *,
        image_detail: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Tokenize *text* with every ``<image>`` expanded, and preprocess *images*.

        :param images: one image, a list (given to the placeholders in order), or a list per prompt.
        :param text: prompts with one ``<image>`` per image.
        :param image_detail: OpenAI's ``detail``, one for all images or one per image (in the flat order):
            ``"low"`` expands an image's ``<image>`` to its base view's tokens only (one tile, e.g. 576 on
            llava-v1.6-mistral), ``"high"``/``"auto"`` (the default) to the full any-resolution count. Give
            the model the same value (``model.generate(**inputs, image_detail=...)``).
        :param kwargs: tokenizer and image-processor arguments (``padding``, ``return_tensors``, ...), flat or
            as ``text_kwargs={...}`` / ``images_kwargs={...}``.
        :return: a ``BatchFeature`` with ``input_ids``, ``attention_mask`` [batch, seq] and, with images,
            ``pixel_values`` [images, max_tiles, 3, tile, tile] and ``image_sizes`` [images, 2].
        :raises InputError: images and placeholders that do not match, or an unknown *image_detail*.
        """
        if videos is not None or audio is not None:
            raise InputError("LlavaNextProcessor takes images and text only, not videos or audio")
        if images is None and text is None:
            raise InputError("give text, images, or both")
        texts = self._check_text(text)
        merged = self._merge_kwargs(
            ProcessingKwargs,  # type: ignore[arg-type]  # transformers passes the class; its hint says an instance
            tokenizer_init_kwargs=self.tokenizer.init_kwargs,
            **kwargs,
        )
        text_kwargs, images_kwargs = dict(merged["text_kwargs"]), dict(merged["images_kwargs"])
        want_type_ids = text_kwargs.pop("return_mm_token_type_ids", None) or merged.get("return_mm_token_type_ids")
        want_offsets = text_kwargs.pop("return_text_replacement_offsets", None) or merged.get(
            "return_text_replacement_offsets"
        )
        # the whole output's type, as transformers' processors take it: the text's (images_kwargs' own applies to the
        # image processor's outputs only, as there)
        return_tensors = text_kwargs.get("return_tensors") if texts is not None else images_kwargs.get("return_tensors")
        placeholder = self._placeholder_pattern(text_kwargs.get("sanitize_control_tokens"))

        flat_images, per_sample = ([], None) if images is None else _flatten_images(images)
        if texts is not None:
            self._check_image_counts(texts, placeholder, flat_images, per_sample, given=images is not None)

        pinpoints = images_kwargs.get("image_grid_pinpoints")
        configured = getattr(self.image_processor, "image_grid_pinpoints", None)
        if texts is not None and pinpoints is not None and configured is not None:
            if [list(map(int, p)) for p in pinpoints] != [list(map(int, p)) for p in configured]:
                raise InputError(
                    f"image_grid_pinpoints={pinpoints!r} for this call only: the model tiles images with its "
                    f"config's pinpoints ({configured!r}), so its features would not match the image tokens. "
                    "Set image_grid_pinpoints on the model's config and on the image processor alike",
                    param="image_grid_pinpoints",
                )
        data: dict[str, Any] = {}
        counts: list[int] = []
        if flat_images:
            image_inputs = self.image_processor(load_image_sources(flat_images), **images_kwargs)
            data.update(image_inputs)
            low = geometry.low_detail_images(image_detail, len(flat_images))
            counts = self._token_counts(image_inputs, images_kwargs, low)
        else:
            geometry.low_detail_images(image_detail, 0)  # a bad value is refused even without images

        if texts is not None:
            expanded, offsets = self._expand_placeholders(texts, placeholder, counts)
            text_inputs = self.tokenizer(expanded, **text_kwargs)
            self._check_not_truncated(
                text_inputs["input_ids"], expanded, placeholder, counts, text_inputs.get("overflow_to_sample_mapping")
            )
            if want_type_ids:
                ids = text_inputs["input_ids"]
                ids = ids.tolist() if hasattr(ids, "tolist") else ids
                text_inputs["mm_token_type_ids"] = [[int(t == self.image_token_id) for t in row] for row in ids]
            if want_offsets:
                text_inputs["text_replacement_offsets"] = offsets
            data = {**text_inputs, **data}
        # images with different tile counts (do_pad=False) stay a list of tensors, which the model takes; a list
        # whose tensors all have one shape is stacked into one tensor, as transformers' processor does
        pixels = data.get("pixel_values")
        ragged = (
            ["pixel_values"]
            if isinstance(pixels, (list, tuple)) and len({tuple(getattr(p, "shape", ())) for p in pixels}) > 1
            else []
        )
        return BatchFeature(
            data, tensor_type=return_tensors, skip_tensor_conversion=["text_replacement_offsets", *ragged]
        )

    @staticmethod
    def _check_text(text) -> list[str] | None:
        if text is None:
            return None
        if isinstance(text, str):
            return [text]
        if not isinstance(text, (list, tuple)):
            hint = ""
            if _is_single_image(text) or getattr(text, "ndim", None) == 4:
                hint = " (an image? the first positional argument is images: call processor(images=..., text=...))"
            raise InputError(
                f"text must be a string or a list of strings, got {type(text).__name__}{hint}", param="text"
            )
        for index, sample in enumerate(text):
            if not isinstance(sample, str):
                raise InputError(
                    f"text must be a string or a list of strings, but sample {index} is a "
                    f"{type(sample).__name__} ({sample!r:.60}); pass the prompt as a string with one "
                    f"<image> per image",
                    param="text",
                )
        return list(text)

    def _placeholder_pattern(self, sanitized: bool | None) -> re.Pattern:
        """The regex of one ``<image>`` placeholder (skipping control tokens marked by chat-template sanitizing)."""
        guard = ""
        if sanitized:
            from transformers import processing_utils

            guard = getattr(processing_utils, "_UNMARKED", "")
        return re.compile(guard + re.escape(self.image_token))

    def _check_image_counts(self, texts, placeholder, flat_images, per_sample, given: bool) -> None:
        in_text = [len(placeholder.findall(sample)) for sample in texts]
        n_images = len(flat_images)
        per_text = ", ".join(f"sample {i}: {n}" for i, n in enumerate(in_text))
        if per_sample is not None:
            if len(per_sample) != len(texts):
                raise InputError(
                    f"images were given as {len(per_sample)} lists (one per prompt) but there are {len(texts)} "
                    f"prompts; give one list of images per prompt",
                    param="images",
                )
            for index, (n_text, n_given) in enumerate(zip(in_text, per_sample, strict=True)):
                if n_text != n_given:
                    raise InputError(
                        f"sample {index} has {n_text} {self.image_token} placeholder(s) but {n_given} image(s); "
                        f"put one {self.image_token} in the prompt for each image",
                        param="images",
                    )
            return
        if sum(in_text) == n_images:
            return
        if not given:
            raise InputError(
                f"the text has {sum(in_text)} {self.image_token} placeholder(s) ({per_text}) but no images were "
                f"given; pass images=... or remove the placeholders",
                param="images",
            )
        raise InputError(
            f"{n_images} image(s) given but the text has {sum(in_text)} {self.image_token} placeholder(s) "
            f"({per_text}); put exactly one {self.image_token} in the prompt for each image",
            param="images",
        )

    def _token_counts(self, image_inputs, images_kwargs, low: list[bool]) -> list[int]:
        """Tokens for each processed image, from its original size, the tile size, the pinpoints and whether
        it is seen at ``detail="low"`` (*low*, one per image)."""
        pixel_values = image_inputs["pixel_values"]
        tile_height, tile_width = pixel_values[0][0].shape[-2:]
        if tile_height != tile_width:
            raise ValueError(f"tiles must be square, the image processor made {tile_height}x{tile_width} tiles")
        pinpoints = images_kwargs.get("image_grid_pinpoints") or self.image_processor.image_grid_pinpoints
        sizes = image_inputs["image_sizes"]
        sizes = sizes.tolist() if hasattr(sizes, "tolist") else sizes
        return [
            self.image_geometry(h, w, int(tile_height), pinpoints, detail="low" if is_low else "auto").num_tokens
            for (h, w), is_low in zip(((int(size[0]), int(size[1])) for size in sizes), low, strict=True)
        ]

    def _expand_placeholders(self, texts, placeholder, counts) -> tuple[list[str], list[list[dict]]]:
        """Each placeholder replaced by ``image_token * count``, and where each replacement went."""
        counts_iter = iter(counts)
        expanded, all_offsets = [], []
        for sample in texts:
            pieces, offsets, last, shift = [], [], 0, 0
            for match in placeholder.finditer(sample):
                start, end = match.span()
                replacement = self.image_token * next(counts_iter)
                pieces.append(sample[last:start])
                pieces.append(replacement)
                offsets.append(
                    {
                        "type": "image",
                        "span": (start, end),
                        "new_span": (start + shift, start + shift + len(replacement)),
                        "text": match.group(),
                        "replacement": replacement,
                    }
                )
                shift += len(replacement) - (end - start)
                last = end
            pieces.append(sample[last:])
            expanded.append("".join(pieces))
            all_offsets.append(offsets)
        return expanded, all_offsets

    def _check_not_truncated(self, input_ids, expanded, placeholder, counts, sample_of_row=None) -> None:
        """Every sample's image tokens whole, in one row. *sample_of_row*: the tokenizer's
        ``overflow_to_sample_mapping`` (``return_overflowing_tokens``: a sample's tokens continued on rows of their
        own, which is refused only for a sample holding images)."""
        ids = input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids
        if ids and isinstance(ids[0], int):
            ids = [ids]
        if len(ids) != len(expanded):
            owners = sample_of_row.tolist() if hasattr(sample_of_row, "tolist") else sample_of_row
            for index, sample in enumerate(expanded):
                rows = [row for row, owner in enumerate(owners or ()) if owner == index]
                if placeholder.search(sample) and (owners is None or len(rows) != 1):
                    raise InputError(
                        f"sample {index} became {len(rows) or 'several'} rows of input_ids: return_overflowing_tokens "
                        "splits a sample whose image tokens must stay in one row with its pixel_values. Drop "
                        "return_overflowing_tokens, or raise max_length or disable truncation",
                        param="return_overflowing_tokens",
                    )
            if owners is None:  # no sample holds an image
                return
            pairs = [(row, owners[row]) for row in range(len(ids)) if placeholder.search(expanded[owners[row]])]
            rows_and_samples = [(ids[row], expanded[sample], sample) for row, sample in pairs]
        else:
            rows_and_samples = [
                (row, sample, index) for index, (row, sample) in enumerate(zip(ids, expanded, strict=True))
            ]
        for row, sample, index in rows_and_samples:
            expected = len(placeholder.findall(sample))
            found = list(row).count(self.image_token_id)
            if found != expected:
                raise InputError(
                    f"sample {index}: {found} image tokens in input_ids but its images need {expected}; "
                    f"truncation cut into the image tokens. Raise max_length or disable truncation",
                    param="max_length",
                )

    # --- loading and saving ------------------------------------------------------------------
    @classmethod
    def get_processor_dict(cls, pretrained_model_name_or_path, **kwargs):
        """transformers' reading of ``processor_config.json`` and chat templates, with the token-count
        settings completed from ``config.json`` when the file lacks them (see the module docstring)."""
        processor_dict, rest = super().get_processor_dict(pretrained_model_name_or_path, **kwargs)
        given = {key for key in TOKEN_COUNT_SETTINGS if kwargs.get(key) is not None}
        missing = [k for k in TOKEN_COUNT_SETTINGS if processor_dict.get(k) is None and k not in given]
        model_config = _read_json_next_to(pretrained_model_name_or_path, CONFIG_NAME, hub_kwargs(kwargs))
        if model_config is not None and model_config.get("model_type") in (None, "llava_next"):
            derived = derive_token_count_settings(model_config)
            for key in missing:
                processor_dict[key] = derived[key]
            for key in TOKEN_COUNT_SETTINGS:
                if key in given:  # the caller's override wins (load the model with the same one)
                    if kwargs[key] != derived[key]:
                        logger.warning(
                            "%s=%r overrides the model's %s (%r): load the model with the same override, or the "
                            "image token counts will not match its features",
                            key,
                            kwargs[key],
                            CONFIG_NAME,
                            derived[key],
                        )
                    continue
                written = processor_dict.get(key)
                if written != derived[key]:
                    raise ValueError(
                        f"{PROCESSOR_NAME} in {pretrained_model_name_or_path} says {key}={written!r} but the "
                        f"model's {CONFIG_NAME} gives {derived[key]!r}: the image token counts would not match "
                        f"the model's features. Fix {key} in {PROCESSOR_NAME}."
                    )
        elif missing:
            example = {"patch_size": 14, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
            raise ValueError(
                f"{pretrained_model_name_or_path} has no {', '.join(missing)} in {PROCESSOR_NAME} and no "
                f"{CONFIG_NAME} of a llava_next model to derive them from. Add them to {PROCESSOR_NAME} with the "
                f"values of the model's config, e.g. "
                f"{json.dumps({k: example[k] for k in missing})} (num_additional_image_tokens: 1 for CLIP towers, "
                f"0 for SigLIP), or pass them to from_pretrained."
            )
        return processor_dict, rest

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        revision: str = "main",
        *,
        backend: str | None = None,
        use_fast: bool | None = None,
        **kwargs: Any,
    ) -> LlavaNextProcessor:
        """Load from a llava-hf folder or hub repo, in either layout (see the module docstring).

        The file-locating arguments (:data:`._hub.HUB_KWARGS`: these five, ``proxies``, ``subfolder``) reach
        every lookup alike: the tokenizer, the image processor, and the ``config.json`` the token-count
        settings may be derived from.

        :param pretrained_model_name_or_path: a folder or a hub repo id.
        :param cache_dir: the hub cache to use instead of the default one.
        :param force_download: download files again even when cached.
        :param local_files_only: never reach the network.
        :param token: the hub token, or True for the stored one.
        :param revision: the branch, tag or commit to load.
        :param backend: ``"torchvision"`` (our ``LlavaNextImageProcessorFast``, the default) or ``"pil"``
            (``LlavaNextImageProcessor``); see :data:`._hub.IMAGE_BACKENDS`.
        :param use_fast: transformers' older switch: ``False`` means ``backend="pil"``.
        :param kwargs: ``patch_size``, ``vision_feature_select_strategy``, ``num_additional_image_tokens`` or
            ``chat_template`` to override the folder's values; anything else goes to both loaders.
        :raises InputError: an unknown *backend*.
        :raises ValueError: token-count settings that are missing, or that the folder's ``processor_config.json``
            writes differently from its ``config.json`` (an override passed here wins, with a warning).
        """
        kwargs.update(
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            revision=revision,
        )
        image_processor_class = _image_processor_class(backend, use_fast)
        processor_dict, instance_kwargs = cls.get_processor_dict(pretrained_model_name_or_path, **kwargs)
        loader_kwargs = {k: v for k, v in kwargs.items() if k not in TOKEN_COUNT_SETTINGS and k != "chat_template"}
        loader_kwargs.pop("_from_auto", None)
        loader_kwargs.pop("_from_pipeline", None)
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **loader_kwargs)
        loader_kwargs.pop("trust_remote_code", None)
        image_processor = image_processor_class.from_pretrained(pretrained_model_name_or_path, **loader_kwargs)
        settings = {k: v for k, v in instance_kwargs.items() if k in TOKEN_COUNT_SETTINGS or k == "chat_template"}
        return cls.from_args_and_dict([image_processor, tokenizer], processor_dict, **settings)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, layout: str = "nested", **kwargs):
        """Save tokenizer, chat template and ``processor_config.json`` (+ ``preprocessor_config.json``).

        :param save_directory: the folder to write.
        :param push_to_hub: also upload it (transformers' behaviour).
        :param layout: ``"nested"`` (transformers >= 5: the image processor inside ``processor_config.json``)
            or ``"separate"`` (llava-hf's hub layout: the image processor in ``preprocessor_config.json``, only
            the processor's settings in ``processor_config.json``). Both load in transformers' own
            ``LlavaNextProcessor``.
        :return: the files written.
        :raises ValueError: an unknown *layout*.
        """
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
        files = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        if layout == "separate":
            processor_file = os.path.join(save_directory, PROCESSOR_NAME)
            with open(processor_file, encoding="utf-8") as f:
                processor_dict = json.load(f)
            image_processor_dict = processor_dict.pop("image_processor", None)
            if image_processor_dict is not None:
                image_processor_dict.setdefault("processor_class", type(self).__name__)
                with open(os.path.join(save_directory, IMAGE_PROCESSOR_NAME), "w", encoding="utf-8") as f:
                    f.write(json.dumps(image_processor_dict, indent=2, sort_keys=True) + "\n")
                files = list(files) + [os.path.join(save_directory, IMAGE_PROCESSOR_NAME)]
            with open(processor_file, "w", encoding="utf-8") as f:
                f.write(json.dumps(processor_dict, indent=2, sort_keys=True) + "\n")
        return files
