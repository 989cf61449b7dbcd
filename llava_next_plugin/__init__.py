"""llava-next-plugin: an independent LLaVA-NeXT (llava v1.6) for the transformers ecosystem.

Importing the package registers our classes with transformers' Auto classes for the model type
``llava_next`` (see :mod:`llava_next_plugin.registration`)::

    import llava_next_plugin
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path)   # llava_next_plugin's class
    processor = AutoProcessor.from_pretrained(path)             # llava_next_plugin's class

    with llava_next_plugin.use_transformers_builtins():         # transformers' own classes, in this block
        reference = AutoModelForImageTextToText.from_pretrained(path)

The public classes are imported on first use, so ``import llava_next_plugin`` stays light where a
module is not needed.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any

from .errors import ImageError, InputError
from .registration import is_registered, register, unregister, use_transformers_builtins

try:
    __version__ = importlib.metadata.version("llava-next-plugin")  # written once, in pyproject.toml
except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "unknown"

# public name -> module that defines it
_LAZY = {
    "LlavaNextConfig": "configuration",
    "LlavaNextImageProcessor": "image_processing",
    "LlavaNextImageProcessorFast": "image_processing_fast",
    "LlavaNextProcessor": "processing",
    "LlavaNextModel": "modeling",
    "LlavaNextForConditionalGeneration": "modeling",
    "AttentionMaskVisualizer": "visualizer",
}

__all__ = [  # the names of _LAZY, spelt out so that tools can read them
    "LlavaNextConfig",
    "LlavaNextImageProcessor",
    "LlavaNextImageProcessorFast",
    "LlavaNextProcessor",
    "LlavaNextModel",
    "LlavaNextForConditionalGeneration",
    "AttentionMaskVisualizer",
    "InputError",
    "ImageError",
    "register",
    "unregister",
    "is_registered",
    "use_transformers_builtins",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover
    from .configuration import LlavaNextConfig
    from .image_processing import LlavaNextImageProcessor
    from .image_processing_fast import LlavaNextImageProcessorFast
    from .modeling import LlavaNextForConditionalGeneration, LlavaNextModel
    from .processing import LlavaNextProcessor
    from .visualizer import AttentionMaskVisualizer


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


register()
