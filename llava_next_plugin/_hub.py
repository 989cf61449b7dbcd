"""How a ``from_pretrained`` call finds its files and picks its image processor: one rule, two users.

:class:`~.processing.LlavaNextProcessor` and the ``AutoImageProcessor`` patch in :mod:`.registration` both
read files next to a checkpoint before transformers does (``config.json``, ``processor_config.json``...)
and both choose between our torch and PIL image processors. They must look in the same place (the same
``revision``, ``cache_dir``, ``token``...) and choose the same class for the same arguments, so both
take the keyword list and the backend rule from here. Nothing here imports transformers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .image_processing import LlavaNextImageProcessorBase

__all__ = [
    "HUB_KWARGS",
    "hub_kwargs",
    "IMAGE_BACKENDS",
    "image_backend",
    "image_processor_class",
    "not_a_local_checkpoint",
    "default_served_name",
]

HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
"""``from_pretrained`` keyword arguments that say where files come from; passed on to every file lookup."""

IMAGE_BACKENDS: dict[str, Literal["torchvision", "pil"]] = {
    "torchvision": "torchvision",
    "torch": "torchvision",
    "fast": "torchvision",
    "pil": "pil",
    "slow": "pil",
    "numpy": "pil",
}
"""Accepted ``backend=`` values and the image processor each means: ``"torchvision"`` is our
``LlavaNextImageProcessorFast`` (torch; it needs no torchvision), ``"pil"`` our ``LlavaNextImageProcessor``."""


def hub_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The file-locating arguments among a ``from_pretrained`` call's *kwargs* (those not None)."""
    return {key: kwargs[key] for key in HUB_KWARGS if kwargs.get(key) is not None}


def image_backend(backend: str | None, use_fast: bool | None) -> Literal["torchvision", "pil"] | None:
    """Which of our image processors a call asks for: ``"torchvision"`` (the default), ``"pil"``, or None
    for a backend we do not know.

    ``backend`` wins; without it ``use_fast=False`` means ``"pil"`` and ``use_fast=True`` ``"torchvision"``,
    as in transformers' ``AutoImageProcessor``.

    :param backend: a key of :data:`IMAGE_BACKENDS`, or None.
    :param use_fast: transformers' older switch, read only when *backend* is None.
    :return: the backend, or None when *backend* is not one of :data:`IMAGE_BACKENDS`.
    """
    if backend is None:
        return "torchvision" if use_fast is None or use_fast else "pil"
    return IMAGE_BACKENDS.get(backend)


def image_processor_class(backend: Literal["torchvision", "pil"]) -> type[LlavaNextImageProcessorBase]:
    """Our image processor class for a backend :func:`image_backend` chose (imported on demand)."""
    if backend == "pil":
        from .image_processing import LlavaNextImageProcessor

        return LlavaNextImageProcessor
    from .image_processing_fast import LlavaNextImageProcessorFast

    return LlavaNextImageProcessorFast


def not_a_local_checkpoint(model: str) -> str | None:
    """Why *model*, read as a checkpoint folder, is none (``"does not exist"``, ``"has no config.json"``), or
    ``None``: it is one, or it reads as a hub id (``owner/name``, not starting with ``.``, ``/`` or ``~``)."""
    path = Path(model).expanduser()
    looks_local = model.startswith((".", "/", "~")) or path.exists() or model.count("/") != 1
    if looks_local and not (path / "config.json").is_file():
        return "has no config.json" if path.exists() else "does not exist"
    return None


def default_served_name(model: str) -> str:
    """The model id clients see for checkpoint *model*: a hub id as it is, a local folder by its base name
    (the server never shows the path it loads from)."""
    text = str(model)
    if os.path.exists(text) or os.path.isabs(text) or text.startswith((".", "~")):
        return os.path.basename(os.path.normpath(os.path.abspath(os.path.expanduser(text)))) or "llava-next"
    return text
