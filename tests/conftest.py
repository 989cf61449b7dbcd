"""Shared fixtures: tiny random checkpoints in llava-hf layout, built once per session; transformers' reference
model and an engine over it, once per test module."""

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


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """transformers' own model (eval mode) and processor on :func:`tiny_checkpoint`: what the engine must match.
    One per test module, so that a module's changes to it stay in that module."""
    import transformers

    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    return model, transformers.AutoProcessor.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def engine(reference):
    """A started engine with 8 batch slots over :func:`reference`, shut down after the module's tests."""
    from llava_next_plugin.engine import Engine

    engine = Engine(*reference, max_batch_size=8).start()
    yield engine
    engine.shutdown(drain=False)
