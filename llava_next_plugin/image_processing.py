"""LlavaNextImageProcessor: anyres preprocessing with PIL and numpy.

One image of ``height x width`` pixels becomes ``1 + grid_rows * grid_cols`` views of
``crop_size`` pixels each:

1. the *base* view: the whole image resized (aspect ratio not kept) to ``size``;
2. the *tiles*: the image resized, aspect kept, to fit the best resolution among
   ``image_grid_pinpoints`` (:func:`geometry.select_best_resolution`, :func:`geometry.resize_within`),
   centred on a black canvas of that resolution (:func:`geometry.pad_offsets`) and cut into
   square ``crop_size`` tiles, row by row.

Where a pinpoint is not a whole number of tiles, the last row and column of tiles are partial
(:func:`geometry.view_grid_shape`); each view is then resized to ``size`` (shortest edge, aspect
kept) and centre-cropped to ``crop_size`` on its own, as transformers does.

Every view is then rescaled and normalized (``(x * rescale_factor - mean) / std``, fused into one
multiply-add). A batch gives ``pixel_values`` ``[batch, max_views, 3, H, W]``, where images with fewer
views are zero-padded, and ``image_sizes`` ``[batch, 2]`` as ``(height, width)``.

The geometry comes from :mod:`llava_next_plugin.geometry` only, so the number of views here always
agrees with the number of image tokens the processor inserts and the features the model unpads.

This module also holds what both of our processors share (settings, input checks, colour
conversion); :mod:`llava_next_plugin.image_processing_fast` is the torch implementation.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from llava_next_sdk import images as sdk_images
from llava_next_sdk.errors import InvalidImageError
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from . import geometry
from .errors import ImageError, InputError, as_model_error

try:  # the typed kwargs transformers reads in from_dict / preprocess validation
    from transformers.processing_utils import ImagesKwargs
except ImportError:  # pragma: no cover - older transformers
    from typing import TypedDict as ImagesKwargs  # type: ignore[assignment]

__all__ = [
    "LlavaNextImageProcessor",
    "LlavaNextImageProcessorPil",
    "LlavaNextImageProcessorKwargs",
    "PreprocessSettings",
    "to_rgb_array",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LLAVA_V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
PIL_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_INTERPOLATION_CODES = {  # torchvision's InterpolationMode values
    "nearest": 0,
    "nearest-exact": 0,
    "lanczos": 1,
    "bilinear": 2,
    "bicubic": 3,
    "box": 4,
    "hamming": 5,
}


def resample_code(resample: Any) -> int:
    """A resampling filter as PIL's code (0-5): PIL's codes and ``Image.Resampling``, or torchvision's
    ``InterpolationMode`` (read by its value, ``"bicubic"``...: torchvision is not needed); else
    :class:`InputError`."""
    name = getattr(resample, "value", resample)
    if isinstance(name, str) and name.lower() in _INTERPOLATION_CODES:
        return _INTERPOLATION_CODES[name.lower()]
    try:
        if isinstance(name, bool):
            raise TypeError
        return int(name)
    except (TypeError, ValueError):
        raise InputError(
            f"resample={resample!r} is not a resampling filter: give PIL's code (0-5, e.g. 3 for bicubic) or a "
            "torchvision InterpolationMode",
            param="resample",
        ) from None


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
"""The default of ``preprocess``'s ``return_tensors``, ``input_data_format`` and ``data_format``: left out by the
call, so the processor's own value applies (``None`` is a value: lists, or inferred layouts)."""

NO_EFFECT_KWARGS = frozenset({"default_to_square", "pad_size", "image_seq_length", "disable_grouping", "device"})
"""transformers' common image-processor keywords that change nothing in LLaVA-NeXT's preprocessing (its
processors take them and give the same pixels): taken and ignored here too. (The torch processor reads
``device`` itself before.)"""
# Keys that describe where a config came from, not how to preprocess.
SERVICE_KEYS = ("image_processor_type", "processor_class", "feature_extractor_type", "_processor_class", "auto_map")


class LlavaNextImageProcessorKwargs(ImagesKwargs, total=False):
    """The image-processor keyword arguments, plus anyres' ``image_grid_pinpoints``."""

    image_grid_pinpoints: list[list[int]]


# --------------------------------------------------------------------------------------------------
# Settings


class SizeDict(dict):
    """``size`` / ``crop_size``: a dict (``size["shortest_edge"]``, saved as one) whose keys also read as attributes
    (``size.shortest_edge``, as transformers' ``SizeDict`` reads), a size it does not set reading ``None``."""

    FIELDS = frozenset({"height", "width", "shortest_edge", "longest_edge", "max_height", "max_width"})

    def __getattr__(self, name: str) -> int | None:
        if name in self:
            return self[name]
        if name in SizeDict.FIELDS:
            return None
        raise AttributeError(f"a size has no {name!r}; it has {sorted(self)}")


