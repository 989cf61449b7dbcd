"""LlavaNextConfig: the model's configuration, compatible with llava-hf ``config.json`` files."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from . import geometry

__all__ = ["LlavaNextConfig", "DEFAULT_PINPOINTS"]

DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

# Vision towers whose hidden states carry one extra position (a CLS token) before the patches: CLIP's, and the
# ViT family's (Dinov2 and ViT, which transformers' AutoModel builds as towers too). SigLIP has none.
_TOWERS_WITH_CLS = ("clip_vision_model", "clip", "dinov2", "vit")

logger = logging.getLogger(__name__)


class derived:  # noqa: N801  (used as a decorator, as ``property`` is)
    """A fact derived from the sub-configs, read like an attribute and never stored: a value set under its name
    (a ``config.json`` key, a keyword, an assignment, as transformers' config takes any) is left unstored, silently
    when it agrees with the sub-configs, with a warning naming where it comes from when it does not.

    :param source: where the fact comes from, as the warning says it (``@derived("vision_config.patch_size")``).
    """

    def __init__(self, source: str) -> None:
        self.source = source

    def __call__(self, compute: Callable[[Any], Any]) -> derived:
        self.compute = compute
        self.__doc__ = compute.__doc__
        return self

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, config: Any, owner: type | None = None) -> Any:
        return self if config is None else self.compute(config)

    def __set__(self, config: Any, value: Any) -> None:
        try:
            actual = self.compute(config)
        except TypeError:  # during construction, before the sub-configs are built: nothing to compare with yet
            return
        if value != actual:
            logger.warning(
                "LlavaNextConfig.%s is %r, from %s; the %r given is ignored", self.name, actual, self.source, value
            )


class LlavaNextConfig(PreTrainedConfig):
    r"""Configuration of a LLaVA-NeXT model: a vision tower, a projector and a language backbone.

    :param vision_config: the vision tower's config (CLIP, SigLIP...), a dict or a ``PreTrainedConfig``.
        Defaults to CLIP ViT-L/14 at 336 px.
    :param text_config: the language backbone's config, of any type transformers knows (mistral, llama,
        qwen2...), a dict or a ``PreTrainedConfig``. Defaults to llama.
    :param image_token_index: the id of the ``<image>`` token (also readable as ``image_token_id``).
    :param projector_hidden_act: the activation between the projector's two linear layers.
    :param vision_feature_select_strategy: ``"default"`` drops the first position of each tile's features
        (CLIP's CLS), ``"full"`` keeps every position.
    :param vision_feature_layer: the vision hidden state(s) to use (an int or a list of ints); a list's
        states are concatenated along the feature axis.
    :param image_grid_pinpoints: the ``[height, width]`` resolutions an image may be tiled to.
    :param image_seq_length: tokens of one tile (informational, as in llava-hf configs).
    :param multimodal_projector_bias: whether the projector's linear layers have biases.
    :param tie_word_embeddings: tie the LM head to the input embeddings.
    """

    model_type = "llava_next"
    attribute_map = {"image_token_id": "image_token_index"}
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="clip_vision_model",
            init_kwargs={
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "image_size": 336,
                "patch_size": 14,
                "projection_dim": 768,
                "vocab_size": 32000,
            },
        ),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_index: int = 32000
    projector_hidden_act: str = "gelu"
    vision_feature_select_strategy: str = "default"
    vision_feature_layer: int | list[int] = -2
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False
    image_grid_pinpoints: list | None = None
    image_seq_length: int = 576

    #: Facts derived from the sub-configs (read-only properties below), which transformers' config has no
    #: attribute for: keywords of these names given to ``from_pretrained`` / ``from_dict`` (a processor's
    #: ``patch_size``, ``num_additional_image_tokens`` passed down by a generic loader) are handed back unused,
    #: as there, rather than set.
    DERIVED = ("vision_tower_config", "tile_size", "patch_size", "patches_per_side", "num_additional_image_tokens")

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        derived = {key: kwargs.pop(key) for key in cls.DERIVED if key in kwargs}
        loaded = super().from_dict(config_dict, **kwargs)
        if derived and kwargs.get("return_unused_kwargs"):
            config, unused = loaded
            return config, {**unused, **derived}
        return loaded

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.image_grid_pinpoints is None:
            self.image_grid_pinpoints = [list(p) for p in DEFAULT_PINPOINTS]
        self.image_grid_pinpoints = [[int(h), int(w)] for h, w in self.image_grid_pinpoints]
        if isinstance(self.vision_feature_layer, (list, tuple)):
            self.vision_feature_layer = [int(i) for i in self.vision_feature_layer]
            if not self.vision_feature_layer:
                raise ValueError("vision_feature_layer is an empty list: give an int or a list of ints")
        self.validate_vision_feature_select_strategy()

    def validate_vision_feature_select_strategy(self) -> None:
        """Raise ``ValueError`` unless the strategy is known and fits the tower.

        Run at construction, and again by the model: ``from_pretrained(path, vision_feature_select_strategy=...)``
        sets its keyword arguments after construction.
        """
        if self.vision_feature_select_strategy not in geometry.VALID_STRATEGIES:
            raise ValueError(
                f"vision_feature_select_strategy must be 'default' or 'full', got "
                f"{self.vision_feature_select_strategy!r}"
            )
        if self.vision_feature_select_strategy == "full" and self.num_additional_image_tokens:
            raise ValueError(
                f"vision_feature_select_strategy='full' keeps the CLS position of the "
                f"{self.vision_tower_config.model_type!r} tower, so a tile's "
                f"{self.patches_per_side**2 + 1} features cannot form a square grid. Use "
                f"strategy 'default' with this tower, or a tower without a CLS position (SigLIP)."
            )

    # --- Derived facts the processor and the model share -----------------------------------
    @derived("vision_config")
    def vision_tower_config(self) -> PreTrainedConfig:
        """``vision_config`` as the config object construction made of it (a dict or None becomes one)."""
        return _built(self.vision_config, "vision_config")

    @derived("text_config")
    def language_model_config(self) -> PreTrainedConfig:
        """``text_config`` as the config object construction made of it (a dict or None becomes one)."""
        return _built(self.text_config, "text_config")

    @derived("vision_config.image_size")
    def tile_size(self) -> int:
        """Pixels on a side of one vision-tower tile (``vision_config.image_size``)."""
        return int(self.vision_tower_config.image_size)

    @derived("vision_config.patch_size")
    def patch_size(self) -> int:
        return int(self.vision_tower_config.patch_size)

    @derived("vision_config.image_size // vision_config.patch_size")
    def patches_per_side(self) -> int:
        return self.tile_size // self.patch_size

    @derived("the vision tower's kind (1 with a CLS token: CLIP, Dinov2, ViT; 0 without: SigLIP)")
    def num_additional_image_tokens(self) -> int:
        """Positions the tower emits before its patches: 1 for CLIP, Dinov2 and ViT (CLS), 0 for SigLIP."""
        return tower_extra_positions(self.vision_tower_config)

    @property
    def pinpoints(self) -> list:
        """``image_grid_pinpoints`` as construction set them (the defaults when none were given)."""
        if self.image_grid_pinpoints is None:
            raise TypeError("image_grid_pinpoints is None: LlavaNextConfig sets it at construction")
        return self.image_grid_pinpoints

    def image_geometry(self, height: int, width: int) -> geometry.ImageGeometry:
        """The token layout of one ``height x width`` image under this config."""
        return geometry.image_geometry(
            height,
            width,
            self.pinpoints,
            self.tile_size,
            self.patch_size,
            self.vision_feature_select_strategy,
            self.num_additional_image_tokens,
        )


def tower_extra_positions(vision_config: Any) -> int:
    """Positions a vision tower emits before its patches: 1 for CLIP, Dinov2 and ViT (a CLS token), 0 for SigLIP.

    :param vision_config: the tower's config (ours or transformers', whose LLaVA-NeXT config has no
        :attr:`LlavaNextConfig.num_additional_image_tokens`).
    """
    return 1 if getattr(vision_config, "model_type", None) in _TOWERS_WITH_CLS else 0


def _built(sub_config: dict | PreTrainedConfig | None, name: str) -> PreTrainedConfig:
    """*sub_config* once ``__post_init__`` has made a config object of it; a clear error before that."""
    if not isinstance(sub_config, PreTrainedConfig):
        raise TypeError(
            f"{name} is a {type(sub_config).__name__}, not a config object: LlavaNextConfig builds it at "
            f"construction; set it through LlavaNextConfig(...) rather than by assignment"
        )
    return sub_config
