"""pytest plugin for :mod:`run`: in the ``ours`` run, our classes answer to transformers' LLaVA-NeXT names.

Loaded with ``-p bind`` before pytest imports any test module, so ``from transformers import LlavaNextModel``
in transformers' tests gets our class. ``LLAVA_SUITE_MODE=reference`` leaves transformers untouched (and does
not import llava_next_plugin at all).
"""

from __future__ import annotations

import os
import sys
from typing import Any

MODE = os.environ.get("LLAVA_SUITE_MODE", "reference")

# transformers' image-processor class names (5.24: backend -> class) -> ours
_IMAGE_PROCESSORS = {
    "LlavaNextImageProcessorPil": "LlavaNextImageProcessor",  # PIL/numpy backend
    "LlavaNextImageProcessor": "LlavaNextImageProcessorFast",  # torch backend
    "LlavaNextImageProcessorFast": "LlavaNextImageProcessorFast",
}
_MODEL_NAMES = ("LlavaNextConfig", "LlavaNextModel", "LlavaNextForConditionalGeneration", "LlavaNextProcessor")


def _bind_ours() -> None:
    import importlib

    # The shared testers re-execute transformers/__init__.py (test_configuration_common's
    # direct_transformers_import), which would reset names bound before: import them first.
    for name in ("tests.test_configuration_common", "tests.test_image_processing_common"):
        try:
            importlib.import_module(name)
        except ImportError:  # the suite folder has no such tester
            pass

    import transformers
    from transformers.models.auto import image_processing_auto

    import llava_next_plugin

    for name in _MODEL_NAMES:
        setattr(transformers, name, getattr(llava_next_plugin, name))

    original = image_processing_auto.get_image_processor_class_from_name

    def get_image_processor_class_from_name(class_name: str) -> Any:
        ours = _IMAGE_PROCESSORS.get(class_name)
        return getattr(llava_next_plugin, ours) if ours else original(class_name)

    # transformers' image-processing tester imports the function by name: bind it where it will look
    image_processing_auto.get_image_processor_class_from_name = get_image_processor_class_from_name
    common = sys.modules.get("tests.test_image_processing_common")
    if common is not None:
        common.get_image_processor_class_from_name = get_image_processor_class_from_name  # type: ignore[attr-defined]


if MODE == "ours":
    _bind_ours()
elif MODE != "reference":
    raise SystemExit(f"LLAVA_SUITE_MODE must be 'reference' or 'ours', not {MODE!r}")


# --- both modes: the processor tests' tokenizer without the hub ---------------------------------------------
# transformers' LlavaNextProcessorTest loads the huggyllama/llama-7b tokenizer from the hub. With
# LLAVA_SUITE_TOKENIZER set to a folder holding a llama sentencepiece ``tokenizer.model`` (run.py uses
# mistral_common's Mistral v1 model: the same 32000-piece llama vocabulary), both runs load that instead.
def _local_tokenizer(cls: Any) -> Any:
    folder = os.environ["LLAVA_SUITE_TOKENIZER"]
    tokenizer_class = cls._get_component_class_from_processor("tokenizer")
    tokenizer = tokenizer_class.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tokenizer.pad_token is None:  # the sentencepiece model alone names no pad token; padding tests need one
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def pytest_collection_modifyitems(items: list[Any]) -> None:
    if not os.environ.get("LLAVA_SUITE_TOKENIZER"):
        return
    for item in items:
        cls = getattr(item, "cls", None)
        if cls is not None and cls.__name__ == "LlavaNextProcessorTest" and "_setup_tokenizer" in vars(cls):
            cls._setup_tokenizer = classmethod(_local_tokenizer)