def _size_dict(value: Any, name: str, int_means: str) -> SizeDict:
    """``size`` / ``crop_size`` in the forms transformers accepts, as a :class:`SizeDict`."""
    if isinstance(value, int):
        return SizeDict({int_means: value} if int_means == "shortest_edge" else {"height": value, "width": value})
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return SizeDict(height=int(value[0]), width=int(value[1]))
    if isinstance(value, dict) or hasattr(value, "keys"):
        given = {k: value[k] for k in value.keys() if value[k] is not None}
        if set(given) == {"shortest_edge"} or set(given) == {"height", "width"}:
            return SizeDict({k: int(v) for k, v in given.items()})
    raise InputError(
        f"{name}={value!r} is not supported: give {{'shortest_edge': n}} or {{'height': h, 'width': w}}"
        if name == "size"
        else f"{name}={value!r} is not supported: give {{'height': h, 'width': w}} or an int",
        param=name,
    )


def _flag(value: Any) -> bool | None:
    """A ``do_*`` setting: ``None`` stays ``None`` (unset, falsy when preprocessing), as in transformers."""
    return None if value is None else bool(value)


def _channel_triple(value: Any, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) == 1:  # one value for every channel, as transformers broadcasts it
        return (values[0], values[0], values[0])
    if len(values) != 3:
        raise InputError(f"{name} needs one value per RGB channel (3), got {list(values)}", param=name)
    return values[0], values[1], values[2]


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything one preprocessing call needs, resolved and checked once.

    ``tile_size``: side of the square grid tiles cut from the best resolution. ``base_size``:
    ``(height, width)`` the whole image is squashed to. ``view_resize``: where the per-view resize
    sends each tile (``None`` when it would not change it). ``center_crop``: the final crop, or
    ``None``. ``scale``/``offset``: the fused rescale+normalize, ``x * scale + offset`` per channel.
    """

    pinpoints: tuple[tuple[int, int], ...]
    tile_size: int
    base_size: tuple[int, int]
    view_resize: tuple[int, int] | None
    center_crop: tuple[int, int] | None
    resample: int
    do_convert_rgb: bool
    do_pad: bool
    scale: tuple[float, float, float]
    offset: tuple[float, float, float]
    do_resize: bool = True
    shortest_edge: int | None = None  # size={"shortest_edge": n}: views resized with their aspect kept
    crop: tuple[int, int] | None = None  # crop_size when do_center_crop, even where center_crop is skipped
    rescale: float = 1.0  # rescale_factor when do_rescale, else 1 (already in scale)
    identity: bool = False  # neither do_rescale nor do_normalize: pixels stay as they are (uint8 for 8-bit images)

    @property
    def view_size(self) -> tuple[int, int]:
        """``(H, W)`` of every output view."""
        if self.center_crop:
            return self.center_crop
        return self.base_size

    def best_resolution(self, height: int, width: int) -> tuple[int, int]:
        return geometry.select_best_resolution(height, width, self.pinpoints)

    def num_views(self, height: int, width: int) -> int:
        """The base view plus the grid tiles of one image (partial ones included)."""
        rows, cols = geometry.view_grid_shape(*self.best_resolution(height, width), self.tile_size)
        return 1 + rows * cols

    def partial_tiles(self, best_h: int, best_w: int) -> bool:
        """Whether the best resolution is not a whole grid of tiles (edge tiles are then partial)."""
        return bool(best_h % self.tile_size or best_w % self.tile_size)

    def partial_view_size(self, height: int, width: int) -> tuple[int, int]:
        """Where the per-view resize sends a ``height x width`` (partial) tile: ``size`` as transformers reads it."""
        if not self.do_resize:
            return height, width
        if self.shortest_edge is not None:
            return geometry.shortest_edge_size(height, width, self.shortest_edge)
        return self.base_size


class LlavaNextImageProcessorBase(BaseImageProcessor):
    """Settings, (de)serialization and input checks shared by our two LLaVA-NeXT image processors.

    Saved files name ``"image_processor_type": "LlavaNextImageProcessor"`` so that plain transformers
    loads them with its own class. The defaults are llava-v1.6's (336 px tiles, its five pinpoints);
    transformers' class defaults to 224 px, which cuts its own default pinpoints into partial tiles.
    Every setting is written out on save, so saved files mean the same in both.
    """

    model_input_names = ["pixel_values", "image_sizes"]
    valid_kwargs = LlavaNextImageProcessorKwargs
    # Class-level defaults, as transformers' classes have them: code that reads a default from the class
    # finds it, while an instance keeps an explicit None (unset) through to_dict and save/load.
    do_resize: bool | None = True
    do_center_crop: bool | None = True
    do_rescale: bool | None = True
    do_normalize: bool | None = True
    do_pad: bool | None = True
    do_convert_rgb: bool | None = True
    SETTING_NAMES = (
        "do_resize",
        "size",
        "image_grid_pinpoints",
        "resample",
        "do_center_crop",
        "crop_size",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
        "do_pad",
        "do_convert_rgb",
    )

    def __init__(
        self,
        do_resize: bool = True,
        size: dict[str, int] | int | None = None,
        image_grid_pinpoints: list[list[int]] | None = None,
        resample: int = 3,
        do_center_crop: bool = True,
        crop_size: dict[str, int] | int | None = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        do_pad: bool = True,
        do_convert_rgb: bool = True,
        **kwargs: Any,
    ) -> None:
        for key in SERVICE_KEYS:
            kwargs.pop(key, None)
        # Unknown keys found in hub configs are kept (and saved back), as transformers does.
        super().__init__(**kwargs)
        self.do_resize = _flag(do_resize)
        self.size = _size_dict(size if size is not None else {"shortest_edge": 336}, "size", "shortest_edge")
        self.image_grid_pinpoints = [list(map(int, p)) for p in (image_grid_pinpoints or LLAVA_V16_PINPOINTS)]
        self.resample = resample_code(resample)
        self.do_center_crop = _flag(do_center_crop)
        self.crop_size = _size_dict(
            crop_size if crop_size is not None else {"height": 336, "width": 336}, "crop_size", "height"
        )
        self.do_rescale = _flag(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = _flag(do_normalize)
        self.image_mean = list(_channel_triple(image_mean if image_mean is not None else CLIP_MEAN, "image_mean"))
        self.image_std = list(_channel_triple(image_std if image_std is not None else CLIP_STD, "image_std"))
        self.do_pad = _flag(do_pad)
        self.do_convert_rgb = _flag(do_convert_rgb)

    # -- settings -----------------------------------------------------------------------------------

    def settings(self, **overrides: Any) -> PreprocessSettings:
        """Resolve this processor's settings with per-call ``overrides`` and check they make sense."""
        # A do_* flag given as None is off, as transformers reads it (its steps run `if do_x:`); None for a value
        # (size, image_mean...) means "the processor's own" (transformers refuses most of those).
        overrides = {k: v for k, v in overrides.items() if k not in NO_EFFECT_KWARGS}
        overrides = {k: (False if v is None and k.startswith("do_") else v) for k, v in overrides.items()}
        unknown = {k for k, v in overrides.items() if v is not None} - set(self.SETTING_NAMES)
        if unknown:
            raise InputError(
                f"unknown image processor argument(s) {sorted(unknown)}; valid ones are {list(self.SETTING_NAMES)}"
            )
        value = {name: overrides.get(name, getattr(self, name)) for name in self.SETTING_NAMES}
        value = {k: (getattr(self, k) if v is None else v) for k, v in value.items()}
        size = _size_dict(value["size"], "size", "shortest_edge")
        crop = _size_dict(value["crop_size"], "crop_size", "height") if value["crop_size"] else None
        base_size = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
        tile = crop["height"] if crop else base_size[0]
        if tile < 1 or min(base_size) < 1:
            raise InputError(f"size {size} and crop_size {crop} must be positive", param="size")
        if crop and crop["height"] != crop["width"]:
            raise InputError(
                f"crop_size {crop} is not square: the vision tower takes square tiles (height == width)",
                param="crop_size",
            )
        try:
            pinpoints = tuple((int(p[0]), int(p[1])) for p in value["image_grid_pinpoints"] if len(p) == 2)
            whole = len(pinpoints) == len(value["image_grid_pinpoints"])
        except (TypeError, ValueError):
            whole = False
        if not whole:
            raise InputError(
                f"image_grid_pinpoints must be a list of [height, width] pairs of pixels, got "
                f"{value['image_grid_pinpoints']!r}",
                param="image_grid_pinpoints",
            )
        if not pinpoints:
            raise InputError(
                "image_grid_pinpoints is empty: give at least one [height, width]", param="image_grid_pinpoints"
            )
        for h, w in pinpoints:
            if h < tile or w < tile:
                raise InputError(
                    f"image_grid_pinpoints entry {[h, w]} is smaller than one {tile}px tile: each resolution must "
                    f"hold at least one tile on each side",
                    param="image_grid_pinpoints",
                )
        partial = any(h % tile or w % tile for h, w in pinpoints)
        resized_to_size = value["do_resize"] and "height" in size  # every view, partial or not, becomes size
        if partial and not (value["do_center_crop"] and crop) and not resized_to_size:
            raise InputError(
                f"image_grid_pinpoints {[list(p) for p in pinpoints]} are not whole grids of {tile}px tiles, so "
                f"edge tiles are partial, and only do_center_crop with a crop_size, or do_resize to a size of "
                f"height and width, brings every view to one size: enable one, or use pinpoints that are multiples "
                f"of the tile size",
                param="image_grid_pinpoints",
            )
        view_resize = base_size if value["do_resize"] and base_size != (tile, tile) else None
        center_crop = (crop["height"], crop["width"]) if value["do_center_crop"] and crop else None
        tile_out = view_resize or (tile, tile)
        if center_crop == base_size and center_crop == tile_out:
            center_crop = None
        if center_crop is None and tile_out != base_size:
            raise InputError(
                f"with these settings the base view is {base_size} but the tiles are {tile_out}: enable "
                "do_resize or do_center_crop, or make size and crop_size agree",
                param="size",
            )
        value["resample"] = resample_code(value["resample"])
        if value["resample"] not in PIL_RESAMPLE_NAMES:
            raise InputError(f"resample={value['resample']!r} is not a PIL resampling filter (0-5)", param="resample")
        mean = _channel_triple(value["image_mean"], "image_mean")
        std = _channel_triple(value["image_std"], "image_std")
        if value["do_normalize"] and min(abs(s) for s in std) == 0:
            raise InputError(f"image_std {list(std)} holds a zero", param="image_std")
        rescale = float(value["rescale_factor"]) if value["do_rescale"] else 1.0
        if value["do_normalize"]:
            scale = tuple(rescale / s for s in std)
            offset = tuple(-m / s for m, s in zip(mean, std, strict=True))
        else:
            scale, offset = (rescale,) * 3, (0.0,) * 3
        return PreprocessSettings(
            pinpoints=pinpoints,
            tile_size=tile,
            base_size=base_size,
            view_resize=view_resize,
            center_crop=center_crop,
            resample=int(value["resample"]),
            do_convert_rgb=bool(value["do_convert_rgb"]),
            do_pad=bool(value["do_pad"]),
            scale=scale,  # type: ignore[arg-type]
            offset=offset,  # type: ignore[arg-type]
            do_resize=bool(value["do_resize"]),
            shortest_edge=size.get("shortest_edge"),
            crop=(crop["height"], crop["width"]) if value["do_center_crop"] and crop else None,
            rescale=rescale,
            identity=not value["do_rescale"] and not value["do_normalize"],
        )

    # -- (de)serialization --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if not k.startswith("_")}
        out["image_processor_type"] = "LlavaNextImageProcessor"
        return out

    # -- inputs -------------------------------------------------------------------------------------

    @staticmethod
    def flatten_images(images: Any) -> list[Any]:
        """A flat list of single images from one image, a (nested) list, or a 4-D batch; paths, URLs and
        encoded bytes read (through the image-source hook, as the processor reads them)."""
        return load_image_sources(LlavaNextImageProcessorBase._flatten(images))

    @staticmethod
    def _flatten(images: Any) -> list[Any]:
        if isinstance(images, (list, tuple)):
            flat: list[Any] = []
            for item in images:
                flat.extend(
                    LlavaNextImageProcessorBase._flatten(item)
                    if isinstance(item, (list, tuple))
                    else _split_batch(item)
                )
            return flat
        return _split_batch(images)

    def call_defaults(self, return_tensors: Any, input_data_format: Any, data_format: Any) -> tuple[Any, Any, Any]:
        """The call's ``return_tensors``, ``input_data_format`` and ``data_format``; each one the call leaves out
        (:data:`UNSET`) is the value set on the processor (by its config file or constructor), as transformers'
        processors do (an explicit ``None`` stays: ``return_tensors=None`` asks for lists)."""
        given = {"return_tensors": return_tensors, "input_data_format": input_data_format, "data_format": data_format}
        values = [getattr(self, name, None) if value is UNSET else value for name, value in given.items()]
        return values[0], values[1], values[2]

    def __call__(self, images: Any, *args: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, *args, **kwargs)


