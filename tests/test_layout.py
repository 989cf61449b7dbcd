"""The drawing boxes of the anyres tiling agree with the geometry and with the processor's real views."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from llava_next_plugin import LlavaNextImageProcessor
from llava_next_plugin.configuration import DEFAULT_PINPOINTS
from llava_next_plugin.geometry import image_geometry
from llava_next_plugin.layout import Box, anyres_layout


@pytest.mark.parametrize("height, width", [(480, 640), (640, 480), (300, 1000), (1000, 250), (336, 336), (17, 900)])
def test_boxes_follow_the_geometry(height, width):
    layout = anyres_layout(height, width, DEFAULT_PINPOINTS, 336, 14)
    geom = image_geometry(height, width, DEFAULT_PINPOINTS, 336, 14)
    assert layout.geometry == geom and layout.canvas == geom.best_resolution
    canvas_h, canvas_w = layout.canvas
    # the tiles cover the canvas exactly, row by row
    assert len(layout.tiles) == geom.grid_rows * geom.grid_cols
    assert sum(t.width * t.height for t in layout.tiles) == canvas_h * canvas_w
    assert layout.tiles[0] == Box(0, 0, 336, 336) and layout.tiles[-1].right == canvas_w
    assert layout.tiles[-1].bottom == canvas_h
    # the image is centred and touches two opposite sides; the kept region is the unpadded feature map
    image, kept = layout.image, layout.kept
    assert (image.left == 0 and image.right == canvas_w) or (image.top == 0 and image.bottom == canvas_h)
    assert abs(image.left - (canvas_w - image.right)) <= 1 and abs(image.top - (canvas_h - image.bottom)) <= 1
    assert (kept.height // 14, kept.width // 14) == (geom.unpadded_rows, geom.unpadded_cols)
    assert kept.height * kept.width // 14**2 == geom.tile_tokens


def test_the_image_box_is_where_the_processor_puts_the_pixels():
    image = Image.new("RGB", (640, 300), (250, 250, 250))  # wide: padded above and below
    processor = LlavaNextImageProcessor()
    views = processor.views(image, processor.settings())
    layout = anyres_layout(300, 640, processor.settings().pinpoints, 336, 14)
    rows, cols = layout.geometry.grid_rows, layout.geometry.grid_cols
    tiles = views[1:].reshape(rows, cols, 336, 336, 3)
    canvas = tiles.transpose(0, 2, 1, 3, 4).reshape(rows * 336, cols * 336, 3)
    lit = np.argwhere(canvas.max(axis=-1) > 0)
    box = layout.image
    assert (lit[:, 0].min(), lit[:, 0].max() + 1) == (box.top, box.bottom)
    assert (lit[:, 1].min(), lit[:, 1].max() + 1) == (box.left, box.right)
