"""A small random LLaVA-NeXT checkpoint in llava-hf's hub layout, for offline demos and smoke tests.

``build_tiny_checkpoint(folder)`` writes what a llava-hf repository holds (``config.json``,
``model.safetensors`` with hub key names, tokenizer files, ``processor_config.json``,
``preprocessor_config.json``, ``chat_template.jinja``) plus a ``README.md`` and the marker file
:data:`MARKER_FILE` that says the weights are random. Nothing touches the network: the tokenizer is
the real Mistral v1 sentencepiece model shipped inside the ``mistral_common`` wheel (the ``demo``
extra: ``pip install 'llava-next-plugin[demo]'``).

Sizes: 32 px tiles of 8 px patches (16 features per tile), a 2-layer CLIP-style tower and a 2-layer
Mistral-style backbone, every linear layer at least 64 features wide on both sides so bitsandbytes
4-bit loading works on CPU. About 4.4 M parameters, most of them the 32064 x 64 embedding and head.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = [
    "build_tiny_checkpoint",
    "is_random_checkpoint",
    "write_example_image",
    "EXAMPLE_IMAGE",
    "MARKER_FILE",
    "TINY_PINPOINTS",
    "CHAT_TEMPLATE",
]

EXAMPLE_IMAGE = "example.png"
"""A generated picture written next to the weights, so the demo needs no image of the user's."""

MARKER_FILE = "llava_next_tiny.json"
"""Written next to ``config.json``: ``{"random_weights": true, ...}``."""

TILE_SIZE = 32
PATCH_SIZE = 8
TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
IMAGE_TOKEN_ID = 32000
PAD_TOKEN_ID = 32001
VOCAB_SIZE = 32064  # 32000 sentencepiece pieces + <image> + <pad>, rounded up like llava-hf's

# The Mistral [INST] format llava-v1.6-mistral uses: images first, then the text, in each user turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ message['content'] if message['content'] is string else message['content'][0]['text'] }}\n"
    "{% elif message['role'] == 'user' %}[INST] "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %} [/INST]"
    "{% elif message['role'] == 'assistant' %} "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{{ message['content'][0]['text'] }}"
    "{% endif %}</s>"
    "{% endif %}{% endfor %}"
)

_README = """\
# Tiny random LLaVA-NeXT checkpoint

Built by `llava-next tiny-checkpoint`. **The weights are random**: the model runs end to end
(tokenizer, anyres preprocessing, vision tower, projector, language model, generation) but its
answers are gibberish. Use it for offline demos and smoke tests, never for results.

- layout: llava-hf hub (`vision_tower.vision_model.*`, `multi_modal_projector.*`, `language_model.*`)
- tokenizer: the real Mistral v1 sentencepiece model, `<image>` = 32000, `<pad>` = 32001
- vision: CLIP-style, {vision_layers} layers, width {vision_width}, 32 px tiles of 8 px patches
- text: Mistral-style, {text_layers} layers, width {text_width}
- every linear layer is at least 64 features wide, so bitsandbytes 4-bit loading works on CPU
"""


def _mistral_tokenizer_model() -> Path:
    try:
        import mistral_common
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "building a tiny checkpoint needs the Mistral tokenizer from `mistral_common`: "
            "pip install 'llava-next-plugin[demo]'"
        ) from exc
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():  # pragma: no cover - depends on the wheel's layout
        raise FileNotFoundError(f"mistral_common does not ship {path.name} where expected ({path})")
    return path


def _build_tokenizer(folder: Path):
    from transformers import LlamaTokenizer

    shutil.copy(_mistral_tokenizer_model(), folder / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(str(folder), legacy=False, add_bos_token=True)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    if tokenizer.convert_tokens_to_ids("<image>") != IMAGE_TOKEN_ID or tokenizer.pad_token_id != PAD_TOKEN_ID:
        raise RuntimeError("the Mistral v1 tokenizer did not give <image>=32000 and <pad>=32001")
    tokenizer.padding_side = "left"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _config(text_width: int, text_layers: int, vision_width: int, vision_layers: int):
    from transformers import CLIPVisionConfig, MistralConfig

    from .configuration import LlavaNextConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_width,
        intermediate_size=2 * vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=TILE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=vision_width,
    )
    text = MistralConfig(
        hidden_size=text_width,
        intermediate_size=2 * text_width,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=4,  # k/v projections as wide as the model: no linear layer under 64
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=4096,
        sliding_window=None,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlavaNextConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=TINY_PINPOINTS,
        image_seq_length=(TILE_SIZE // PATCH_SIZE) ** 2,
        tie_word_embeddings=False,
    )


def _write_processor(folder: Path, tokenizer) -> None:
    from .image_processing import LlavaNextImageProcessor
    from .processing import LlavaNextProcessor

    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": TILE_SIZE},
        crop_size={"height": TILE_SIZE, "width": TILE_SIZE},
        image_grid_pinpoints=TINY_PINPOINTS,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(folder))