ENCODED_SOURCES = (str, os.PathLike, bytes, bytearray, memoryview)
"""Image sources that are not pixels yet: a path or URL, or an encoded file's bytes."""


def load_image_sources(images: list) -> list:
    """Paths, URLs and encoded bytes read through the image-source hook (:func:`.images.load_image`, errors
    naming the image's index); pixels already in memory as they are. As transformers' processors read such
    sources (its ``load_image``: ``convert("RGB")``), a transparent image's alpha is dropped, where a PIL image
    given as such is composited onto white (transformers does both; the server and SDK composite every image)."""
    if not any(isinstance(image, ENCODED_SOURCES) for image in images):
        return images
    from .images import load_image

    return [
        load_image(image, i, transparency="drop") if isinstance(image, ENCODED_SOURCES) else image
        for i, image in enumerate(images)
    ]


def _split_batch(image: Any) -> list[Any]:
    """One image, or the images of a 4-D array/tensor batch."""
    if getattr(image, "ndim", 0) == 4:
        return list(image)
    return [image]


# --------------------------------------------------------------------------------------------------
# Input checks and colour conversion (shared with the fast processor)


def _pixel_limit() -> int | None:
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


def check_image_size(height: int, width: int, index: int) -> None:
    """Zero-size images and images past PIL's decompression-bomb limit are refused."""
    if height < 1 or width < 1:
        raise ImageError(
            f"the image is empty ({height}x{width} pixels): every image needs at least 1x1 pixels",
            index=index,
        )
    limit = _pixel_limit()
    if limit is not None and height * width > limit:
        raise ImageError(
            f"the image has {height * width} pixels ({height}x{width}), over the limit of {limit} "
            "(PIL.Image.MAX_IMAGE_PIXELS x 2, its decompression-bomb guard): downscale it first",
            index=index,
        )


