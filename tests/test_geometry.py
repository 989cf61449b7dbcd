"""The anyres geometry: the one source of truth for how many tokens an image becomes."""

import numpy as np

from llava_next_plugin import geometry

MISTRAL = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def test_documented_example_1024x768_is_2340_tokens():
    g = geometry.image_geometry(768, 1024, MISTRAL, 336, 14, "default", 1)
    assert (g.base_tokens, g.tile_tokens, g.newline_tokens) == (576, 1728, 36)
    assert g.num_tokens == 2340
    assert g.describe() == "<image> x2340 = base 576 + tiles 1728 + newlines 36"


def test_best_resolution_prefers_kept_pixels_then_less_waste():
    assert geometry.select_best_resolution(768, 1024, MISTRAL) == (672, 672)
    assert geometry.select_best_resolution(100, 1000, MISTRAL) == (336, 1008)
    assert geometry.select_best_resolution(1000, 100, MISTRAL) == (1008, 336)
    # a tiny image fits every candidate fully: the least wasteful wins
    assert geometry.select_best_resolution(1, 1, MISTRAL) in ([336, 672], (336, 672))


def test_full_strategy_keeps_the_extra_position():
    assert geometry.base_token_count(336, 14, "full", 1) == 577
    assert geometry.base_token_count(384, 14, "full", 0) == 729


def test_view_grid_counts_partial_edge_tiles_and_equals_the_model_grid_on_whole_tiles():
    assert geometry.view_grid_shape(672, 336, 18) == (38, 19)  # 37 whole tiles + a 6 px one, 18 + a 12 px one
    assert geometry.view_grid_shape(672, 336, 336) == (2, 1) == geometry.grid_shape(600, 300, [[672, 336]], 336)


def test_shortest_edge_size_keeps_the_aspect_and_truncates_the_longer_side():
    from transformers.image_transforms import get_resize_output_image_size

    for height, width in [(18, 12), (12, 18), (18, 18), (7, 18), (336, 335)]:
        expected = get_resize_output_image_size(np.zeros((height, width, 3)), 20, default_to_square=False)
        assert geometry.shortest_edge_size(height, width, 20) == tuple(expected)
