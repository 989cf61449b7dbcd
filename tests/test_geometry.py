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


def test_low_detail_is_the_base_view_alone():
    full = geometry.image_geometry(768, 1024, MISTRAL, 336, 14, "default", 1)
    low = geometry.image_geometry(768, 1024, MISTRAL, 336, 14, "default", 1, detail="low")
    assert low == full.base_view()
    assert (low.num_tokens, low.num_tiles, low.tile_tokens, low.newline_tokens) == (576, 1, 0, 0)
    assert low.base_tokens == full.base_tokens and low.best_resolution == full.best_resolution
    for detail in ("high", "auto"):
        assert geometry.image_geometry(768, 1024, MISTRAL, 336, 14, "default", 1, detail=detail) == full
    assert geometry.num_image_tokens(768, 1024, MISTRAL, 336, 14, "full", 1, detail="low") == 577


def test_detail_per_image_one_for_all_or_one_each_and_bad_values_name_the_accepted_ones():
    import pytest

    from llava_next_plugin.errors import InputError

    assert geometry.low_detail_images(None, 2) == [False, False]
    assert geometry.low_detail_images("low", 3) == [True, True, True]
    assert geometry.low_detail_images(["high", "low", "auto"], 3) == [False, True, False]
    for bad in ("medium", ["low", "tiny"], 3):
        with pytest.raises(InputError, match="'low', 'high', 'auto'") as error:
            geometry.low_detail_images(bad, 2)
        assert error.value.param == "image_detail"
    with pytest.raises(InputError, match="image_detail has 1 values for 2 image"):
        geometry.low_detail_images(["low"], 2)
    with pytest.raises(InputError, match="'low', 'high', 'auto'"):
        geometry.low_detail_images("medium", 0)  # refused even without images
    with pytest.raises(InputError, match="'low', 'high', 'auto'"):
        geometry.image_geometry(768, 1024, MISTRAL, 336, 14, detail="medium")