def pil_to_rgb(image: Image.Image, index: int) -> np.ndarray:
    """A PIL image of any mode as ``[H, W, 3]`` uint8 RGB; transparency is composited on white."""
    return np.asarray(pil_to_rgb_image(image, index))


def pil_to_rgb_image(image: Image.Image, index: int) -> Image.Image:
    """A PIL image of any mode as an RGB PIL image (RGB images themselves, uncopied); alpha over white.

    The size limits of :func:`check_image_size`, then the one RGB conversion,
    :func:`llava_next_sdk.images.to_rgb` (no EXIF rotation here: transformers' processors apply none).
    """
    check_image_size(image.height, image.width, index)
    try:
        rgb: Image.Image = sdk_images.to_rgb(image, f"the {image.mode!r} image", index=index, bomb_factor=2)
    except InvalidImageError as exc:
        raise as_model_error(exc) from exc
    return rgb


def _channels_last(array: np.ndarray, layout: str | None, default: str) -> np.ndarray:
    """``[H, W]``, ``[H, W, C]`` or ``[C, H, W]`` -> ``[H, W, C]`` (C in 1..4)."""
    if array.ndim == 2:
        return array[..., None]
    layout = _layout(array.shape, layout, default)
    return np.moveaxis(array, 0, -1) if layout == "channels_first" else array


