"""Tiny random LLaVA-NeXT checkpoints in llava-hf's layout, built with transformers' own classes.

Nothing here touches the network: the tokenizer is the Mistral v1 sentencepiece model shipped in the
``mistral_common`` wheel, the weights are random, and the folders look like llava-hf's on the hub
(``config.json``, ``model.safetensors`` with hub key names, tokenizer files, ``processor_config.json``,
``preprocessor_config.json``, ``chat_template.json``).

Also the small helpers the tests share: a chat (:func:`ask`), a photo (:func:`photo`), transformers' greedy
decoding of a prepared request (:func:`reference_greedy`) and a bounded wait (:func:`wait_for`).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ message['content'] if message['content'] is string else message['content'][0]['text'] }}\n"
    "{% elif message['role'] == 'user' %}[INST] "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %} [/INST]"
    "{% elif message['role'] == 'assistant' %} "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{{ message['content'][0]['text'] }}{% endif %}</s>"
    "{% endif %}{% endfor %}"
)

# Small but real anyres geometry: 32px tiles of 8px patches (4x4 = 16 features per tile).
TINY_TILE = 32
TINY_PATCH = 8
TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
# llava-v1.6 geometry, for preprocessing tests that need no model.
REAL_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
VICUNA_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
WIDE_PINPOINTS = [[336, 336], [336, 672], [672, 336], [672, 672], [336, 1344], [1344, 336], [1008, 1008]]

IMAGE_TOKEN_ID = 32000
PAD_TOKEN_ID = 32001
VOCAB_SIZE = 32064


def mistral_tokenizer_file() -> Path:
    """The Mistral v1 sentencepiece model that the ``mistral_common`` wheel ships; ``$MISTRAL_TOKENIZER_MODEL``
    names a copy of it where that package is not installed (benchmarks/gpu_device.sh carries one)."""
    if os.environ.get("MISTRAL_TOKENIZER_MODEL"):
        return Path(os.environ["MISTRAL_TOKENIZER_MODEL"])
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def build_tokenizer(folder: str | os.PathLike):
    """The real Mistral v1 tokenizer with llava-hf's ``<image>`` and ``<pad>`` tokens added."""
    from transformers import LlamaTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(mistral_tokenizer_file(), folder / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(str(folder), legacy=False, add_bos_token=True)
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID
    assert tok.pad_token_id == PAD_TOKEN_ID
    tok.padding_side = "left"
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    return tok


def vision_config(kind: str = "clip", width: int = 32, layers: int = 2, tile: int = TINY_TILE, patch: int = TINY_PATCH):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    common = dict(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=tile,
        patch_size=patch,
    )
    if kind == "clip":
        return CLIPVisionConfig(projection_dim=width, **common)
    if kind == "siglip":
        return SiglipVisionConfig(**common)
    if kind == "dinov2":  # a CLS token, and no vision_model level in any layout
        from transformers import Dinov2Config

        return Dinov2Config(**common)
    raise ValueError(kind)


def text_config(kind: str = "mistral", width: int = 64, layers: int = 2):
    from transformers import AutoConfig

    extra = {}
    if kind == "mistral":
        extra["sliding_window"] = 4096
    return AutoConfig.for_model(
        kind,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=4096,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )


def reference_config(
    text: str = "mistral",
    vision: str = "clip",
    strategy: str = "default",
    feature_layer=-2,
    pinpoints=None,
    width: int = 64,
    vision_width: int = 32,
    tie_word_embeddings: bool = False,
):
    """A transformers ``LlavaNextConfig`` for a tiny model."""
    from transformers import LlavaNextConfig

    return LlavaNextConfig(
        vision_config=vision_config(vision, width=vision_width),
        text_config=text_config(text, width=width),
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=feature_layer,
        image_grid_pinpoints=pinpoints or TINY_PINPOINTS,
        image_seq_length=(TINY_TILE // TINY_PATCH) ** 2,
        tie_word_embeddings=tie_word_embeddings,
    )


def to_hub_layout(folder: str | os.PathLike) -> None:
    """Rewrite a transformers-5 save into llava-hf's hub key names (``vision_tower.vision_model.*``).

    transformers 5 saves ``vision_tower.*`` without the ``vision_model`` part (its own conversion
    mapping strips it at load and it never puts it back); the checkpoints on the hub have it.
    """
    from safetensors.torch import load_file, save_file

    path = Path(folder) / "model.safetensors"
    tensors = load_file(str(path))
    renamed = {}
    for key, value in tensors.items():
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            key = "vision_tower.vision_model." + key[len("vision_tower.") :]
        renamed[key] = value.contiguous()
    save_file(renamed, str(path), metadata={"format": "pt"})


def build_checkpoint(
    folder: str | os.PathLike,
    text: str = "mistral",
    vision: str = "clip",
    strategy: str = "default",
    feature_layer=-2,
    pinpoints=None,
    width: int = 64,
    vision_width: int = 32,
    tie_word_embeddings: bool = False,
    hub_layout: bool = True,
    seed: int = 0,
) -> Path:
    """Write a tiny random llava-hf-style checkpoint (weights, tokenizer, processor) to *folder*."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor

    folder = Path(folder)
    torch.manual_seed(seed)
    config = reference_config(
        text, vision, strategy, feature_layer, pinpoints, width, vision_width, tie_word_embeddings
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    # Random init leaves image_newline at zeros in some versions: give it values so it matters.
    with torch.no_grad():
        model.model.image_newline.normal_(0, 0.5)
    model.save_pretrained(str(folder))
    if hub_layout and vision != "dinov2":
        to_hub_layout(folder)
    tokenizer = build_tokenizer(folder)
    tokenizer.save_pretrained(str(folder))
    if vision == "siglip":
        mean, std, additional = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], 0
    else:
        mean, std, additional = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711], 1
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": TINY_TILE},
        crop_size={"height": TINY_TILE, "width": TINY_TILE},
        image_grid_pinpoints=pinpoints or TINY_PINPOINTS,
        image_mean=mean,
        image_std=std,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=TINY_PATCH,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=additional,
        chat_template=MISTRAL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(folder))
    return folder


def real_photo(name: str = "chelsea.png"):
    """A real photo from scikit-image's data folder, as a PIL image."""
    import skimage
    from PIL import Image

    return Image.open(Path(skimage.__file__).parent / "data" / name)


def ask(text: str, images: int = 1) -> list[dict]:
    """A one-turn chat in transformers' format: *images* ``{"type": "image"}`` parts, then *text*."""
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


def photo(width: int = 40, height: int = 40):
    """The real photo, RGB, resized to ``width x height``."""
    return real_photo().convert("RGB").resize((width, height))


def reference_greedy(model, prepared, max_new_tokens: int) -> list[int]:
    """*model*'s ``generate`` (greedy) on an engine's prepared request: the completion's token ids."""
    images = (
        {}
        if prepared.pixel_values is None
        else {"pixel_values": prepared.pixel_values, "image_sizes": prepared.image_sizes}
    )
    with torch.no_grad():
        out = model.generate(
            input_ids=prepared.input_ids,
            attention_mask=torch.ones_like(prepared.input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            **images,
        )
    return out[0, prepared.input_ids.shape[1] :].tolist()


def wait_for(condition: Callable[[], object], seconds: float = 30) -> bool:
    """Poll *condition* until it holds or *seconds* pass (a guard against hanging, not a measure); its last
    value, as a bool."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(condition())
