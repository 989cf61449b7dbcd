"""Checkpoint key layouts: how llava-hf files name the weights, and how our modules name them.

Three layouts exist in the wild; all load into the same in-memory module tree::

    in memory (transformers 5)           llava-hf hub files                   transformers 5 saves
    model.language_model.X               language_model.model.X               language_model.model.X
    lm_head.weight                       language_model.lm_head.weight        language_model.lm_head.weight
    model.vision_tower.X                 vision_tower.vision_model.X (*)      vision_tower.X
    model.multi_modal_projector.X        multi_modal_projector.X              multi_modal_projector.X
    model.image_newline                  image_newline                        image_newline

(*) CLIP and SigLIP towers; others (Dinov2...) had no ``vision_model`` level: ``vision_tower.X`` there too.

Loading maps any of the three to the in-memory names (:data:`LOAD_KEY_MAPPING`, applied in order, each
rule to the result of the previous ones, as transformers' ``key_mapping`` does). Saving writes the hub
layout (:func:`to_hub_key`), which every version of transformers' own class loads.
"""

from __future__ import annotations

import re

__all__ = ["LOAD_KEY_MAPPING", "to_memory_key", "to_hub_key"]

# Regex -> replacement, applied in order (a later rule sees the result of the earlier ones).
LOAD_KEY_MAPPING: dict[str, str] = {
    r"^language_model\.lm_head\.": "lm_head.",
    r"^language_model\.model\.": "model.language_model.",
    r"^language_model\.": "model.language_model.",
    r"^vision_tower\.vision_model\.": "model.vision_tower.",
    r"^vision_tower\.": "model.vision_tower.",
    r"^multi_modal_projector\.": "model.multi_modal_projector.",
    r"^image_newline$": "model.image_newline",
}
_LOAD_RULES = [(re.compile(pattern), target) for pattern, target in LOAD_KEY_MAPPING.items()]

# In-memory prefix -> hub prefix, first match wins.
_SAVE_RULES = [
    ("lm_head.", "language_model.lm_head."),
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
]


def to_memory_key(key: str) -> str:
    """The in-memory name of a checkpoint key written in any of the three layouts."""
    for pattern, target in _LOAD_RULES:
        key = pattern.sub(target, key, count=1)
    return key


#: Vision towers whose transformers 4 classes held their weights under ``vision_model.`` (CLIPVisionModel,
#: SiglipVisionModel): the hub layout names theirs ``vision_tower.vision_model.X``; other towers (Dinov2...) had
#: no such level, and their hub names are ``vision_tower.X``.
WRAPPED_TOWERS = frozenset({"clip_vision_model", "clip", "siglip_vision_model", "siglip"})


def to_hub_key(key: str, tower: str | None = "clip_vision_model") -> str:
    """The llava-hf hub name of an in-memory key of ``LlavaNextForConditionalGeneration`` whose vision tower is of
    model type *tower*."""
    for prefix, hub_prefix in _SAVE_RULES:
        if key.startswith(prefix):
            if prefix == "model.vision_tower." and tower not in WRAPPED_TOWERS:
                hub_prefix = "vision_tower."
            return hub_prefix + key[len(prefix) :]
    return key
