"""The anyres geometry: the one source of truth for how many tokens an image becomes."""

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