def build_tiny_checkpoint(
    folder: str | os.PathLike,
    *,
    text_width: int = 64,
    text_layers: int = 2,
    vision_width: int = 64,
    vision_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Write a random llava-hf-style checkpoint to *folder* (created if needed) and return its path.

    Widths below 64 are refused: bitsandbytes' 4-bit CPU kernels need 64+ features per linear layer. The files
    are written in a hidden sibling folder and moved into place once all are written.
    """
    if min(text_width, vision_width) < 64 or text_width % 4 or vision_width % 4:
        raise ValueError(
            f"text_width and vision_width must be multiples of 4 and at least 64 (got {text_width}, "
            f"{vision_width}): every linear layer must be 64+ features wide for 4-bit loading on CPU"
        )
    target = Path(folder)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder: choose another output path")
    _mistral_tokenizer_model()  # what it needs first: a missing one leaves no half-written folder behind
    # written in a hidden sibling folder, renamed into place once whole: an interrupted run leaves nothing
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # as a folder made by mkdir would be, not mkdtemp's owner-only
    try:
        _write_checkpoint(staging, text_width, text_layers, vision_width, vision_layers, seed)
        if target.is_dir() and any(target.iterdir()):  # a folder with files already: the new ones join them
            for item in staging.iterdir():
                os.replace(item, target / item.name)
            staging.rmdir()
        else:
            os.replace(staging, target)  # onto nothing, or an empty folder: at once
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _write_checkpoint(
    folder: Path, text_width: int, text_layers: int, vision_width: int, vision_layers: int, seed: int
) -> None:
    import torch

    from .modeling import LlavaNextForConditionalGeneration

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        config = _config(text_width, text_layers, vision_width, vision_layers)
        model = LlavaNextForConditionalGeneration(config).eval()
        with torch.no_grad():  # a random init may leave image_newline at zeros: make it matter
            newline = getattr(getattr(model, "model", model), "image_newline", None)
            if newline is not None:
                newline.normal_(0, 0.5)
    finally:
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(str(folder))  # our save writes llava-hf's hub key layout

    tokenizer = _build_tokenizer(folder)
    tokenizer.save_pretrained(str(folder))
    _write_processor(folder, tokenizer)

    (folder / MARKER_FILE).write_text(
        json.dumps(
            {
                "random_weights": True,
                "built_by": "llava-next tiny-checkpoint",
                "seed": seed,
                "parameters": sum(p.numel() for p in model.parameters()),
            },
            indent=2,
        )
        + "\n"
    )
    (folder / "README.md").write_text(
        _README.format(
            vision_layers=vision_layers, vision_width=vision_width, text_layers=text_layers, text_width=text_width
        )
    )
    write_example_image(folder / EXAMPLE_IMAGE)


def write_example_image(path: str | os.PathLike) -> Path:
    """A generated 640x480 picture (sky, sun, hills, a house) to ask the demo checkpoint about offline."""
    from PIL import Image, ImageDraw

    width, height = 640, 480
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for y in range(height):  # sky fading to the horizon
        t = y / height
        draw.line([(0, y), (width, y)], fill=(int(90 + 120 * t), int(150 + 80 * t), 255))
    draw.ellipse([480, 50, 580, 150], fill=(255, 215, 60))
    draw.polygon([(0, 330), (200, 250), (420, 320), (640, 260), (640, 480), (0, 480)], fill=(70, 150, 70))
    draw.rectangle([250, 300, 390, 400], fill=(200, 80, 60))
    draw.polygon([(235, 300), (320, 235), (405, 300)], fill=(120, 40, 30))
    draw.rectangle([305, 345, 335, 400], fill=(90, 60, 40))
    path = Path(path)
    image.save(path)
    return path


def is_random_checkpoint(path: str | os.PathLike) -> bool:
    """Whether *path* is a folder written by :func:`build_tiny_checkpoint` (random weights)."""
    marker = Path(path) / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        return bool(json.loads(marker.read_text()).get("random_weights"))
    except (OSError, ValueError):
        return False
