"""LlavaNextModel and LlavaNextForConditionalGeneration: a vision tower, a projector and a language model.

The module tree is the one transformers 5 builds, so in-memory weight names, PEFT target names
(``q_proj``, ``v_proj``...) and ``device_map`` plans are the same::

    LlavaNextForConditionalGeneration
    ├── model: LlavaNextModel
    │   ├── vision_tower            AutoModel.from_config(config.vision_config)   (CLIP, SigLIP...)
    │   ├── multi_modal_projector   linear_1 -> act -> linear_2
    │   ├── language_model          AutoModel.from_config(config.text_config)     (Mistral, Llama, Qwen2...)
    │   └── image_newline           [text_hidden]
    └── lm_head                     [vocab, text_hidden]

How an image becomes features (shapes for one image of ``n_tiles = 1 + rows * cols`` tiles):

1. the vision tower runs once over every tile of every image in the batch: ``[T, C, tile, tile]``;
2. the selected hidden state(s) (``vision_feature_layer``; a list is concatenated on the feature axis),
   without position 0 under strategy ``default``, go through the projector: ``[T, side*side, D]``;
3. packing, one gather for the whole batch: the base tile's features, then the grid tiles' features as
   one ``map_rows x map_cols`` map, cropped to the part that covers the image, with ``image_newline``
   after every row. Where to crop and how many rows/cols there are comes from :mod:`.geometry`
   (``config.image_geometry``) and nowhere else; the gather order of each geometry is cached.
4. the packed features replace the ``<image>`` token embeddings, in order (``masked_scatter``).

Checkpoints in the llava-hf hub layout, in what transformers 5 saves, and in in-memory names all load;
``save_pretrained`` writes the hub layout (see :mod:`.checkpoint_keys`).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling

from . import checkpoint_keys, geometry
from ._compat import (
    CACHE_NAME,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
    cache_kwarg,
    output_cache,
    take_cache,
)
from .configuration import LlavaNextConfig
from .errors import InputError

__all__ = [
    "LlavaNextPreTrainedModel",
    "LlavaNextModel",
    "LlavaNextForConditionalGeneration",
    "LlavaNextModelOutputWithPast",
    "LlavaNextCausalLMOutputWithPast",
]


@dataclass
class LlavaNextModelOutputWithPast(MultimodalBaseModelOutputWithPast):
    """The language model's outputs, plus ``image_outputs`` (``pooler_output``: per-image features)."""

    @property
    def image_hidden_states(self):
        return None if self.image_outputs is None else self.image_outputs.pooler_output


@dataclass
class LlavaNextCausalLMOutputWithPast(MultimodalCausalLMOutputWithPast):
    """``loss``, ``logits`` ``[batch, seq, vocab]``, the cache, and the same extras as the base model."""

    @property
    def image_hidden_states(self):
        return None if self.image_outputs is None else self.image_outputs.pooler_output


