"""What differs between the transformers versions we support (``>=5.23,<5.25``), in one place.

Everything is detected by feature, never by version string:

* the KV cache is passed and returned as ``cache`` from 5.24 on, as ``past_key_values`` in 5.23
  (model ``forward`` arguments, output fields, ``generate``'s model kwargs, ``masking_utils``);
* 5.24 has ``MultimodalBaseModelOutputWithPast`` / ``MultimodalCausalLMOutputWithPast`` (outputs with an
  ``image_outputs`` field); 5.23 has not, so we define the same two outputs here for it.

Our own code reads the cache with :func:`output_cache` and passes it with ``{cache_kwarg(fn): cache}``.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import modeling_outputs
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling
from transformers.utils import ModelOutput

__all__ = [
    "CACHE_NAME",
    "cache_kwarg",
    "output_cache",
    "take_cache",
    "MultimodalBaseModelOutputWithPast",
    "MultimodalCausalLMOutputWithPast",
]

#: The name transformers gives the KV cache in outputs and ``generate``'s model kwargs:
#: ``"cache"`` (5.24) or ``"past_key_values"`` (5.23).
CACHE_NAME: str = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_kwarg(forward) -> str:
    """The argument name ``forward`` takes the KV cache by: ``"cache"`` or ``"past_key_values"``.

    Read from the signature (call once, at init): a language model built by one transformers version
    may differ from another's, and remote-code models may use either name.
    """
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return CACHE_NAME
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    return CACHE_NAME


def output_cache(outputs):
    """The KV cache a forward returned, under whichever name its output carries it (``None`` if none)."""
    cache = getattr(outputs, "cache", None)
    if cache is None:
        cache = getattr(outputs, "past_key_values", None)
    return cache


def take_cache(cache, kwargs: dict, owner: str):
    """The cache a ``forward`` was given, as ``cache`` or under the old name ``past_key_values`` (popped).

    Where transformers names it ``cache`` (5.24), the old name gets its ``FutureWarning``, worded as
    transformers' own, and ``cache`` wins when both are given; in 5.23 ``past_key_values`` is the name.
    """
    if "past_key_values" not in kwargs:
        return cache
    old = kwargs.pop("past_key_values")
    if CACHE_NAME == "cache" and not torch.compiler.is_compiling():
        if cache is not None:
            message = (
                f"Both `past_key_values` and `cache` are set for `{owner}`. Using `cache` and ignoring "
                f"deprecated `past_key_values`."
            )
        else:
            message = (
                f"`past_key_values` is deprecated and will be removed in version 5.40.0 for `{owner}`. "
                f"Use `cache` instead."
            )
        warnings.warn(message, FutureWarning, stacklevel=3)
    return old if cache is None else cache


# mypy checks against the newest transformers (TYPE_CHECKING is true for it), where these two exist.
if TYPE_CHECKING or hasattr(modeling_outputs, "MultimodalBaseModelOutputWithPast"):
    MultimodalBaseModelOutputWithPast = modeling_outputs.MultimodalBaseModelOutputWithPast
    MultimodalCausalLMOutputWithPast = modeling_outputs.MultimodalCausalLMOutputWithPast
else:  # transformers 5.23: the same fields, the cache under its 5.23 name ``past_key_values``
    _MODALITY_OUTPUTS = ("image_outputs", "video_outputs", "audio_outputs")

    class _MultimodalOutput(ModelOutput):
        """``to_tuple`` turns ``image_outputs`` into a tuple too, as 5.24's multimodal outputs do."""

        def to_tuple(self) -> tuple:
            return tuple(self[k].to_tuple() if k in _MODALITY_OUTPUTS else self[k] for k in self.keys())

        @property
        def cache(self):
            """The KV cache, under the name 5.24 gives it (``past_key_values`` here)."""
            return self.past_key_values

    @dataclass
    class MultimodalBaseModelOutputWithPast(_MultimodalOutput):
        """``last_hidden_state`` ``[batch, seq, hidden]``, ``past_key_values``, hidden states,
        attentions, and ``image_outputs`` (``None`` where no image was processed)."""

        last_hidden_state: torch.FloatTensor | None = None
        past_key_values: object | None = None
        hidden_states: tuple[torch.FloatTensor, ...] | None = None
        attentions: tuple[torch.FloatTensor, ...] | None = None
        image_outputs: BaseModelOutputWithPooling | None = None
        video_outputs: BaseModelOutputWithPooling | None = None
        audio_outputs: BaseModelOutputWithPooling | None = None

    @dataclass
    class MultimodalCausalLMOutputWithPast(_MultimodalOutput):
        """``loss``, ``logits`` ``[batch, seq, vocab]``, ``past_key_values``, hidden states, attentions,
        and ``image_outputs``."""

        loss: torch.FloatTensor | None = None
        logits: torch.FloatTensor | None = None
        past_key_values: object | None = None
        hidden_states: tuple[torch.FloatTensor, ...] | None = None
        attentions: tuple[torch.FloatTensor, ...] | None = None
        image_outputs: BaseModelOutputWithPooling | None = None
        video_outputs: BaseModelOutputWithPooling | None = None
        audio_outputs: BaseModelOutputWithPooling | None = None