def _layout(shape: Sequence[int], layout: Any, default: str) -> str:
    """``"channels_first"`` or ``"channels_last"`` for a 3-D image: as given, else inferred."""
    if layout is not None:
        layout = getattr(layout, "value", layout)
        if layout not in ("channels_first", "channels_last"):
            raise InputError(
                f"input_data_format={layout!r}: use 'channels_first' or 'channels_last'", param="input_data_format"
            )
        return layout
    # transformers' rule (channel counts 1, 3, 4; the first axis wins), then ours for grey+alpha (2)
    if shape[0] in (1, 3, 4):
        if shape[-1] in (1, 2, 3, 4):  # e.g. [3, H, 3]: either could be the channels
            warnings.warn(
                f"an image of shape {tuple(shape)} could be channels-first or channels-last: read as channels-first "
                "(as transformers does); pass input_data_format='channels_last' if its channels come last",
                UserWarning,
                stacklevel=4,
            )
        return "channels_first"
    if shape[-1] in (1, 2, 3, 4):
        return "channels_last"
    return "channels_first" if shape[0] == 2 else default


def to_rgb_array(image: Any, index: int, input_data_format: Any = None, convert_rgb: bool = True) -> np.ndarray:
    """Any single image (PIL, numpy ``[H, W(, C)]``, CPU torch ``[C, H, W]``) as ``[H, W, 3]`` uint8.

    The channel axis is the one of length 1 to 4 (channels-first where both ends could be, with a warning,
    as transformers reads them); ``input_data_format`` says it outright. One channel is grey, two are
    grey+alpha, four are RGBA; alpha is composited on white.
    """
    if isinstance(image, Image.Image):
        return pil_to_rgb(image, index) if convert_rgb else _keep_rgb(np.asarray(image), index)
    default = "channels_last"
    if type(image).__module__.startswith("torch"):
        image = image.detach().cpu()
        if str(image.dtype) == "torch.bfloat16":  # numpy has no bfloat16: as float32 (then read as floats are)
            image = image.float()
        image, default = image.numpy(), "channels_first"
    if not isinstance(image, np.ndarray):
        raise ImageError(
            f"unsupported image type {type(image).__name__}: pass a PIL image, a numpy uint8 array [H, W, C] "
            "or a torch uint8 tensor [C, H, W]",
            index=index,
        )
    if image.ndim not in (2, 3):
        raise ImageError(f"an image array needs 2 or 3 dimensions, got shape {tuple(image.shape)}", index=index)
    pixels = _channels_last(image, input_data_format, default)
    check_image_size(pixels.shape[0], pixels.shape[1], index)
    if pixels.dtype == np.bool_:
        pixels = pixels.astype(np.uint8) * 255
    elif pixels.dtype == np.uint16 and pixels.size and pixels.max() <= 255:
        pixels = pixels.astype(np.uint8)  # 8-bit values held in 16 bits: as they are, as transformers reads them
    elif pixels.dtype == np.uint16:  # 16-bit images: scaled to 8 bits, as PIL's I;16 images are
        pixels = sdk_images.gray_to_uint8(pixels, "I;16", index=index)
    elif pixels.dtype.kind in "iu" and pixels.size and pixels.min() >= 0 and pixels.max() <= 255:
        pixels = pixels.astype(np.uint8)  # int64 etc. holding 8-bit values
    elif pixels.dtype.kind == "f" and pixels.size and np.isfinite(pixels).all():
        if pixels.min() >= 0 and pixels.max() <= 255 and (pixels == np.floor(pixels)).all():
            pixels = pixels.astype(np.uint8)  # whole pixel numbers held as floats
        elif unit_interval(pixels):  # pixel / 255 (torchvision's to_tensor): 8 bits again, as transformers' PIL does
            pixels = (pixels.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)
    if pixels.dtype != np.uint8:
        raise ImageError(
            f"arrays must hold pixel numbers (uint8, uint16, bool, integers or whole floats within 0..255) or "
            f"floats within [0, 1] for this processor, got {pixels.dtype} within [{pixels.min()}, {pixels.max()}]: "
            "convert them to one of those, or use LlavaNextImageProcessorFast",
            index=index,
        )
    channels = pixels.shape[-1]
    if channels == 3:
        return pixels
    if not convert_rgb:  # as for a PIL image: no conversion asked for, none made
        return _keep_rgb(pixels, index)
    if channels in (1, 2, 4):  # grey, grey + alpha, RGBA: as PIL images L, LA, RGBA, by the one RGB conversion
        return pil_to_rgb(Image.fromarray(pixels[..., 0] if channels == 1 else pixels), index)
    raise ImageError(f"an image needs 1, 2, 3 or 4 channels, got {channels} (shape {tuple(image.shape)})", index=index)