class LlavaNextMultiModalProjector(nn.Module):
    """Vision features ``[..., vision_hidden * n_layers]`` -> text embeddings ``[..., text_hidden]``."""

    def __init__(self, config: LlavaNextConfig):
        super().__init__()
        layers = config.vision_feature_layer
        n_layers = len(layers) if isinstance(layers, (list, tuple)) else 1
        text_hidden = config.language_model_config.hidden_size
        bias = config.multimodal_projector_bias
        self.linear_1 = nn.Linear(config.vision_tower_config.hidden_size * n_layers, text_hidden, bias=bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


# --- Packing order: cached per geometry ------------------------------------------------------------

NEWLINE = -1  # marks an ``image_newline`` slot in a packing order
_GEOMETRY_CACHE_SIZE = 4096  # distinct (height, width, ...) geometries kept per model


def packing_order(geom: geometry.ImageGeometry, tile_features: int) -> torch.Tensor:
    """Where each packed feature of one image comes from: ``[geom.num_tokens]`` int64 (CPU).

    Entries index the image's tile features flattened to ``[n_tiles * tile_features]`` (tile 0 is
    the base view, tiles ``1..`` the grid in row-major order); :data:`NEWLINE` marks the slot of an
    ``image_newline``. The base view keeps all its ``base_tokens`` features; the grid tiles are laid
    out as one ``map_rows x map_cols`` map, of which ``[crop_top:crop_bottom, crop_left:crop_right]``
    is kept, one newline after each kept row.

    Cached by layout, not by image size: the many sizes that share a grid and crop share one order.
    """
    crop = (geom.crop_top, geom.crop_bottom, geom.crop_left, geom.crop_right)
    return _packing_order_of_layout(geom.grid_rows, geom.grid_cols, geom.side, crop, geom.base_tokens, tile_features)


@functools.lru_cache(maxsize=1024)
def _packing_order_of_layout(
    grid_rows: int, grid_cols: int, side: int, crop: tuple[int, int, int, int], base_tokens: int, tile_features: int
) -> torch.Tensor:
    """:func:`packing_order` of one layout; ``crop`` is ``(top, bottom, left, right)`` in feature-map cells."""
    crop_top, crop_bottom, crop_left, crop_right = crop
    rows = torch.arange(crop_top, crop_bottom)[:, None]  # [R, 1] feature-map rows
    cols = torch.arange(crop_left, crop_right)[None, :]  # [1, C] feature-map cols
    tile = 1 + (rows // side) * grid_cols + cols // side  # [R, C]
    grid = tile * tile_features + (rows % side) * side + cols % side  # [R, C]
    newline = torch.full((grid.shape[0], 1), NEWLINE, dtype=grid.dtype)
    grid = torch.cat([grid, newline], dim=1).flatten()
    return torch.cat([torch.arange(base_tokens), grid])


# --- Which images go with which sample ------------------------------------------------------------


def images_of_samples(tokens_per_sample: list[int], features: list[int], labels: list[str]) -> list[range]:
    """The images whose features fill each sample's ``<image>`` tokens: the one walk over a batch.

    Images are given in prompt order over the whole batch, so sample ``s`` takes the next images until
    their features cover its tokens. Used to check a batch before its features are placed, and to
    find each sample's block of images when ``generate`` repeats samples.

    :param tokens_per_sample: ``<image>`` tokens in each sample (``token_mask.sum(-1)``).
    :param features: features of each image (its geometry's ``num_tokens``, or an encoded image's length).
    :param labels: how errors name each image (e.g. its ``height x width``).
    :return: per sample, the range of indices of its images.
    :raises InputError: a sample's tokens are not exactly its images' features, or images are left over.
    """
    blocks, image = [], 0
    for sample, n_tokens in enumerate(tokens_per_sample):
        first, n_features = image, 0
        while image < len(features) and n_features < n_tokens:
            n_features += features[image]
            image += 1
        if n_features != n_tokens:
            described = (
                ", ".join(f"image {i} {labels[i]} -> {features[i]}" for i in range(first, image)) or "no image left"
            )
            raise InputError(
                f"sample {sample} has {n_tokens} <image> tokens but its images give {n_features} features "
                f"({described}). The prompt's <image> expansion does not match the model: probably the "
                f"processor's patch_size, vision_feature_select_strategy or image_grid_pinpoints differ "
                f"from the model config, the processor and the model were given different image_detail values, or "
                f"image_sizes are not the sizes the processor saw.",
                param="input_ids",
            )
        blocks.append(range(first, image))
    if image != len(features):
        raise InputError(
            f"the batch has {sum(tokens_per_sample)} <image> tokens but {len(features)} images giving "
            f"{sum(features)} features: {len(features) - image} image(s) have no <image> tokens in the prompt",
            param="pixel_values",
        )
    return blocks


# --- Models ----------------------------------------------------------------------------------------


class LlavaNextPreTrainedModel(PreTrainedModel):
    """Shared settings: config class, capabilities, weight init, and the checkpoint key layouts."""

    config_class = LlavaNextConfig
    config: LlavaNextConfig
    base_model_prefix = "model"
    input_modalities = ["image", "text"]
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
        """transformers' check of ``attn_implementation``, with a missing flash-attn explained: what and how."""
        try:
            return super()._check_and_adjust_attn_implementation(attn_implementation, *args, **kwargs)
        except ImportError as exc:
            if not (isinstance(attn_implementation, str) and attn_implementation.startswith("flash_attention")):
                raise
            install = (
                "pip install 'llava-next-plugin[flash]' (flash-attn, for CUDA GPUs)"
                if attn_implementation == "flash_attention_2"
                else "install its flash-attn package"
            )
            raise ImportError(
                f"attn_implementation={attn_implementation!r} cannot be used here: {exc} To use it, "
                f"{install}; or pass attn_implementation='sdpa' (the default, no extra package)."
            ) from exc

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # Weights already loaded from a checkpoint carry ``_is_hf_initialized``: leave those alone.
        if isinstance(module, LlavaNextModel) and not getattr(module.image_newline, "_is_hf_initialized", False):
            with torch.no_grad():
                module.image_newline.normal_(0.0, 1.0 / math.sqrt(self.config.language_model_config.hidden_size))

    @classmethod
    def is_custom_code(cls) -> bool:
        """``False``: to transformers these classes are its own LLaVA-NeXT, not custom code. They hold exactly its
        parameter names and initialise each weight by its rules, so transformers may treat them as it treats its
        classes. It does so in two places: initialisation (for custom code it skips every module without parameters
        of its own, CLIP's attention and MLP blocks, whose Linear layers then got the generic init instead of
        CLIP's), and key renaming of old layouts for adapters (PEFT's ``PeftModel.from_pretrained`` and
        ``load_adapter`` rename ``base_model.model.language_model.model.*`` only for non-custom classes)."""
        return False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load any of the three key layouts (see :mod:`.checkpoint_keys`); arguments as transformers'."""
        # A user's own key_mapping runs first; ours then brings every layout to the in-memory names.
        kwargs["key_mapping"] = {**(kwargs.get("key_mapping") or {}), **checkpoint_keys.LOAD_KEY_MAPPING}
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """Save in the llava-hf hub layout (``language_model.model.*``, ``vision_tower.vision_model.*``...).

        Tied weights (``lm_head`` tied to the input embeddings) are written once, under the
        embeddings' name, as transformers expects. Quantized models are saved the same way.
        """
        if getattr(self, "_hf_peft_config_loaded", False):
            return super().save_pretrained(save_directory, is_main_process, state_dict, *args, **kwargs)
        kwargs["save_original_format"] = False
        quantizer = getattr(self, "hf_quantizer", None)
        if quantizer is None:
            state_dict = self._hub_state_dict(self.state_dict() if state_dict is None else state_dict)
            return super().save_pretrained(save_directory, is_main_process, state_dict, *args, **kwargs)
        # A quantized model's state dict comes from its quantizer, inside transformers' save_pretrained:
        # rename it on the way out, for this call only.
        quantized_state_dict = quantizer.get_state_dict_and_metadata

        def hub_state_dict_and_metadata(model):
            tensors, metadata = quantized_state_dict(model)
            if tensors is None:  # bitsandbytes: the plain state dict carries the quantization state
                tensors = model.state_dict() if state_dict is None else state_dict
            return self._hub_state_dict(tensors), metadata

        quantizer.get_state_dict_and_metadata = hub_state_dict_and_metadata
        try:
            return super().save_pretrained(save_directory, is_main_process, state_dict, *args, **kwargs)
        finally:
            del quantizer.get_state_dict_and_metadata

    def _hub_state_dict(self, state_dict: dict) -> dict:
        """``state_dict`` (in-memory names) renamed to the hub layout, a tied LM head left out."""
        prefix = "" if isinstance(self, LlavaNextForConditionalGeneration) else "model."
        tower = getattr(self.config.vision_tower_config, "model_type", None)
        tied = _head_is_tied(self)
        renamed = {}
        for key, value in state_dict.items():
            if tied and key == "lm_head.weight":
                continue
            if isinstance(value, torch.Tensor) and value.device.type == "meta":
                # Offloaded by a device_map: read it back now, while the in-memory name still finds it.
                from transformers.integrations.accelerate import load_offloaded_parameter

                value = load_offloaded_parameter(self, key)
            renamed[checkpoint_keys.to_hub_key(prefix + key, tower)] = value
        return renamed


def as_our_config(config: Any) -> LlavaNextConfig:
    """*config* as our :class:`LlavaNextConfig`: transformers' own (``from transformers import LlavaNextConfig``
    still names it after this package is imported) is rebuilt from its values, attention choice included."""
    if isinstance(config, LlavaNextConfig) or getattr(config, "model_type", None) != "llava_next":
        return config
    ours = LlavaNextConfig.from_dict(config.to_dict())
    for name in ("", "vision_config", "text_config"):  # the attention set per config at load, not in to_dict
        source, target = (getattr(config, name), getattr(ours, name)) if name else (config, ours)
        chosen = getattr(source, "_attn_implementation_internal", None)
        if chosen is not None and target is not None:
            target._attn_implementation_internal = chosen
    return ours


class LlavaNextModel(LlavaNextPreTrainedModel):
    """The vision tower, the projector and the language model, without the LM head.

    ``forward`` returns :class:`LlavaNextModelOutputWithPast` (``last_hidden_state`` ``[batch, seq,
    text_hidden]``, the cache, optional hidden states/attentions, and ``image_outputs``).
    """

    # Loading the base model from a full checkpoint leaves the LM head out, on purpose.
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\.weight$"]

    def __init__(self, config: LlavaNextConfig):
        config = as_our_config(config)
        config.validate_vision_feature_select_strategy()  # again: from_pretrained's kwargs bypass the config's check
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaNextMultiModalProjector(config)
        text_hidden = config.language_model_config.hidden_size
        self.image_newline = nn.Parameter(torch.randn(text_hidden, dtype=self.dtype) / math.sqrt(text_hidden))
        self.language_model = AutoModel.from_config(config.text_config)
        self._lm_cache_kwarg = cache_kwarg(self.language_model.forward)  # "cache" or "past_key_values"
        self._geometry_cache: dict[tuple, geometry.ImageGeometry] = {}
        self._warned_image_tokens_as_text = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    # --- image features ----------------------------------------------------------------------

    def image_geometry(self, height: int, width: int, strategy: str | None = None) -> geometry.ImageGeometry:
        """The :class:`~.geometry.ImageGeometry` of one image, from ``config.image_geometry`` (memoised).

        ``strategy`` overrides the config's ``vision_feature_select_strategy`` (it only changes the
        base view's token count).
        """
        cfg = self.config
        strategy = strategy or cfg.vision_feature_select_strategy
        key = (height, width, strategy, cfg.tile_size, cfg.patch_size, _pinpoints_key(cfg))
        geom = self._geometry_cache.get(key)
        if geom is None:
            if strategy == cfg.vision_feature_select_strategy:
                geom = cfg.image_geometry(height, width)
            else:
                geom = geometry.image_geometry(
                    height,
                    width,
                    cfg.pinpoints,
                    cfg.tile_size,
                    cfg.patch_size,
                    strategy,
                    cfg.num_additional_image_tokens,
                )
            if len(self._geometry_cache) >= _GEOMETRY_CACHE_SIZE:
                self._geometry_cache.clear()
            self._geometry_cache[key] = geom
        return geom

    def _image_geometries(
        self, image_sizes, strategy: str, image_detail: str | Sequence[str] | None = None
    ) -> list[geometry.ImageGeometry]:
        """Each image's geometry; at ``detail="low"`` its :meth:`~.geometry.ImageGeometry.base_view`."""
        shape_hint = "image_sizes must be [images, 2]: one (height, width) pair per image, as the processor returns"
        try:
            sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else [list(s) for s in image_sizes]
        except TypeError as err:  # e.g. [50, 70]: one image's pair without its list
            raise InputError(f"{shape_hint}; got {image_sizes!r}", param="image_sizes") from err
        if not isinstance(sizes, list):
            raise InputError(f"{shape_hint}; got {image_sizes!r}", param="image_sizes")
        low = geometry.low_detail_images(image_detail, len(sizes))
        geoms = []
        for index, size in enumerate(sizes):
            if not isinstance(size, list):
                raise InputError(f"{shape_hint}; got {image_sizes!r}", param="image_sizes")
            if len(size) != 2:
                raise InputError(
                    f"image_sizes[{index}] is {size}: give one (height, width) pair per image", param="image_sizes"
                )
            try:
                geom = self.image_geometry(int(size[0]), int(size[1]), strategy)
            except ValueError as err:
                raise InputError(f"image_sizes[{index}] = {size}: {err}", param="image_sizes") from err
            geoms.append(geom.base_view() if low[index] else geom)
        return geoms

    def _gather_tiles(
        self, pixel_values: torch.Tensor | Sequence[torch.Tensor], geoms: list[geometry.ImageGeometry]
    ) -> torch.Tensor:
        """Every tile the images need, ``[T, C, tile, tile]``, from 5-D padded, a list of one ``[tiles_i, C,
        tile, tile]`` per image, or 4-D stacked input.

        Each image uses ``num_tiles`` of its views (the base view first; :meth:`~.geometry.ImageGeometry.view_indices`
        says which): all of them at full detail, the base view alone at ``detail="low"``. The 4-D form holds
        exactly the tiles used.
        """
        tile = self.config.tile_size
        needed = [g.num_tiles for g in geoms]
        views = [g.view_indices(tile) for g in geoms]

        def used(pv: torch.Tensor, index: range | list[int]) -> torch.Tensor:
            return pv[: len(index)] if isinstance(index, range) else pv[index]

        if not isinstance(pixel_values, torch.Tensor):
            if not isinstance(pixel_values, (list, tuple)) or not all(
                isinstance(p, torch.Tensor) for p in pixel_values
            ):
                raise InputError(
                    f"pixel_values must be a torch tensor or a list of them (one per image), got "
                    f"{type(pixel_values).__name__}: ask the processor for return_tensors='pt'",
                    param="pixel_values",
                )
            if len(pixel_values) != len(geoms):
                raise InputError(
                    f"pixel_values holds {len(pixel_values)} images but image_sizes has {len(geoms)} entries: "
                    f"give one (height, width) per image, as the processor returns them",
                    param="image_sizes",
                )
            return self._gather_tiles(
                torch.cat([used(pv, v) for pv, v in zip(pixel_values, views, strict=True)]), geoms
            )
        if pixel_values.dim() in (4, 5) and tuple(pixel_values.shape[-2:]) != (tile, tile):
            raise InputError(
                f"pixel_values tiles are {tuple(pixel_values.shape[-2:])} pixels but the vision tower takes "
                f"{tile}x{tile}: the image processor's crop_size/size differ from vision_config.image_size",
                param="pixel_values",
            )
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(geoms):
                raise InputError(
                    f"pixel_values holds {pixel_values.shape[0]} images but image_sizes has {len(geoms)} "
                    f"entries: give one (height, width) per image, as the processor returns them",
                    param="image_sizes",
                )
            available = pixel_values.shape[1]
            for index, (g, v) in enumerate(zip(geoms, views, strict=True)):
                if v[-1] >= available:
                    raise InputError(
                        f"image {index} ({g.height}x{g.width}) needs {v[-1] + 1} views (1 + its "
                        f"{g.grid_rows}x{g.grid_cols} grid of tiles) but pixel_values holds {available} per image: "
                        f"the processor's image_grid_pinpoints or tile size differ from the model config's",
                        param="pixel_values",
                    )
            if all(n == available for n in needed):
                return pixel_values.flatten(0, 1)
            return torch.cat([used(pv, v) for pv, v in zip(pixel_values, views, strict=True)])
        if pixel_values.dim() == 4:
            if pixel_values.shape[0] != sum(needed):
                raise InputError(
                    f"pixel_values holds {pixel_values.shape[0]} tiles but the {len(geoms)} image_sizes need "
                    f"{sum(needed)} ({needed} per image): image_sizes or the processor's image_grid_pinpoints "
                    f"do not match the model config",
                    param="pixel_values",
                )
            return pixel_values
        raise InputError(
            f"pixel_values must be [images, tiles, channels, height, width] or [tiles, channels, height, "
            f"width]; got shape {tuple(pixel_values.shape)}",
            param="pixel_values",
        )

    def _tile_features(
        self, tiles: torch.Tensor, feature_layer, strategy: str, output_hidden_states=None, output_attentions=None
    ):
        """``(projected features [T, positions, text_hidden], the vision tower's outputs)``.

        The tower records only the selected layers unless ``output_hidden_states`` asks for all of them.
        """
        layers = list(feature_layer) if isinstance(feature_layer, (list, tuple)) else feature_layer
        self._check_tower_inputs(tiles, layers)
        tower_dtype = self.vision_tower.dtype
        tower_kwargs = {"output_attentions": output_attentions} if output_attentions else {}
        out = self.vision_tower(
            tiles.to(tower_dtype),
            # the layers to record, always as a list: a bare 0 (the embeddings) would read as "record none"
            output_hidden_states=True if output_hidden_states else (layers if isinstance(layers, list) else [layers]),
            return_dict=True,
            **tower_kwargs,
        )
        if isinstance(layers, list):
            selected = torch.cat([out.hidden_states[i] for i in layers], dim=-1)
        else:
            selected = out.hidden_states[layers]
        if strategy == "default":
            selected = selected[:, 1:]
        return self.multi_modal_projector(selected), out

    def _check_tower_inputs(self, tiles: torch.Tensor, layers: int | list[int]) -> None:
        """Channels and feature layers the vision tower and the projector can take (else a typed error)."""
        vision: Any = self.config.vision_config
        channels = int(getattr(vision, "num_channels", 3))
        if tiles.dim() != 4 or tiles.shape[1] != channels:
            raise InputError(
                f"pixel_values tiles have shape {tuple(tiles.shape[1:])} but the vision tower takes {channels} "
                f"channels ([channels, height, width] per tile): convert the images to RGB",
                param="pixel_values",
            )
        count = int(vision.num_hidden_layers) + 1  # the embeddings, then each layer's output
        chosen = layers if isinstance(layers, list) else [layers]
        for layer in chosen:
            if not isinstance(layer, int) or not -count <= layer < count:
                raise InputError(
                    f"vision_feature_layer {layer!r} is not a hidden state of the {count - 1}-layer vision tower: "
                    f"give an index from {-count} to {count - 1}",
                    param="vision_feature_layer",
                )
        width = getattr(getattr(self.multi_modal_projector, "linear_1", None), "in_features", None)
        if width is not None and len(chosen) * int(vision.hidden_size) != width:
            expected = width // int(vision.hidden_size)
            raise InputError(
                f"vision_feature_layer selects {len(chosen)} layer(s) but the projector takes {expected} "
                f"(the config has {self.config.vision_feature_layer!r}): select as many layers as it",
                param="vision_feature_layer",
            )

    @property
    def vocab_size(self) -> int:
        """The language model's vocabulary size (as transformers' model has it)."""
        return int(self.config.language_model_config.vocab_size)

    def pack_image_features(
        self,
        image_features: Sequence[torch.Tensor],
        image_sizes: torch.Tensor | Sequence[Sequence[int]],
        vision_feature_select_strategy: str,
        image_newline: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """transformers' helper: each image's features in the order the language model reads them.

        :param image_features: one ``[tiles_i, positions, text_hidden]`` tensor per image (projected, the CLS
            position already dropped for ``"default"``): its base view, then its grid's tiles; a single tile is
            the base view alone.
        :param image_sizes: ``[images, 2]`` original ``(height, width)``.
        :param vision_feature_select_strategy: ``"default"`` or ``"full"``.
        :param image_newline: ``[text_hidden]`` put at the end of each row of the grid (and after a lone base
            view); ``None`` puts none.
        :return: ``(one [tokens_i, text_hidden] tensor per image, tokens per image as a long tensor)``.
        """
        geoms = self._image_geometries(image_sizes, vision_feature_select_strategy, None)
        if len(image_features) != len(geoms):
            raise InputError(
                f"{len(image_features)} images' features for {len(geoms)} image sizes: give one per image",
                param="image_features",
            )
        packed = []
        for i, (geom, features) in enumerate(zip(geoms, image_features, strict=True)):
            extra = [] if image_newline is None else [image_newline[None].to(features.device, features.dtype)]
            if features.shape[0] == 1:  # the base view alone
                packed.append(torch.cat([features[0], *extra]))
                continue
            if features.shape[0] != geom.num_tiles:
                raise InputError(
                    f"image {i} ({geom.height}x{geom.width}) has {features.shape[0]} tiles' features; its "
                    f"{geom.grid_rows}x{geom.grid_cols} grid and base view make {geom.num_tiles}",
                    param="image_features",
                )
            order = packing_order(geom, features.shape[1])
            table = torch.cat([features.reshape(-1, features.shape[-1]), *extra])
            index = torch.where(order == NEWLINE, table.shape[0] - 1, order) if extra else order[order != NEWLINE]
            packed.append(table.index_select(0, index.to(table.device)))
        device = image_features[0].device if len(image_features) else None
        return packed, torch.tensor([len(p) for p in packed], dtype=torch.long, device=device)

    def get_placeholder_mask(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """transformers' helper: ``[batch, seq, 1]`` bool, where the ``<image>`` tokens are (from *input_ids*, else
        by matching *inputs_embeds* to the ``<image>`` embedding), checked to be as many as *image_features*'
        ``[tokens, text_hidden]`` rows (a typed error names both counts otherwise)."""
        mask = self._image_token_mask(input_ids, inputs_embeds)
        tokens, features = int(mask.sum()), image_features.numel() // inputs_embeds.shape[-1]
        if tokens * inputs_embeds.shape[-1] != image_features.numel():
            raise InputError(
                f"the prompt has {tokens} <image> tokens but {features} image features are given: let the processor "
                "expand each <image> for its image",
                param="input_ids",
            )
        return mask.unsqueeze(-1).to(inputs_embeds.device)

    def _pack_tiles(self, tile_features: torch.Tensor, geoms: list[geometry.ImageGeometry]) -> torch.Tensor:
        """All images' packed features ``[sum(num_tokens), text_hidden]`` from ``[T, F, text_hidden]``.

        One gather over the whole batch, in the order of :func:`packing_order`.
        """
        n_tiles, per_tile, hidden = tile_features.shape
        side = geoms[0].side if geoms else 0
        if per_tile != side * side:
            cls_note = (
                "the tower has no CLS position, so strategy 'default' drops a real patch: use 'full'"
                if self.config.num_additional_image_tokens == 0
                else "strategy 'full' keeps CLIP's CLS position: use 'default'"
            )
            raise InputError(
                f"each tile gives {per_tile} features but a {side}x{side} grid needs {side * side}; {cls_note}",
                param="vision_feature_select_strategy",
            )
        orders, offset = [], 0
        for g in geoms:
            order = packing_order(g, per_tile)
            orders.append(torch.where(order == NEWLINE, n_tiles * per_tile, order + offset * per_tile))
            offset += g.num_tiles
        index = torch.cat(orders).to(tile_features.device, non_blocking=True)
        newline = self.image_newline.to(tile_features.device, tile_features.dtype)
        table = torch.cat([tile_features.reshape(n_tiles * per_tile, hidden), newline[None]])
        return table.index_select(0, index)

    def _image_features(
        self,
        pixel_values: torch.Tensor | Sequence[torch.Tensor],
        image_sizes: torch.Tensor | Sequence[Sequence[int]] | None,
        feature_layer: int | list[int],
        strategy: str,
        image_detail: str | Sequence[str] | None = None,
        **tower_flags: bool | None,
    ) -> tuple[torch.Tensor, list[geometry.ImageGeometry], BaseModelOutputWithPooling]:
        """``(packed [sum(tokens), D], geometries, vision tower outputs)`` for every image in the batch.

        A ``detail="low"`` image's geometry is its base view: only its first tile goes through the tower and
        its packing order is that tile's features, so it gives exactly the tokens the processor counted.
        """
        if image_sizes is None:
            raise InputError(
                "pixel_values were given without image_sizes: pass the (height, width) of each image "
                "(the processor returns them as 'image_sizes')",
                param="image_sizes",
            )
        if strategy not in geometry.VALID_STRATEGIES:
            raise InputError(
                f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}",
                param="vision_feature_select_strategy",
            )
        geoms = self._image_geometries(image_sizes, strategy, image_detail)
        tiles = self._gather_tiles(pixel_values, geoms)
        tile_features, tower_outputs = self._tile_features(tiles, feature_layer, strategy, **tower_flags)
        return self._pack_tiles(tile_features, geoms), geoms, tower_outputs

    def get_image_features(
        self,
        pixel_values: torch.Tensor | Sequence[torch.Tensor],
        image_sizes: torch.Tensor | Sequence[Sequence[int]],
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_detail: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling | tuple:
        """Image embeddings, as the language model receives them.

        The output flags (*output_hidden_states*, *output_attentions*, *return_dict*) are keyword-only and
        read from ``kwargs``, as transformers' own models take them: ``generate`` hands this method every
        model kwarg that is one of its named parameters and drops those from the language model's call, so
        a named ``output_attentions`` would leave ``generate(output_attentions=True)`` without attentions.

        :param pixel_values: ``[images, tiles, C, H, W]`` (padded, as the processor returns),
            ``[all_tiles, C, H, W]``, or a list of one ``[tiles_i, C, H, W]`` tensor per image.
        :param image_sizes: ``[images, 2]``, each image's original ``(height, width)``.
        :param vision_feature_layer: the tower's layer(s) to use instead of the config's.
        :param vision_feature_select_strategy: ``"default"`` or ``"full"`` instead of the config's.
        :param image_detail: OpenAI's ``detail``, one for all images or one per image: ``"low"`` gives the base
            view's features only (``base_tokens``), ``"high"``/``"auto"`` (the default) the full any-resolution ones.
        :param kwargs: ``output_hidden_states`` (also return all of the vision tower's hidden states, over all
            tiles, ``[T, positions, vision_hidden]`` each), ``output_attentions`` (also return the vision tower's
            attentions), ``return_dict`` (``False`` gives the same fields as a tuple); unset ones follow the config.
        :return: a ``BaseModelOutputWithPooling``: ``pooler_output`` is a tuple of ``[num_tokens_i,
            text_hidden]`` tensors, one per image; ``last_hidden_state`` is the vision tower's ``[T, positions,
            vision_hidden]``; ``hidden_states`` and ``attentions`` as requested.
        :raises InputError: sizes, tiles or settings that do not fit the model, or an unknown *image_detail*.
        """
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        # unset flags follow the config, as in transformers (config.output_attentions=True, return_dict=False, ...)
        output_hidden_states = kwargs.get("output_hidden_states")
        if output_hidden_states is None:
            output_hidden_states = bool(getattr(self.config, "output_hidden_states", False))
        output_attentions = kwargs.get("output_attentions")
        if output_attentions is None:
            output_attentions = bool(getattr(self.config, "output_attentions", False))
        return_dict = kwargs.get("return_dict")
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        packed, geoms, tower = self._image_features(
            pixel_values,
            image_sizes,
            layer,
            strategy,
            image_detail,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        result = BaseModelOutputWithPooling(
            last_hidden_state=tower.last_hidden_state,
            # one [num_tokens_i, D] tensor per image, as transformers' multimodal models give (typed as one tensor)
            pooler_output=list(torch.split(packed, [g.num_tokens for g in geoms])),  # type: ignore[arg-type]
            hidden_states=tower.hidden_states if output_hidden_states else None,
            attentions=tower.attentions if output_attentions else None,
        )
        return result if return_dict is None or return_dict else result.to_tuple()

    # --- placing features ----------------------------------------------------------------------

    def _image_token_mask(self, input_ids, inputs_embeds) -> torch.Tensor:
        """``[batch, seq]`` bool: where the ``<image>`` tokens are."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embedding = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embedding).all(-1)

    def _check_counts(self, token_mask: torch.Tensor, geoms: list[geometry.ImageGeometry]) -> list[range]:
        """Each sample's images (see :func:`images_of_samples`); a clear error unless tokens and features match."""
        return images_of_samples(
            token_mask.sum(-1).tolist(), [g.num_tokens for g in geoms], [f"{g.height}x{g.width}" for g in geoms]
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        image_detail: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> LlavaNextModelOutputWithPast | tuple:
        """Embed the text, put image features at the ``<image>`` positions, run the language model.

        ``<image>`` ids in a prompt given no images at all are embedded as ordinary tokens (with a
        one-time warning), as transformers does; with images, every ``<image>`` token must get a feature.

        :param input_ids: ``[batch, seq]`` with each image's ``<image>`` token already expanded to its
            ``num_tokens`` (the processor does this).
        :param pixel_values: ``[images, tiles, C, H, W]``, ``[all_tiles, C, H, W]``, or a list of one
            ``[tiles_i, C, H, W]`` tensor per image; images in prompt order.
        :param image_sizes: ``[images, 2]`` original ``(height, width)`` of each image.
        :param attention_mask: ``[batch, seq]`` (1 = attend), or a 4-D mask.
        :param position_ids: ``[batch, seq]`` positions, when not the default ones.
        :param cache: a transformers ``Cache`` (``past_key_values`` is accepted as an alias; ``generate``
            passes the name of the installed transformers, see :mod:`._compat`).
        :param inputs_embeds: ``[batch, seq, text_hidden]`` instead of ``input_ids``.
        :param vision_feature_layer: the tower's layer(s) to use instead of the config's.
        :param vision_feature_select_strategy: ``"default"`` or ``"full"`` instead of the config's.
        :param use_cache: whether to return the cache.
        :param mm_encoder_outputs: ``{"image": get_image_features(...)}``, images encoded beforehand, instead
            of ``pixel_values`` (``generate`` encodes the images once this way and passes the features
            on, to an assistant model too).
        :param image_detail: OpenAI's ``detail``, one for all images or one per image: ``"low"`` puts only the
            base view's features (``base_tokens``), ``"high"``/``"auto"`` (the default) the full any-resolution
            ones. Give the processor the same value, so its ``<image>`` expansion matches.
        :return: :class:`LlavaNextModelOutputWithPast`, or a tuple with ``return_dict=False``.
        :raises InputError: images and ``<image>`` tokens that do not match, or settings the model cannot use.
        """
        cache = take_cache(cache, kwargs, f"{type(self).__name__}.forward")
        return_dict, use_cache = _config_defaults(self.config, kwargs.pop("return_dict", None), use_cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("give exactly one of input_ids and inputs_embeds", param="input_ids")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        # no pixels at all: a text-only call (anything that is no tensor is refused by _gather_tiles)
        if isinstance(pixel_values, (list, tuple)):  # one [tiles_i, C, H, W] tensor per image
            if all(isinstance(pv, torch.Tensor) and pv.numel() == 0 for pv in pixel_values):
                pixel_values = None
        elif isinstance(pixel_values, torch.Tensor) and pixel_values.numel() == 0:
            pixel_values = None
        encoded = (mm_encoder_outputs or {}).get("image")
        if encoded is not None and pixel_values is not None:
            raise InputError(
                "give either pixel_values or mm_encoder_outputs['image'] (images already encoded), not both",
                param="mm_encoder_outputs",
            )

        image_outputs = None
        if encoded is not None:
            pooled = encoded.pooler_output if isinstance(encoded, BaseModelOutputWithPooling) else encoded[1]
            if pooled is None:
                raise InputError(
                    "mm_encoder_outputs['image'] has no pooler_output: pass what get_image_features returns",
                    param="mm_encoder_outputs",
                )
            # one [tokens_i, D] tensor per image; a single [sum(tokens), D] tensor is one block
            per_image: list[torch.Tensor] = (
                [pooled] if isinstance(pooled, torch.Tensor) and pooled.dim() == 2 else list(pooled)
            )
            token_mask = self._image_token_mask(input_ids, inputs_embeds)
            counts = [len(features) for features in per_image]
            per_sample = token_mask.sum(-1).tolist()
            if len(per_image) == 1 and sum(1 for n in per_sample if n) > 1:
                # one block spanning samples (generate's chunked prefill hands each chunk its rows of all the
                # features as one): only the total can be checked, as transformers does
                if int(token_mask.sum()) != counts[0]:
                    raise InputError(
                        f"the prompt has {int(token_mask.sum())} <image> tokens but mm_encoder_outputs['image'] "
                        f"gives {counts[0]} features",
                        param="mm_encoder_outputs",
                    )
            else:
                images_of_samples(per_sample, counts, ["(encoded)"] * len(counts))
            if per_image:
                features = torch.cat(per_image).to(inputs_embeds.device, inputs_embeds.dtype)
                inputs_embeds = inputs_embeds.masked_scatter(token_mask.unsqueeze(-1), features)
            image_outputs = encoded
        elif pixel_values is not None:
            token_mask = self._image_token_mask(input_ids, inputs_embeds)
            if not bool(token_mask.any()):
                raise InputError(
                    f"pixel_values were given but the prompt has no <image> token (id "
                    f"{self.config.image_token_id}): put <image> where each image goes and let the processor "
                    f"expand it, or drop pixel_values",
                    param="pixel_values",
                )
            layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
            strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
            # the tower's hidden states: as transformers' class, the layers used (the others None), every layer
            # when the caller asks for the model's hidden states; its attentions when asked for the model's
            flags = {
                name: getattr(self.config, name, None) if kwargs.get(name) is None else kwargs[name]
                for name in ("output_hidden_states", "output_attentions")
            }
            features, geoms, tower = self._image_features(
                pixel_values, image_sizes, layer, strategy, image_detail, **flags
            )
            self._check_counts(token_mask, geoms)
            features = features.to(inputs_embeds.device, inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(token_mask.unsqueeze(-1), features)
            # as get_image_features gives them (the tower's last hidden state, one feature tensor per image)
            image_outputs = BaseModelOutputWithPooling(
                last_hidden_state=tower.last_hidden_state,
                pooler_output=list(torch.split(features, [g.num_tokens for g in geoms])),  # type: ignore[arg-type]
                hidden_states=tower.hidden_states,
                attentions=tower.attentions if flags["output_attentions"] else None,
            )
        elif (
            not self._warned_image_tokens_as_text
            and input_ids is not None
            and input_ids.shape[-1] > 1
            and not _is_compiling()
            and bool((input_ids == self.config.image_token_id).any())
        ):
            self._warned_image_tokens_as_text = True
            warnings.warn(
                f"the prompt has <image> tokens (id {self.config.image_token_id}) but no images were given: they "
                f"are embedded as ordinary tokens. To describe images pass pixel_values and image_sizes (from the "
                f"processor); to silence this, leave <image> out of text-only prompts.",
                UserWarning,
                stacklevel=2,
            )

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **{self._lm_cache_kwarg: cache},
            **kwargs,
        )
        result = LlavaNextModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **{CACHE_NAME: output_cache(outputs)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=image_outputs,
        )
        return result if return_dict else result.to_tuple()


class LlavaNextForConditionalGeneration(LlavaNextPreTrainedModel, GenerationMixin):
    """:class:`LlavaNextModel` plus the LM head: logits, loss with ``labels``, and ``generate()``."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: LlavaNextConfig):
        config = as_our_config(config)
        super().__init__(config)
        self.model = LlavaNextModel(config)
        text = config.language_model_config
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def pack_image_features(self, *args: Any, **kwargs: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        """:meth:`LlavaNextModel.pack_image_features`, same arguments (transformers' model offers it here too)."""
        return self.model.pack_image_features(*args, **kwargs)

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_image_features(
        self,
        pixel_values: torch.Tensor | Sequence[torch.Tensor],
        image_sizes: torch.Tensor | Sequence[Sequence[int]],
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_detail: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling | tuple:
        """See :meth:`LlavaNextModel.get_image_features`."""
        return self.model.get_image_features(
            pixel_values,
            image_sizes,
            vision_feature_layer,
            vision_feature_select_strategy,
            image_detail=image_detail,
            **kwargs,
        )

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """transformers' expansion of each sample to ``expand_size`` rows (beams, return sequences), images by block.

        A per-row repeat of ``pixel_values`` would turn a prompt's images ``a, b`` into ``a, a, b, b``;
        each expanded row needs its sample's whole block of images, ``a, b, a, b``. Which images belong
        to which sample comes from the ``<image>`` token counts and the images' geometries.
        """
        pixel_values, image_sizes = model_kwargs.get("pixel_values"), model_kwargs.get("image_sizes")
        if expand_size == 1 or pixel_values is None or image_sizes is None:
            # transformers types GenerationMixin's self as a protocol our PreTrainedModel meets at runtime
            return super()._expand_inputs_for_generation(  # type: ignore[misc]
                expand_size, is_encoder_decoder, input_ids, **model_kwargs
            )
        strategy = model_kwargs.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy
        tiles, image_sizes, image_detail = self._images_by_sample_block(
            input_ids,
            model_kwargs.get("inputs_embeds"),
            pixel_values,
            image_sizes,
            strategy,
            expand_size,
            model_kwargs.get("image_detail"),
        )
        model_kwargs["pixel_values"] = model_kwargs["image_sizes"] = None  # not repeated per row below
        input_ids, model_kwargs = super()._expand_inputs_for_generation(  # type: ignore[misc]  # as above
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        model_kwargs["pixel_values"], model_kwargs["image_sizes"] = tiles, image_sizes
        if image_detail is not None:
            model_kwargs["image_detail"] = image_detail
        return input_ids, model_kwargs

    def _images_by_sample_block(
        self, input_ids, inputs_embeds, pixel_values, image_sizes, strategy, repeats, image_detail=None
    ):
        """``(tiles [T', C, H, W], image_sizes [images', 2], image_detail)`` with each sample's images repeated
        ``repeats`` times (a per-image *image_detail* with them; one string stays as it is).

        Sample ``s`` owning images ``first_s..last_s`` becomes ``repeats`` copies of that block, in sample
        order, as :meth:`forward` expects after ``input_ids.repeat_interleave(repeats, 0)``.
        """
        inner = self.model
        geoms = inner._image_geometries(image_sizes, strategy, image_detail)
        tiles = inner._gather_tiles(pixel_values, geoms)  # validates shapes; [sum(num_tiles), C, H, W]
        use_ids = input_ids is not None and input_ids.shape[-1] > 0
        token_mask = inner._image_token_mask(input_ids if use_ids else None, None if use_ids else inputs_embeds)
        image_blocks = inner._check_counts(token_mask, geoms)  # per sample, its images (or a clear error)
        tile_starts = [0]
        for g in geoms:
            tile_starts.append(tile_starts[-1] + g.num_tiles)
        image_index = [i for block in image_blocks for _ in range(repeats) for i in block]
        tile_index = [t for i in image_index for t in range(tile_starts[i], tile_starts[i + 1])]
        tiles = tiles.index_select(0, torch.tensor(tile_index, device=tiles.device))
        if isinstance(image_sizes, torch.Tensor):
            image_sizes = image_sizes.index_select(0, torch.tensor(image_index, device=image_sizes.device))
        else:
            image_sizes = [image_sizes[i] for i in image_index]
        if image_detail is not None and not isinstance(image_detail, str):
            image_detail = [image_detail[i] for i in image_index]
        return tiles, image_sizes, image_detail

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        image_detail: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> LlavaNextCausalLMOutputWithPast | tuple:
        """Arguments as :meth:`LlavaNextModel.forward` (``image_detail`` included), plus *labels* and
        *logits_to_keep*.

        :param labels: ``[batch, seq]`` token ids to predict (``-100`` = ignore); gives ``loss``.
        :param logits_to_keep: compute logits for the last ``n`` positions only (0 = all), or for the
            positions in a 1-D index tensor.
        :return: :class:`LlavaNextCausalLMOutputWithPast`, or a tuple with ``return_dict=False``.
        """
        cache = take_cache(cache, kwargs, f"{type(self).__name__}.forward")
        return_dict, use_cache = _config_defaults(self.config, kwargs.pop("return_dict", None), use_cache)
        outputs = self.model(
            input_ids,
            return_dict=True,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            use_cache=use_cache,
            mm_encoder_outputs=mm_encoder_outputs,
            image_detail=image_detail,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            if logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.language_model_config.vocab_size, **kwargs
            )
        result = LlavaNextCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_NAME: output_cache(outputs)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
        )
        return result if return_dict else result.to_tuple()


# --- helpers ----------------------------------------------------------------------------------------


def _config_defaults(config: Any, return_dict: bool | None, use_cache: bool | None) -> tuple[bool, bool | None]:
    """``return_dict`` and ``use_cache`` of a forward: as given, else the model config's (``config.return_dict =
    False`` gives tuples, ``config.use_cache = False`` no cache, as fine-tuning scripts set them), else the
    language model's own default (``use_cache`` ``None``)."""
    if return_dict is None:
        return_dict = getattr(config, "return_dict", True)
    if use_cache is None:
        use_cache = getattr(config, "use_cache", None)
    return bool(return_dict), use_cache


def _pinpoints_key(config: LlavaNextConfig) -> tuple:
    return tuple((int(h), int(w)) for h, w in config.pinpoints)


def _head_is_tied(model: PreTrainedModel) -> bool:
    """Whether ``lm_head.weight`` is the input embedding matrix itself (then it is saved once)."""
    head = getattr(model, "lm_head", None)
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        return False
    embeddings = model.get_input_embeddings().weight
    if not isinstance(embeddings, torch.Tensor):
        return False
    if head.weight is embeddings:
        return True
    on_data = head.weight.device.type != "meta" and embeddings.device.type != "meta"
    return on_data and head.weight.data_ptr() == embeddings.data_ptr()


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()
