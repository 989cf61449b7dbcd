"""Where anyres puts an image on its canvas, in pixels: the boxes a picture of the tiling needs.

    >>> from llava_next_plugin.layout import anyres_layout
    >>> layout = anyres_layout(480, 640, [[336, 672], [672, 336], [672, 672]], tile_size=336, patch_size=14)
    >>> layout.canvas, layout.image, len(layout.tiles)
    ((672, 672), Box(left=0, top=84, right=672, bottom=588), 4)

Every number comes from :mod:`llava_next_plugin.geometry` (the arithmetic the processor and the model
use); this module only turns them into rectangles on the best-resolution canvas:

* ``image``: where the resized image sits (the rest of the canvas is black padding),
* ``tiles``: the ``grid_rows x grid_cols`` tiles the canvas is cut into, row by row,
* ``kept``: the part of the feature map that survives unpadding, scaled back to pixels
  (one feature = one ``patch_size`` square).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from . import geometry

__all__ = ["Box", "AnyresLayout", "anyres_layout"]


@dataclass(frozen=True)
class Box:
    """A rectangle in canvas pixels, ``[left, right) x [top, bottom)``."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top


@dataclass(frozen=True)
class AnyresLayout:
    """The boxes of one image's anyres tiling; ``geometry`` holds its token counts."""

    geometry: geometry.ImageGeometry
    tile_size: int
    patch_size: int
    image: Box
    tiles: tuple[Box, ...]
    kept: Box

    @property
    def canvas(self) -> tuple[int, int]:
        """``(height, width)`` of the best resolution the image is fitted into."""
        return self.geometry.best_resolution


def anyres_layout(
    height: int,
    width: int,
    pinpoints: Iterable[Sequence[int]],
    tile_size: int,
    patch_size: int,
    strategy: str = "default",
    num_additional_image_tokens: int = 1,
) -> AnyresLayout:
    """The :class:`AnyresLayout` of a ``height x width`` image (arguments as :func:`geometry.image_geometry`)."""
    pinpoints = [tuple(p) for p in pinpoints]
    geom = geometry.image_geometry(
        height, width, pinpoints, tile_size, patch_size, strategy, num_additional_image_tokens
    )
    canvas_h, canvas_w = geom.best_resolution
    new_h, new_w = geometry.resize_within(height, width, canvas_h, canvas_w)
    top, left = geometry.pad_offsets(new_h, new_w, canvas_h, canvas_w)
    tiles = tuple(
        Box(col * tile_size, row * tile_size, (col + 1) * tile_size, (row + 1) * tile_size)
        for row in range(geom.grid_rows)
        for col in range(geom.grid_cols)
    )
    feature = tile_size // geom.side  # pixels per feature-map cell
    kept = Box(geom.crop_left * feature, geom.crop_top * feature, geom.crop_right * feature, geom.crop_bottom * feature)
    return AnyresLayout(geom, tile_size, patch_size, Box(left, top, left + new_w, top + new_h), tiles, kept)
