"""Shared fixtures: tiny random checkpoints in llava-hf layout, built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import checkpoints
import pytest

# End-to-end runs of whole user journeys (every README block, every notebook, a Ray cluster): they drive
# the same model, processor and engine code that the rest of the suite checks on each transformers version,
# so CI runs them once, on the newest transformers (``-m "not journey"`` on the lowest; see .ci/run).
JOURNEY_MODULES = {"test_readme.py", "test_notebooks.py", "test_distributed.py"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in JOURNEY_MODULES:
            item.add_marker(pytest.mark.journey)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny mistral + CLIP checkpoint in the hub key layout (``vision_tower.vision_model.*``)."""
    return checkpoints.build_checkpoint(tmp_path_factory.mktemp("tiny-mistral"))


@pytest.fixture(scope="session")
def tiny_checkpoint_factory(tmp_path_factory):
    """Build (and cache per argument set) a tiny checkpoint: ``factory(text="llama", vision="siglip", ...)``."""
    cache = {}

    def factory(**kwargs):
        key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        if key not in cache:
            name = "tiny-" + "-".join(f"{k}{v}" for k, v in key)[:60].replace("/", "_").replace(" ", "")
            cache[key] = checkpoints.build_checkpoint(tmp_path_factory.mktemp(name or "tiny"), **kwargs)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory):
    """The folder `llava-next tiny-checkpoint` writes (our classes, 64+-wide layers, example.png)."""
    from llava_next_plugin.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("llava-next-demo") / "tiny")