def unit_interval(image: Any) -> bool:
    """Whether *image* is a float array or tensor of values within [0, 1], not all whole numbers: pixel values
    divided by 255 (torchvision's ``to_tensor``). The PIL processor reads them as transformers' PIL backend does:
    brought back to 8 bits (``x * 255``, truncated) for PIL, and divided by 255 again after."""
    if type(image).__module__.startswith("torch"):
        if not image.is_floating_point() or not image.numel():
            return False
        image = image.detach().cpu().float().numpy()
    if not isinstance(image, np.ndarray) or image.dtype.kind != "f" or not image.size:
        return False
    return bool(np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1 and (image != np.floor(image)).any())


def _keep_rgb(pixels: np.ndarray, index: int) -> np.ndarray:
    """``do_convert_rgb=False``: the image must already be 3-channel."""
    if pixels.ndim == 3 and pixels.shape[-1] == 3 and pixels.dtype == np.uint8:
        check_image_size(pixels.shape[0], pixels.shape[1], index)
        return pixels
    raise ImageError(
        f"with do_convert_rgb=False the image must already be 8-bit RGB, got shape {pixels.shape} "
        f"{pixels.dtype}: pass do_convert_rgb=True",
        index=index,
    )


# --------------------------------------------------------------------------------------------------
# The PIL + numpy processor


