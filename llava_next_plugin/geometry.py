"""Anyres geometry: the one place that knows how an image becomes image tokens.

LLaVA-NeXT ("anyres") feeds the vision tower several square tiles per image:

1. the whole image squashed to one tile (the *base* view), and
2. the image resized to the best resolution among ``image_grid_pinpoints``, padded to it
   and cut into a ``grid_rows x grid_cols`` grid of tiles.

Each tile becomes ``side x side`` vision patches (``side = tile_size // patch_size``; 24 for
CLIP-L/14 at 336 px; a tile that is not a whole number of patches loses the remainder, as the
vision tower's strided patch convolution does). The grid features are laid out as one big ``(grid_rows*side) x
(grid_cols*side)`` map; the rows or columns that only cover padding are cut away again
("unpadding"), and one ``image_newline`` vector is appended after every remaining row.

So, for one image of ``height x width`` pixels::

    tokens = base + rows * cols + rows       # rows, cols: the unpadded feature map
    base   = side * side + num_additional_image_tokens - (1 if strategy == "default" else 0)

Worked example (llava-v1.6-mistral, 1024 wide x 768 high): the best pinpoint is 672x672,
a 2x2 grid, a 48x48 map; the image is wider than tall, so 6 rows of padding are cut from
top and bottom, leaving 36 x 48: ``576 + 1728 + 36 = 2340`` tokens.

OpenAI's ``detail`` on an image: ``"high"`` and ``"auto"`` are the above; ``"low"`` keeps the base view
alone (``base`` tokens, 576 on llava-v1.6-mistral): :meth:`ImageGeometry.base_view` is that layout, an
empty grid, and :func:`low_detail_images` reads the per-image choice.

Everything here is plain integer arithmetic on sizes: the processor calls it to expand
``<image>`` and the model calls it to unpad, so the two can never disagree.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import InputError

__all__ = [
    "ImageGeometry",
    "select_best_resolution",
    "grid_shape",
    "view_grid_shape",
    "shortest_edge_size",
    "resize_within",
    "pad_offsets",
    "unpadded_crop",
    "base_token_count",
    "num_image_tokens",
    "image_geometry",
    "DETAILS",
    "low_detail_images",
]

VALID_STRATEGIES = ("default", "full")

DETAILS = ("low", "high", "auto")
"""OpenAI's ``detail`` values: ``"low"`` is the base view only, ``"high"`` and ``"auto"`` the full anyres."""


def _as_pairs(pinpoints: Iterable[Sequence[int]]) -> list[tuple[int, int]]:
    pairs = [(int(p[0]), int(p[1])) for p in pinpoints]
    if not pairs:
        raise ValueError("image_grid_pinpoints is empty: give at least one [height, width] resolution")
    for h, w in pairs:
        if h <= 0 or w <= 0:
            raise ValueError(f"image_grid_pinpoints holds a non-positive resolution {[h, w]}")
    return pairs


def _check_size(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"image size must be at least 1x1 pixels, got height={height}, width={width}")


