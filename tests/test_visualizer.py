"""AttentionMaskVisualizer: the real mask, readable image blocks, three renderers behind a hook."""

from __future__ import annotations

import io

import checkpoints
import pytest
import torch
from PIL import Image

import llava_next_plugin
from llava_next_plugin import AttentionMaskVisualizer
from llava_next_plugin.errors import InputError
from llava_next_plugin.hooks import get_plugin_manager, hookimpl
from llava_next_plugin.visualizer import DEFAULT_IMAGE_SIZE, EMPTY, FULL, MAX_BLOCKS, PARTIAL, MaskPicture

PROMPT = "<image> What is shown in this image?"


@pytest.fixture(scope="module")
def checkpoint(demo_checkpoint):
    return demo_checkpoint


@pytest.fixture(scope="module")
def viz(checkpoint):
    return AttentionMaskVisualizer(str(checkpoint))


@pytest.fixture(scope="module")
def photo():
    return checkpoints.real_photo("chelsea.png").convert("RGB")


def captured_model_mask(checkpoint, images, prompts) -> torch.Tensor:
    """bool [batch, seq, seq]: the mask our model's first attention layer really receives (eager)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(checkpoint), attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(str(checkpoint))
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    seen = {}

    def grab(module, args, kwargs):
        seen["mask"] = kwargs["attention_mask"]

    attention = model.model.language_model.layers[0].self_attn
    handle = attention.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    mask = seen["mask"][:, 0]
    return mask if mask.dtype == torch.bool else mask == 0


def test_shows_the_mask_the_model_uses_with_padding(viz, checkpoint, photo):
    small = photo.resize((50, 30))
    prompts = [PROMPT, "Hi <image>"]
    picture = viz(prompts, images=[photo, small], show=False)
    real = captured_model_mask(checkpoint, [photo, small], prompts)
    assert len(picture.sequences) == 2
    for row, sequence in enumerate(picture.sequences):
        assert torch.equal(sequence.mask, real[row])
    for sequence in picture.sequences:  # each cell summarises its part of the real mask
        for i, row in enumerate(sequence.blocks):
            for j, col in enumerate(sequence.blocks):
                part = sequence.mask[row.start : row.end, col.start : col.end]
                expected = FULL if bool(part.all()) else PARTIAL if bool(part.any()) else EMPTY
                assert sequence.block_matrix()[i][j] == expected == sequence.cell(row, col)
    # The shorter prompt is left-padded: its padding is one block nobody attends to.
    padded = picture.sequences[1]
    assert padded.blocks[0].kind == "pad"
    assert all(state == EMPTY for state in (row[0] for row in padded.block_matrix()))


def test_sliding_window_is_the_models_too(checkpoint, photo, tmp_path):
    import json
    import shutil

    windowed = tmp_path / "windowed"
    shutil.copytree(checkpoint, windowed)
    config = json.loads((windowed / "config.json").read_text())
    config["text_config"]["sliding_window"] = 8
    (windowed / "config.json").write_text(json.dumps(config))
    picture = AttentionMaskVisualizer(str(windowed))(PROMPT, images=photo, show=False)
    real = captured_model_mask(windowed, [photo], [PROMPT])
    assert torch.equal(picture.sequences[0].mask, real[0])
    assert picture.sliding_window == 8 and "sliding window: 8 tokens" in picture.to_ansi()
    last = picture.sequences[0].mask[-1]
    assert int(last.sum()) == 8  # the last token sees only the 8 before it (itself included)


def test_image_tokens_collapse_into_one_causal_block(viz, checkpoint, photo):
    from llava_next_plugin import LlavaNextConfig

    picture = viz(PROMPT, images=photo, show=False)
    sequence = picture.sequences[0]
    images = [b for b in sequence.blocks if b.kind == "image"]
    assert len(images) == 1
    geometry = LlavaNextConfig.from_pretrained(str(checkpoint)).image_geometry(photo.height, photo.width)
    assert images[0].label == geometry.describe()
    assert images[0].size == geometry.num_tokens
    assert len(sequence.blocks) == len(sequence.tokens) - geometry.num_tokens + 1
    at = sequence.blocks.index(images[0])
    matrix = sequence.block_matrix()
    assert matrix[at][at] == PARTIAL  # causal inside the block, not bidirectional
    assert all(matrix[at][j] == EMPTY for j in range(at + 1, len(sequence.blocks)))
    assert all(matrix[j][at] == FULL for j in range(at + 1, len(sequence.blocks)))


def test_llava_v16_mistral_geometry_label(checkpoint, tmp_path):
    """A 1024x768 image on llava-v1.6-mistral's geometry (CLIP 336/14) reads as the doc's 2340 tokens."""
    from transformers import AutoTokenizer, CLIPVisionConfig, MistralConfig

    from llava_next_plugin import LlavaNextConfig, LlavaNextImageProcessorFast, LlavaNextProcessor

    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=336,
            patch_size=14,
        ).to_dict(),
        text_config=MistralConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=32064,
        ).to_dict(),
        image_grid_pinpoints=checkpoints.REAL_PINPOINTS,
    )
    config.save_pretrained(str(tmp_path))
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorFast(
            size={"shortest_edge": 336},
            crop_size={"height": 336, "width": 336},
            image_grid_pinpoints=checkpoints.REAL_PINPOINTS,
        ),
        tokenizer=AutoTokenizer.from_pretrained(str(checkpoint)),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(str(tmp_path))
    picture = AttentionMaskVisualizer(str(tmp_path))(PROMPT, show=False)  # a generated 1024x768 image
    assert DEFAULT_IMAGE_SIZE == (1024, 768)
    labels = [b.label for b in picture.sequences[0].blocks if b.kind == "image"]
    assert labels == ["<image> x2340 = base 576 + tiles 1728 + newlines 36"]
    assert "<image> x2340 = base 576 + tiles 1728 + newlines 36" in picture.to_ansi()


def test_renders_ansi_html_and_png(viz, photo, capsys):
    picture = viz(PROMPT, images=photo)  # in a terminal: printed
    printed = capsys.readouterr().out
    assert "\033[" in printed and "<image> x" in printed and "▁What" in printed
    assert str(picture) == picture.to_ansi() == printed.rstrip("\n")
    page = picture._repr_html_()
    assert page.startswith("<div") and "<table" in page and "&lt;image&gt; x" in page
    png = picture.to_png()
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.width > 100 and image.height > 100
    assert viz._repr_html_() == picture.to_html()


def test_save_picks_the_format_from_the_suffix(viz, photo, tmp_path):
    picture = viz(PROMPT, images=photo, show=False)
    picture.save(tmp_path / "mask.png")
    picture.save(tmp_path / "mask.html")
    picture.save(tmp_path / "mask.txt")
    assert Image.open(tmp_path / "mask.png").format == "PNG"
    assert (tmp_path / "mask.html").read_text().startswith("<div")
    assert (tmp_path / "mask.txt").read_text() == picture.to_ansi()


class _CsvRenderer:
    @hookimpl
    def llava_next_render_attention_mask(self, mask, fmt):
        if fmt == "csv":
            return "\n".join(",".join(row) for row in mask.sequences[0].block_matrix())
        if fmt == "ansi":
            return "plain text from a plugin"
        return None


def test_renderers_are_plugins_and_third_party_ones_win(viz, photo):
    picture = viz(PROMPT, images=photo, show=False)
    builtin = picture.to_ansi()
    manager = get_plugin_manager()
    plugin = _CsvRenderer()
    manager.register(plugin)
    try:
        assert picture.render("csv").splitlines()[0].startswith("full,")
        assert picture.to_ansi() == "plain text from a plugin"
        assert picture.to_png().startswith(b"\x89PNG")  # the built-in still draws what the plugin passes on
    finally:
        manager.unregister(plugin)
    assert picture.to_ansi() == builtin
    with pytest.raises(InputError, match="no renderer draws the format 'svg'"):
        picture.render("svg")


class _WrongTypes:
    @hookimpl
    def llava_next_render_attention_mask(self, mask, fmt):
        return 7  # a bug: neither text nor PNG bytes


def test_a_renderer_returning_the_wrong_type_is_a_typed_error_naming_the_format(viz, photo):
    picture = viz(PROMPT, images=photo, show=False)
    manager = get_plugin_manager()
    plugin = _WrongTypes()
    manager.register(plugin)
    try:
        with pytest.raises(InputError, match="the renderer of 'ansi' returned int, not str"):
            str(picture)
        with pytest.raises(InputError, match="the renderer of 'png' returned int, not bytes"):
            picture.to_png()
    finally:
        manager.unregister(plugin)


def test_takes_a_loaded_model_and_works_offline_without_an_image(checkpoint):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(checkpoint))
    picture = AttentionMaskVisualizer(model)(PROMPT, show=False)
    assert isinstance(picture, MaskPicture)
    assert [b.kind for b in picture.sequences[0].blocks].count("image") == 1
    text_only = AttentionMaskVisualizer(model)("no image here", show=False)
    assert all(b.kind == "text" for b in text_only.sequences[0].blocks)


def test_reachable_through_transformers_import_path(checkpoint):
    from transformers.utils import attention_visualizer

    built = attention_visualizer.AttentionMaskVisualizer(str(checkpoint))
    assert isinstance(built, AttentionMaskVisualizer)
    llava_next_plugin.unregister()
    try:
        early = attention_visualizer.AttentionMaskVisualizer  # imported before `import llava_next_plugin`
        assert early.__module__ == "transformers.utils.attention_visualizer" and "__new__" not in vars(early)
    finally:
        llava_next_plugin.register()
    assert isinstance(early(str(checkpoint)), AttentionMaskVisualizer)


def test_a_suffix_is_appended_to_the_prompt_as_in_transformers_visualizer(viz, photo):
    whole = viz(PROMPT + " Answer:", images=photo, show=False)
    for picture in (
        viz(PROMPT, " Answer:", images=photo, show=False),
        viz.visualize_attention_mask(PROMPT, suffix=" Answer:", images=photo, show=False),
    ):
        assert [s.tokens for s in picture.sequences] == [s.tokens for s in whole.sequences]
    with pytest.raises(InputError, match=r"suffix must be a string .* \(images go in images=\)"):
        viz(PROMPT, photo, show=False)


def test_transformers_img_placeholder_stands_for_an_image_and_an_empty_prompt_is_said(viz, photo):
    """transformers' visualizer takes ``<img>`` for the processor's image token: ours draws an image block there
    too. A prompt with no token at all is refused with a typed error (the renderers had nothing to draw)."""
    picture = viz("<img> What is shown?", images=photo, show=False)
    assert picture.to_ansi() == viz("<image> What is shown?", images=photo, show=False).to_ansi()
    assert any(block.kind == "image" for block in picture.sequences[0].blocks)
    bos = viz.processor.tokenizer.add_bos_token
    try:
        viz.processor.tokenizer.add_bos_token = False  # as a Qwen tokenizer: nothing added to an empty prompt
        with pytest.raises(InputError, match="the prompt is empty"):
            viz("", show=False)
    finally:
        viz.processor.tokenizer.add_bos_token = bos


def test_touching_images_are_a_block_each_and_a_long_prompt_stays_a_readable_size(viz, photo):
    small = photo.resize((30, 80))
    picture = viz("<image><image> compare", images=[photo, small], show=False)
    config = viz._geometry_config()
    images = [b.label for b in picture.sequences[0].blocks if b.kind == "image"]
    assert images == [config.image_geometry(im.height, im.width).describe() for im in (photo, small)]

    long = viz("<image> " + "word " * 2000, images=small, show=False).sequences[0]
    assert len(long.blocks) <= MAX_BLOCKS
    assert [b.start for b in long.blocks[1:]] == [b.end for b in long.blocks[:-1]]  # every position, in order
    assert long.blocks[-1].end == len(long.tokens) and any(b.kind == "text" and b.size > 1 for b in long.blocks)
    assert len(long.mask) == len(long.tokens) and len(MaskPicture("t", [long]).to_html()) < 5_000_000


def test_bad_input(viz, photo, tmp_path):
    with pytest.raises(InputError, match="1 <image> placeholder\\(s\\) but 2 image"):
        viz(PROMPT, images=[photo, photo], show=False)
    with pytest.raises(InputError, match="prompt string"):
        viz([], show=False)
    with pytest.raises(InputError, match="'.*nowhere' does not exist: give a checkpoint folder"):
        AttentionMaskVisualizer(str(tmp_path / "nowhere"))  # not transformers' "Repo id must be in the form..."
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="has no config.json"):
        AttentionMaskVisualizer(str(tmp_path / "empty"))