def _center_crop_hwc(views: np.ndarray, crop: tuple[int, int] | None) -> np.ndarray:
    """``[N, H, W, C]`` centre-cropped (zero-padded where smaller) to ``crop``; as they are when None
    (``do_center_crop=False``)."""
    if crop is None:
        return views
    height, width = views.shape[1:3]
    crop_h, crop_w = crop
    if crop_h > height or crop_w > width:
        out = np.zeros((views.shape[0], max(crop_h, height), max(crop_w, width), views.shape[3]), views.dtype)
        top, left = -(-(out.shape[1] - height) // 2), -(-(out.shape[2] - width) // 2)
        out[:, top : top + height, left : left + width] = views
        views, height, width = out, out.shape[1], out.shape[2]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return views[:, top : top + crop_h, left : left + crop_w]


class LlavaNextImageProcessor(LlavaNextImageProcessorBase):
    """LLaVA-NeXT anyres image processor on PIL and numpy (CPU, no torch needed for the pixels).

    Accepts PIL images, numpy uint8 arrays ``[H, W]`` / ``[H, W, C]`` (or ``[C, H, W]``), CPU torch uint8
    tensors ``[C, H, W]``, lists of them and 4-D batches. Returns a ``BatchFeature`` with
    ``pixel_values`` ``[batch, max_views, 3, H, W]`` float32 (views: the base image then the grid
    tiles row by row; missing views are zeros; uint8 with neither ``do_rescale`` nor ``do_normalize``, as
    transformers gives them) and ``image_sizes`` ``[batch, 2]`` int64 ``(height, width)``.
    With ``do_pad=False``, ``pixel_values`` is a list of ``[views_i, 3, H, W]`` arrays (one array when every
    image has as many views, as transformers stacks them). With
    ``return_tensors=None`` (the default), as transformers: a list of one array per image and a list of
    ``(height, width)`` tuples.

    Matches transformers' ``LlavaNextImageProcessorPil`` (same PIL resampling, same arithmetic) except: 16-bit
    and 32-bit PIL images (modes I;16, I, F) and uint16 arrays beyond 255 are scaled to 8 bits, not clipped;
    float arrays and tensors hold whole pixel numbers or values within [0, 1] (:func:`unit_interval`), others are
    refused with advice;
    the defaults without a config are llava-v1.6's (336 px tiles and its pinpoints, where transformers' are
    224 px).
    """

    def preprocess(
        self,
        images: Any,
        return_tensors: Any = UNSET,
        input_data_format: Any = UNSET,
        data_format: Any = UNSET,
        **overrides: Any,
    ) -> BatchFeature:
        return_tensors, input_data_format, data_format = self.call_defaults(
            return_tensors, input_data_format, data_format
        )
        if data_format not in (None, "channels_first") and getattr(data_format, "value", None) != "channels_first":
            raise InputError("pixel_values are always channels_first [3, H, W]", param="data_format")
        settings = self.settings(**overrides)
        flat = self.flatten_images(images)
        if not flat:
            raise ImageError("no images were given: pass at least one image")
        rgb = [_to_rgb_image(img, i, input_data_format, settings.do_convert_rgb) for i, img in enumerate(flat)]
        sizes = np.array([(image.height, image.width) for image in rgb], dtype=np.int64).reshape(len(rgb), 2)
        counts = [settings.num_views(int(h), int(w)) for h, w in sizes]
        view_h, view_w = settings.view_size
        unit = [unit_interval(image) for image in flat]  # read as 8 bits, so their 1/255 joins the scale
        # neither rescaled nor normalized, 8-bit images stay 8-bit (as transformers' do)
        whole = settings.identity and not any(unit)
        dtype = np.uint8 if whole else np.float32
        # stacked when padded, or when every image has as many views (as transformers stacks them)
        stacked = settings.do_pad or len(set(counts)) == 1
        if stacked:
            pixel_values: Any = np.zeros((len(rgb), max(counts), 3, view_h, view_w), dtype=dtype)
        else:
            pixel_values = [np.empty((n, 3, view_h, view_w), dtype=dtype) for n in counts]
        scale = np.array(settings.scale, dtype=np.float32)[:, None, None]
        offset = np.array(settings.offset, dtype=np.float32)[:, None, None]
        if settings.rescale != 1.0 and any(unit):
            warnings.warn(
                f"image {unit.index(True)} holds floats within [0, 1] and do_rescale is on: they are rescaled "
                f"again (by {settings.rescale:g}); pass do_rescale=False for images already rescaled",
                UserWarning,
                stacklevel=2,
            )
        for i, image in enumerate(rgb):
            views = self.views(image, settings).transpose(0, 3, 1, 2)  # [n, 3, H, W] uint8, a view
            out = pixel_values[i, : counts[i]] if stacked else pixel_values[i]
            if whole:
                out[...] = views
                continue
            # numpy multiplies planar memory much faster than it reads the interleaved views
            image_scale = scale / np.float32(255) if unit[i] else scale
            np.multiply(np.ascontiguousarray(views), image_scale, out=out, dtype=np.float32)
            out += offset
        if getattr(return_tensors, "value", return_tensors) is None:  # transformers' shape of "no tensors"
            return BatchFeature(data=per_image(pixel_values, sizes))
        return BatchFeature(
            data={
                "pixel_values": _as_tensors(pixel_values, return_tensors),
                "image_sizes": _as_tensors(sizes, return_tensors),
            }
        )

    @staticmethod
    def views(image: Image.Image, settings: PreprocessSettings) -> np.ndarray:
        """An RGB PIL image -> ``[1 + rows*cols, h, w, 3]`` uint8: the base view, then the tiles."""
        height, width = image.height, image.width
        best_h, best_w = settings.best_resolution(height, width)
        new_h, new_w = geometry.resize_within(height, width, best_h, best_w)
        top, left = geometry.pad_offsets(new_h, new_w, best_h, best_w)
        rows, cols = geometry.view_grid_shape(best_h, best_w, settings.tile_size)
        tile = settings.tile_size

        # PIL resizes on one core without the GIL: on more cores, the base view's runs beside the grid's.
        base_job = resize_worker().submit(_pil_resize, image, settings.base_size, settings.resample)
        canvas = np.zeros((best_h, best_w, 3), dtype=np.uint8)
        canvas[top : top + new_h, left : left + new_w] = _pil_resize(image, (new_h, new_w), settings.resample)
        if settings.partial_tiles(best_h, best_w):
            views = [_center_crop_hwc(base_job.result()[None], settings.crop)[0]]
            for row in range(rows):
                for col in range(cols):
                    piece = canvas[row * tile : (row + 1) * tile, col * tile : (col + 1) * tile]
                    target = settings.partial_view_size(*piece.shape[:2])
                    piece = _pil_resize(Image.fromarray(piece), target, settings.resample)
                    views.append(_center_crop_hwc(piece[None], settings.crop)[0])
            return np.stack(views)
        tiles = canvas.reshape(rows, tile, cols, tile, 3).swapaxes(1, 2).reshape(rows * cols, tile, tile, 3)
        if settings.view_resize:
            tiles = np.stack([_pil_resize(Image.fromarray(t), settings.view_resize, settings.resample) for t in tiles])
        base = base_job.result()[None]
        if settings.center_crop:
            base = _center_crop_hwc(base, settings.center_crop)
            tiles = _center_crop_hwc(tiles, settings.center_crop)
        return np.concatenate([base, tiles])


def resize_worker() -> ThreadPoolExecutor:
    """The background thread (one per process, made on first use) that runs a resize beside another.

    On a single core it would only add overhead, so there its jobs run in the caller's thread. A forked
    child (a DataLoader worker, say) inherits the parent's executor but not its thread, and a job given
    to it would never run: each process therefore gets its own.
    """
    return _resize_worker_of(os.getpid())


@cache
def _resize_worker_of(pid: int) -> ThreadPoolExecutor:
    if (os.cpu_count() or 1) > 1:
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="llava-next-resize")
    return _InlineExecutor()  # type: ignore[return-value]