def select_best_resolution(height: int, width: int, pinpoints: Iterable[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint ``(height, width)`` that keeps most of the image's pixels.

    Each candidate is scored by the pixels the image keeps when scaled (aspect ratio kept) to fit
    inside it, capped at the original pixel count (upscaling adds no information). The highest
    score wins; ties go to the candidate that wastes the least area.
    """
    _check_size(height, width)
    best, best_kept, best_waste = (0, 0), -1, 0  # replaced by the first candidate (there is at least one)
    for cand_h, cand_w in _as_pairs(pinpoints):
        scale = min(cand_w / width, cand_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = cand_w * cand_h - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (cand_h, cand_w), kept, waste
    return best


def grid_shape(height: int, width: int, pinpoints: Iterable[Sequence[int]], tile_size: int) -> tuple[int, int]:
    """``(grid_rows, grid_cols)``: how many ``tile_size`` tiles the best resolution is cut into."""
    best_h, best_w = select_best_resolution(height, width, pinpoints)
    return best_h // tile_size, best_w // tile_size


def view_grid_shape(best_height: int, best_width: int, tile_size: int) -> tuple[int, int]:
    """``(rows, cols)`` of the views the image processors cut from the padded best resolution.

    Whole tiles where the pinpoint is a multiple of the tile size (then this is :func:`grid_shape`);
    otherwise the last row / column holds the partial remainder, as transformers' processors cut it.
    The model reads only the :func:`grid_shape` whole tiles (:meth:`ImageGeometry.view_indices`).
    """
    return -(-best_height // tile_size), -(-best_width // tile_size)


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """``(height, width)`` of a ``height x width`` view resized so its shorter side is ``shortest_edge``,
    aspect kept (the longer side truncated), as transformers resizes to ``{"shortest_edge": n}``."""
    if width <= height:
        return int(shortest_edge * height / width), shortest_edge
    return shortest_edge, int(shortest_edge * width / height)


def resize_within(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """The ``(height, width)`` an image is resized to so that it fits in the target, aspect kept.

    The side that limits the scale is set to the target exactly; the other is rounded up (and
    capped by the target). The rest of the target is padding, split evenly around the image.
    """
    _check_size(height, width)
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


def pad_offsets(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """``(top, left)``: where a ``height x width`` image sits when centred in the target.

    The padding is split evenly; an odd pixel of padding goes below / to the right. This is the
    placement :func:`unpadded_crop` undoes on the feature map.
    """
    if height > target_height or width > target_width:
        raise ValueError(f"image {height}x{width} does not fit in {target_height}x{target_width}")
    return (target_height - height) // 2, (target_width - width) // 2


def unpadded_crop(height: int, width: int, map_rows: int, map_cols: int) -> tuple[int, int, int, int]:
    """Which part of a ``map_rows x map_cols`` feature map covers the image, not the padding.

    Returns ``(top, bottom, left, right)`` so that ``feature_map[top:bottom, left:right]`` is kept.
    The image was fitted into the map with its aspect ratio kept and centred, so padding lies
    either above and below (wide images) or left and right (tall images), equally on both sides.
    """
    _check_size(height, width)
    if width / height > map_cols / map_rows:
        kept_rows = int(round(height * (map_cols / width), 7))
        pad = (map_rows - kept_rows) // 2
        return pad, map_rows - pad, 0, map_cols
    kept_cols = int(round(width * (map_rows / height), 7))
    pad = (map_cols - kept_cols) // 2
    return 0, map_rows, pad, map_cols - pad


def base_token_count(
    tile_size: int, patch_size: int, strategy: str = "default", num_additional_image_tokens: int = 1
) -> int:
    """Tokens of one tile: ``side * side`` patches, plus extra positions (CLIP's CLS) kept by ``full``."""
    if strategy not in VALID_STRATEGIES:
        raise ValueError(f"vision_feature_select_strategy must be one of {VALID_STRATEGIES}, got {strategy!r}")
    side = tile_size // patch_size
    count = side * side + num_additional_image_tokens
    if strategy == "default":
        count -= 1
    return count


@dataclass(frozen=True)
class ImageGeometry:
    """How one ``height x width`` image is laid out in tokens.

    ``grid_rows x grid_cols`` tiles; a feature map of ``map_rows x map_cols`` patches of which
    ``[crop_top:crop_bottom, crop_left:crop_right]`` survives unpadding; ``base_tokens`` for the
    whole-image view.
    """

    height: int
    width: int
    best_resolution: tuple[int, int]
    grid_rows: int
    grid_cols: int
    side: int
    crop_top: int
    crop_bottom: int
    crop_left: int
    crop_right: int
    base_tokens: int

    @property
    def map_rows(self) -> int:
        return self.grid_rows * self.side

    @property
    def map_cols(self) -> int:
        return self.grid_cols * self.side

    @property
    def unpadded_rows(self) -> int:
        return self.crop_bottom - self.crop_top

    @property
    def unpadded_cols(self) -> int:
        return self.crop_right - self.crop_left

    @property
    def tile_tokens(self) -> int:
        """Feature vectors from the grid tiles after unpadding."""
        return self.unpadded_rows * self.unpadded_cols

    @property
    def newline_tokens(self) -> int:
        """One ``image_newline`` after each kept row of the feature map."""
        return self.unpadded_rows

    @property
    def num_tiles(self) -> int:
        """Tiles fed to the vision tower: the base view plus the grid."""
        return 1 + self.grid_rows * self.grid_cols

    @property
    def num_tokens(self) -> int:
        return self.base_tokens + self.tile_tokens + self.newline_tokens

    def view_indices(self, tile_size: int) -> range | list[int]:
        """Which of the processors' views of this image the model reads, in order: the base view (0), then the
        grid's whole tiles, row by row. The processors cut the best resolution on :func:`view_grid_shape`'s
        grid, so where its width is not a multiple of *tile_size* each row of views ends with a partial tile,
        which is skipped (a partial last row comes after every whole tile: the first :attr:`num_tiles` views)."""
        if self.grid_cols == 0:  # the base view alone (detail="low")
            return range(1)
        _, view_cols = view_grid_shape(self.best_resolution[0], self.best_resolution[1], tile_size)
        if view_cols == self.grid_cols:
            return range(self.num_tiles)
        return [0] + [1 + r * view_cols + c for r in range(self.grid_rows) for c in range(self.grid_cols)]

    def base_view(self) -> ImageGeometry:
        """This image at ``detail="low"``: the base view alone (one tile, ``base_tokens`` tokens, no grid,
        no newlines). ``best_resolution`` still says what the full view would use."""
        return dataclasses.replace(self, grid_rows=0, grid_cols=0, crop_top=0, crop_bottom=0, crop_left=0, crop_right=0)

    def describe(self) -> str:
        """``"<image> x2340 = base 576 + tiles 1728 + newlines 36"``."""
        return (
            f"<image> x{self.num_tokens} = base {self.base_tokens} + tiles {self.tile_tokens}"
            f" + newlines {self.newline_tokens}"
        )


def image_geometry(
    height: int,
    width: int,
    pinpoints: Iterable[Sequence[int]],
    tile_size: int,
    patch_size: int,
    strategy: str = "default",
    num_additional_image_tokens: int = 1,
    *,
    detail: str = "auto",
) -> ImageGeometry:
    """The :class:`ImageGeometry` of one image (sizes in pixels, ``height`` first).

    :param detail: ``"low"`` gives the :meth:`~ImageGeometry.base_view` layout; ``"high"``/``"auto"`` the full one.
    :raises ValueError: a size, pinpoint or strategy that cannot be used (an :class:`~.errors.InputError`
        for an unknown *detail*).
    """
    if detail not in DETAILS:
        raise InputError(_detail_message(detail), param="image_detail")
    base = base_token_count(tile_size, patch_size, strategy, num_additional_image_tokens)
    best = select_best_resolution(height, width, pinpoints)
    rows, cols = best[0] // tile_size, best[1] // tile_size
    if rows < 1 or cols < 1:
        raise ValueError(f"pinpoint {list(best)} is smaller than one {tile_size}px tile")
    side = tile_size // patch_size
    top, bottom, left, right = unpadded_crop(height, width, rows * side, cols * side)
    geom = ImageGeometry(height, width, best, rows, cols, side, top, bottom, left, right, base)
    return geom.base_view() if detail == "low" else geom


def num_image_tokens(
    height: int,
    width: int,
    pinpoints: Iterable[Sequence[int]],
    tile_size: int,
    patch_size: int,
    strategy: str = "default",
    num_additional_image_tokens: int = 1,
    *,
    detail: str = "auto",
) -> int:
    """How many ``<image>`` tokens (and model features) one ``height x width`` image becomes."""
    return image_geometry(
        height, width, pinpoints, tile_size, patch_size, strategy, num_additional_image_tokens, detail=detail
    ).num_tokens


def low_detail_images(image_detail: str | Sequence[str] | None, count: int) -> list[bool]:
    """For each of *count* images, whether it is seen at ``detail="low"`` (the base view only).

    :param image_detail: one of :data:`DETAILS` for every image, one per image, or None (all ``"auto"``).
    :param count: how many images there are.
    :raises InputError: a value not in :data:`DETAILS`, or a sequence not one per image.
    """
    if image_detail is None:
        return [False] * count
    if isinstance(image_detail, str):
        if image_detail not in DETAILS:
            raise InputError(_detail_message(image_detail), param="image_detail")
        values = [image_detail] * count
    elif isinstance(image_detail, Sequence):
        values = list(image_detail)
        if len(values) != count:
            raise InputError(
                f"image_detail has {len(values)} values for {count} image(s): give one per image, or one "
                f"string ({_accepted()}) for all",
                param="image_detail",
            )
    else:
        raise InputError(_detail_message(image_detail), param="image_detail")
    for value in values:
        if value not in DETAILS:
            raise InputError(_detail_message(value), param="image_detail")
    return [value == "low" for value in values]


def _accepted() -> str:
    return ", ".join(repr(d) for d in DETAILS)


def _detail_message(value: object) -> str:
    return (
        f"image_detail must be one of {_accepted()} (low: the base view only; high/auto: the full any-resolution "
        f"tiles), got {value!r}"
    )
