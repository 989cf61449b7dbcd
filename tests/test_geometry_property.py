"""Property: our geometry's image-token count equals transformers' processor count, from sizes alone.

For random image sizes (1..8000 px per side), pinpoint sets, tile and patch sizes and both feature
strategies, ``geometry.num_image_tokens`` must equal what transformers' ``LlavaNextProcessor``
computes (its private ``_get_number_of_features``, minus one for ``default``; no pixels processed).
"""

from __future__ import annotations

import checkpoints
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers import LlavaNextProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from llava_next_plugin import geometry

NAMED_PINPOINTS = {
    "llava-v1.6": (checkpoints.REAL_PINPOINTS, 336, 14),
    "wide": (checkpoints.WIDE_PINPOINTS, 336, 14),
    "tiny": (checkpoints.TINY_PINPOINTS, checkpoints.TINY_TILE, checkpoints.TINY_PATCH),
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return checkpoints.build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def reference_count(tokenizer, height, width, pinpoints, tile, patch, strategy, additional) -> int:
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=additional,
    )
    count = processor._get_number_of_features(height, width, tile, tile)
    return count - 1 if strategy == "default" else count


@st.composite
def anyres_configs(draw):
    """A named pinpoint set, or a random one: tile = patch * side, pinpoints whole grids of tiles."""
    if draw(st.booleans()):
        pinpoints, tile, patch = NAMED_PINPOINTS[draw(st.sampled_from(sorted(NAMED_PINPOINTS)))]
    else:
        patch = draw(st.sampled_from([7, 8, 14, 16]))
        tile = patch * draw(st.integers(1, 32))
        grids = draw(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=8, unique=True))
        pinpoints = [[rows * tile, cols * tile] for rows, cols in grids]
    strategy = draw(st.sampled_from(["default", "full"]))
    additional = draw(st.sampled_from([0, 1])) if strategy == "default" else 1
    return pinpoints, tile, patch, strategy, additional


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(height=st.integers(1, 8000), width=st.integers(1, 8000), config=anyres_configs())
@example(height=768, width=1024, config=(checkpoints.REAL_PINPOINTS, 336, 14, "default", 1))  # 2340 tokens
@example(height=1, width=8000, config=(checkpoints.REAL_PINPOINTS, 336, 14, "full", 1))  # keeps 0 px anywhere
@example(height=8000, width=1, config=(checkpoints.WIDE_PINPOINTS, 336, 14, "default", 0))
@example(height=1, width=1, config=(checkpoints.TINY_PINPOINTS, 32, 8, "default", 1))
def test_token_count_equals_reference_from_sizes_alone(tokenizer, height, width, config):
    pinpoints, tile, patch, strategy, additional = config
    ours = geometry.num_image_tokens(height, width, pinpoints, tile, patch, strategy, additional)
    assert ours == reference_count(tokenizer, height, width, pinpoints, tile, patch, strategy, additional)


@settings(max_examples=60, deadline=None)
@given(height=st.integers(1, 8000), width=st.integers(1, 8000))
def test_view_count_follows_the_same_geometry(height, width):
    """The processors' number of views (1 + grid tiles) comes from the geometry module too."""
    from llava_next_plugin.image_processing import LlavaNextImageProcessor

    s = LlavaNextImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=checkpoints.REAL_PINPOINTS,
    ).settings()
    g = geometry.image_geometry(height, width, checkpoints.REAL_PINPOINTS, 336, 14)
    assert s.num_views(height, width) == g.num_tiles