class _InlineExecutor:
    """``submit`` runs the job at once, in the calling thread."""

    def submit(self, job: Any, *args: Any) -> Future:
        done: Future = Future()
        done.set_result(job(*args))
        return done


def _to_rgb_image(image: Any, index: int, input_data_format: Any, convert_rgb: bool) -> Image.Image:
    """Any single image as an RGB PIL image: RGB PIL images as they are, others via :func:`to_rgb_array`."""
    if isinstance(image, Image.Image) and convert_rgb:
        return pil_to_rgb_image(image, index)
    return Image.fromarray(to_rgb_array(image, index, input_data_format, convert_rgb))


def _pil_resize(image: Image.Image, size: tuple[int, int], resample: int) -> np.ndarray:
    """PIL resize to ``(height, width)`` as ``[h, w, 3]`` uint8 (no copy-resize when already that size)."""
    if image.size == (size[1], size[0]):
        return np.asarray(image)
    return np.asarray(image.resize((size[1], size[0]), resample=resample))


def per_image(pixel_values: Any, sizes: Any) -> dict[str, list]:
    """``return_tensors=None``'s output, as transformers' image processors give it: ``pixel_values`` a list of
    one ``[views, 3, H, W]`` array or tensor per image, ``image_sizes`` a list of ``(height, width)`` tuples."""
    return {
        "pixel_values": list(pixel_values),
        "image_sizes": [(int(size[0]), int(size[1])) for size in sizes.tolist()],
    }


def _as_tensors(value: Any, return_tensors: str | None) -> Any:
    """numpy -> the requested framework (``"pt"``, ``"np"`` or ``None`` for numpy)."""
    kind = getattr(return_tensors, "value", return_tensors)
    if kind in (None, "np"):
        return value
    if kind == "pt":
        import torch

        return [torch.from_numpy(v) for v in value] if isinstance(value, list) else torch.from_numpy(value)
    raise InputError(f"return_tensors={return_tensors!r}: use 'pt', 'np' or None", param="return_tensors")


LlavaNextImageProcessorPil = LlavaNextImageProcessor
