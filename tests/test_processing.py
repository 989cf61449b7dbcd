"""LlavaNextProcessor: the same input_ids as transformers' processor, exact token counts, clear errors."""

from __future__ import annotations

import json
import shutil

import checkpoints
import numpy as np
import pytest
import torch
from PIL import Image

import llava_next_plugin
from llava_next_plugin.configuration import LlavaNextConfig
from llava_next_plugin.errors import ImageError, InputError
from llava_next_plugin.image_processing import LlavaNextImageProcessor
from llava_next_plugin.processing import LlavaNextProcessor

PROMPT_ONE = "[INST] <image>\nWhat is shown here? [/INST]"
PROMPT_TWO = "[INST] Compare <image> with <image>, please. [/INST]"
# Tolerance of our torch processor against transformers' torchvision one (issue 2, item 5).
PIXEL_ATOL = 0.05


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def reference_processor(folder):
    """transformers' own LlavaNextProcessor, with transformers' own image processor."""
    import transformers

    with llava_next_plugin.use_transformers_builtins():
        return transformers.LlavaNextProcessor.from_pretrained(str(folder))


def assert_same_text_side(ours, ref):
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    assert ours["attention_mask"].tolist() == ref["attention_mask"].tolist()


def assert_same_images(ours, ref):
    assert ours["image_sizes"].tolist() == ref["image_sizes"].tolist()
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max().item() <= PIXEL_ATOL


@pytest.fixture(scope="module")
def clip_folder(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def siglip_folder(tiny_checkpoint_factory):
    return tiny_checkpoint_factory(vision="siglip", strategy="full")


@pytest.fixture(scope="module")
def clip_pair(clip_folder):
    return LlavaNextProcessor.from_pretrained(clip_folder), reference_processor(clip_folder)


@pytest.fixture(scope="module")
def siglip_pair(siglip_folder):
    return LlavaNextProcessor.from_pretrained(siglip_folder), reference_processor(siglip_folder)


def image_token_count(batch, row: int = 0) -> int:
    return int((batch["input_ids"][row] == checkpoints.IMAGE_TOKEN_ID).sum())


# --- parity with transformers' processor ---------------------------------------------------------
def test_single_image_matches_reference(clip_pair):
    ours, ref = clip_pair
    image = checkpoints.real_photo("chelsea.png")
    out = ours(images=image, text=PROMPT_ONE, return_tensors="pt")
    expected = ref(images=image, text=PROMPT_ONE, return_tensors="pt")
    assert_same_text_side(out, expected)
    assert_same_images(out, expected)
    assert type(ours.image_processor).__name__ == "LlavaNextImageProcessorFast"


@pytest.mark.parametrize("size", [(1, 1), (1, 1000), (1000, 1), (33, 65), (97, 31), (64, 64), (300, 451)])
def test_token_count_is_the_models_geometry(clip_pair, clip_folder, size):
    """Each image's <image> run has exactly the length the model's config gives for its size."""
    ours, ref = clip_pair
    height, width = size
    image = random_image(height, width)
    out = ours(images=image, text=PROMPT_ONE, return_tensors="pt")
    config = LlavaNextConfig.from_pretrained(clip_folder)
    assert image_token_count(out) == config.image_geometry(height, width).num_tokens
    assert_same_text_side(out, ref(images=image, text=PROMPT_ONE, return_tensors="pt"))


def test_several_images_per_prompt_and_mixed_batch_left_padded(clip_pair):
    ours, ref = clip_pair
    images = [random_image(30, 50, 1), random_image(100, 20, 2), random_image(7, 7, 3)]
    texts = [PROMPT_ONE, PROMPT_TWO]
    kwargs = dict(return_tensors="pt", padding=True, padding_side="left")
    out = ours(images=images, text=texts, **kwargs)
    assert_same_text_side(out, ref(images=images, text=texts, **kwargs))
    assert_same_images(out, ref(images=images, text=texts, **kwargs))
    assert out["pixel_values"].shape[0] == 3
    # Left padded: the shorter prompt starts with pad tokens, the longer one does not.
    shorter = int(out["attention_mask"].sum(-1).argmin())
    assert out["attention_mask"][shorter, 0] == 0 and out["attention_mask"][shorter, -1] == 1
    assert out["input_ids"][shorter, 0] == checkpoints.PAD_TOKEN_ID
    # Without padding_side, the tokenizer's own side, as the reference
    default = dict(return_tensors="pt", padding=True)
    assert_same_text_side(ours(images=images, text=texts, **default), ref(images=images, text=texts, **default))


def test_images_given_per_prompt(clip_pair):
    """A list of image lists (what apply_chat_template builds) equals the flat list in order."""
    ours, _ = clip_pair
    a, b, c = random_image(30, 50, 1), random_image(100, 20, 2), random_image(7, 7, 3)
    texts = [PROMPT_ONE, PROMPT_TWO]
    nested = ours(images=[[a], [b, c]], text=texts, return_tensors="pt", padding=True)
    flat = ours(images=[a, b, c], text=texts, return_tensors="pt", padding=True)
    assert nested["input_ids"].tolist() == flat["input_ids"].tolist()
    assert torch.equal(nested["pixel_values"], flat["pixel_values"])
    # a prompt's list may hold a 4-d batch of images: its images, counted as such
    batch = np.stack([np.asarray(b.resize((20, 100))), np.asarray(c.resize((20, 100)))])
    batched = ours(images=[[a], [batch]], text=texts, return_tensors="pt", padding=True)
    listed = ours(images=[[a], list(batch)], text=texts, return_tensors="pt", padding=True)
    assert batched["input_ids"].tolist() == listed["input_ids"].tolist()
    assert torch.equal(batched["pixel_values"], listed["pixel_values"])


def test_unpadded_images_of_different_tile_counts_come_back_as_a_list_the_model_takes(clip_pair, clip_folder):
    """do_pad=False with return_tensors="pt": one tensor per image (they cannot stack); the model gives the same
    logits as from the padded 5-d tensor."""
    from llava_next_plugin.modeling import LlavaNextForConditionalGeneration

    ours, _ = clip_pair
    images, texts = [random_image(30, 50, 1), random_image(100, 20, 2)], ["<image> a", "<image> b"]
    ragged = ours(images=images, text=texts, return_tensors="pt", padding=True, do_pad=False)
    padded = ours(images=images, text=texts, return_tensors="pt", padding=True)
    assert isinstance(ragged["pixel_values"], list)
    assert [t.shape[0] for t in ragged["pixel_values"]] != [padded["pixel_values"].shape[1]] * 2
    model = LlavaNextForConditionalGeneration.from_pretrained(clip_folder).eval()
    with torch.no_grad():
        assert torch.equal(model(**ragged).logits, model(**padded).logits)


def test_full_strategy_with_siglip_matches_reference(siglip_pair, siglip_folder):
    ours, ref = siglip_pair
    assert (ours.vision_feature_select_strategy, ours.num_additional_image_tokens) == ("full", 0)
    images = [random_image(40, 90, 4), random_image(64, 20, 5), checkpoints.real_photo("chelsea.png")]
    texts = [PROMPT_TWO, PROMPT_ONE]
    kwargs = dict(return_tensors="pt", padding=True, padding_side="left")
    out = ours(images=images, text=texts, **kwargs)
    expected = ref(images=images, text=texts, **kwargs)
    assert_same_text_side(out, expected)
    assert_same_images(out, expected)
    config = LlavaNextConfig.from_pretrained(siglip_folder)
    assert image_token_count(out, 1) == config.image_geometry(300, 451).num_tokens


def test_text_only_prompt(clip_pair):
    ours, ref = clip_pair
    out = ours(text="[INST] Hello there [/INST]", return_tensors="pt")
    assert_same_text_side(out, ref(text="[INST] Hello there [/INST]", return_tensors="pt"))
    assert "pixel_values" not in out


def test_return_tensors_none_gives_lists(clip_pair):
    """As transformers: token ids as lists, one pixel tensor per image, sizes as (height, width) tuples."""
    ours, ref = clip_pair
    images = [random_image(20, 45), random_image(60, 30)]
    for do_pad in (True, False):
        out = ours(images=images, text=PROMPT_TWO, do_pad=do_pad)
        expected = ref(images=images, text=PROMPT_TWO, do_pad=do_pad)
        assert out["input_ids"] == expected["input_ids"]
        assert isinstance(out["input_ids"], list)
        assert out["image_sizes"] == expected["image_sizes"] == [(20, 45), (60, 30)]
        assert type(out["pixel_values"]) is type(expected["pixel_values"]) is list
        for mine, theirs in zip(out["pixel_values"], expected["pixel_values"], strict=True):
            assert type(mine) is type(theirs) and mine.shape == theirs.shape
            torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    for processor in (ours.image_processor, LlavaNextImageProcessor(**ours.image_processor.to_dict())):
        alone = processor(images)  # the PIL processor gives numpy arrays, as transformers' PIL one does
        assert alone["image_sizes"] == [(20, 45), (60, 30)] and len(alone["pixel_values"]) == 2


def test_apply_chat_template_matches_reference(clip_pair):
    ours, ref = clip_pair
    image = random_image(50, 30)
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}
    ]
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert ours.apply_chat_template(conversation) == ref.apply_chat_template(conversation)
    out = ours.apply_chat_template(conversation, **kwargs)
    expected = ref.apply_chat_template(conversation, **kwargs)
    assert_same_text_side(out, expected)
    assert_same_images(out, expected)


def test_num_image_tokens_without_pixels(clip_pair, clip_folder):
    ours, ref = clip_pair
    config = LlavaNextConfig.from_pretrained(clip_folder)
    sizes = [(1, 1), (768, 1024), (31, 97)]
    assert [ours.num_image_tokens(h, w) for h, w in sizes] == [config.image_geometry(h, w).num_tokens for h, w in sizes]
    assert ours._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens == [
        config.image_geometry(h, w).num_tokens for h, w in sizes
    ]
    with pytest.raises(InputError, match="height 0 and width 5: image size must be at least 1x1"):
        ours.num_image_tokens(0, 5)


def test_pil_backend(clip_folder):
    processor = LlavaNextProcessor.from_pretrained(clip_folder, backend="pil")
    assert type(processor.image_processor).__module__ == "llava_next_plugin.image_processing"
    reference = reference_processor(clip_folder)
    image = random_image(33, 70)
    out = processor(images=image, text=PROMPT_ONE, return_tensors="pt")
    expected = reference(images=image, text=PROMPT_ONE, return_tensors="pt")
    assert_same_text_side(out, expected)
    assert_same_images(out, expected)


# --- folder layouts ------------------------------------------------------------------------------
def copy_folder(source, target):
    shutil.copytree(source, target)
    return target


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_save_nested_layout_loads_in_ours_and_transformers(clip_pair, tmp_path):
    ours, ref = clip_pair
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "LlavaNextProcessor"
    assert "image_processor" in saved
    assert (saved["patch_size"], saved["num_additional_image_tokens"]) == (8, 1)
    assert saved["vision_feature_select_strategy"] == "default"
    image = random_image(45, 30)
    reloaded = LlavaNextProcessor.from_pretrained(tmp_path)
    expected = ref(images=image, text=PROMPT_ONE, return_tensors="pt")
    assert_same_text_side(reloaded(images=image, text=PROMPT_ONE, return_tensors="pt"), expected)
    assert_same_text_side(reference_processor(tmp_path)(images=image, text=PROMPT_ONE, return_tensors="pt"), expected)


def test_save_separate_layout_loads_in_ours_and_transformers(clip_pair, tmp_path):
    ours, ref = clip_pair
    ours.save_pretrained(tmp_path, layout="separate")
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert "image_processor" not in saved and saved["patch_size"] == 8
    image_config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert image_config["image_grid_pinpoints"] == checkpoints.TINY_PINPOINTS
    image = random_image(45, 30)
    expected = ref(images=image, text=PROMPT_ONE, return_tensors="pt")
    reloaded = LlavaNextProcessor.from_pretrained(tmp_path)
    assert_same_text_side(reloaded(images=image, text=PROMPT_ONE, return_tensors="pt"), expected)
    assert_same_text_side(reference_processor(tmp_path)(images=image, text=PROMPT_ONE, return_tensors="pt"), expected)
    with pytest.raises(ValueError, match="layout"):
        ours.save_pretrained(tmp_path / "x", layout="flat")


def test_missing_settings_are_derived_from_config_json(clip_pair, clip_folder, tmp_path):
    """Where the reference silently drops CLIP's extra token, ours reads it off config.json."""
    ours, ref = clip_pair
    folder = copy_folder(clip_folder, tmp_path / "ckpt")
    edit_json(folder / "processor_config.json", num_additional_image_tokens=None)
    image = random_image(40, 40)
    expected = ref(images=image, text=PROMPT_ONE, return_tensors="pt")
    derived = LlavaNextProcessor.from_pretrained(folder)
    assert derived.num_additional_image_tokens == 1
    assert_same_text_side(derived(images=image, text=PROMPT_ONE, return_tensors="pt"), expected)
    # transformers' processor counts one token fewer per image from this folder.
    silent = reference_processor(folder)(images=image, text=PROMPT_ONE, return_tensors="pt")
    assert image_token_count(silent) == image_token_count(expected) - 1


def test_older_layout_without_processor_config(clip_pair, siglip_folder, tmp_path):
    """llava-hf's older folders: preprocessor_config.json and no processor settings at all."""
    ours, _ = clip_pair
    folder = tmp_path / "old"
    ours.save_pretrained(folder, layout="separate")
    (folder / "processor_config.json").unlink()
    shutil.copy(siglip_folder / "config.json", folder / "config.json")
    loaded = LlavaNextProcessor.from_pretrained(folder)
    assert (loaded.patch_size, loaded.vision_feature_select_strategy, loaded.num_additional_image_tokens) == (
        8,
        "full",
        0,
    )
    assert type(loaded.image_processor).__name__ == "LlavaNextImageProcessorFast"
    config = LlavaNextConfig.from_pretrained(siglip_folder)
    out = loaded(images=random_image(20, 70), text=PROMPT_ONE, return_tensors="pt")
    assert image_token_count(out) == config.image_geometry(20, 70).num_tokens


def test_missing_settings_without_config_json_name_the_keys(clip_folder, tmp_path):
    folder = copy_folder(clip_folder, tmp_path / "ckpt")
    (folder / "config.json").unlink()
    edit_json(folder / "processor_config.json", patch_size=None, num_additional_image_tokens=None)
    with pytest.raises(ValueError, match="patch_size, num_additional_image_tokens") as error:
        LlavaNextProcessor.from_pretrained(folder)
    assert "processor_config.json" in str(error.value)
    # Passing them is the other fix.
    loaded = LlavaNextProcessor.from_pretrained(folder, patch_size=8, num_additional_image_tokens=1)
    assert (loaded.patch_size, loaded.num_additional_image_tokens) == (8, 1)


def test_settings_contradicting_config_json_are_refused(clip_folder, tmp_path):
    folder = copy_folder(clip_folder, tmp_path / "ckpt")
    edit_json(folder / "processor_config.json", num_additional_image_tokens=0)
    with pytest.raises(ValueError, match="num_additional_image_tokens=0.*gives 1"):
        LlavaNextProcessor.from_pretrained(folder)


def test_an_override_passed_to_from_pretrained_wins_over_both_files_as_in_transformers(clip_folder, caplog):
    """A model loaded with ``vision_feature_select_strategy="full"`` needs a processor that counts the same way."""
    import transformers

    settings = {"vision_feature_select_strategy": "full", "num_additional_image_tokens": 0}
    with caplog.at_level("WARNING", logger="llava_next_plugin.processing"):
        ours = LlavaNextProcessor.from_pretrained(clip_folder, **settings)
    theirs = transformers.models.llava_next.LlavaNextProcessor.from_pretrained(clip_folder, **settings)
    for key, value in settings.items():
        assert getattr(ours, key) == getattr(theirs, key) == value
    assert "overrides the model's config.json" in caplog.text
    image, text = Image.new("RGB", (40, 30)), "<image> what?"
    assert ours(images=image, text=text)["input_ids"] == theirs(images=image, text=text)["input_ids"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_follows_the_tokenizers_side_as_in_transformers(clip_folder, side):
    """A tokenizer set to pad on the right (training batches) pads on the right here too."""
    ours, theirs = LlavaNextProcessor.from_pretrained(clip_folder), reference_processor(clip_folder)
    ours.tokenizer.padding_side = theirs.tokenizer.padding_side = side
    image = Image.new("RGB", (40, 30))
    kwargs = dict(images=[image, image], text=["<image> hi", "<image> hello there friend"], padding=True)
    mine, reference = ours(**kwargs, return_tensors="pt"), theirs(**kwargs, return_tensors="pt")
    assert torch.equal(mine["input_ids"], reference["input_ids"])
    assert torch.equal(mine["attention_mask"], reference["attention_mask"])
    assert bool(mine["attention_mask"][0, -1]) == (side == "left")


def test_constructing_without_settings_is_refused(clip_pair):
    ours, _ = clip_pair
    with pytest.raises(ValueError, match="needs vision_feature_select_strategy to count"):
        LlavaNextProcessor(ours.image_processor, ours.tokenizer, patch_size=8)
    with pytest.raises(ValueError, match="'default', 'full'"):
        LlavaNextProcessor(ours.image_processor, ours.tokenizer, 8, "cls", num_additional_image_tokens=1)


def _both_built_by_hand(clip_pair, **settings):
    """Ours and transformers' processor built from their constructors with the same arguments."""
    import transformers

    ours, ref = clip_pair
    return (
        LlavaNextProcessor(ours.image_processor, ours.tokenizer, **settings),
        transformers.LlavaNextProcessor(ref.image_processor, ref.tokenizer, **settings),
    )


def test_num_additional_image_tokens_defaults_to_zero_as_in_transformers(clip_pair):
    mine, theirs = _both_built_by_hand(clip_pair, patch_size=8, vision_feature_select_strategy="default")
    assert mine.num_additional_image_tokens == theirs.num_additional_image_tokens == 0
    image = random_image(60, 90)
    out, expected = mine(images=image, text=PROMPT_ONE), theirs(images=image, text=PROMPT_ONE)
    assert out["input_ids"] == expected["input_ids"]


@pytest.mark.parametrize("patch_size", [5, 6, 7])
def test_tile_not_a_whole_number_of_patches_counts_as_transformers(clip_pair, patch_size):
    """32 px tiles of 5, 6 or 7 px patches: the remainder is dropped (floor), by both."""
    mine, theirs = _both_built_by_hand(
        clip_pair, patch_size=patch_size, vision_feature_select_strategy="default", num_additional_image_tokens=1
    )
    for height, width in [(60, 90), (110, 40), (32, 32)]:
        image = random_image(height, width)
        out, expected = mine(images=image, text=PROMPT_ONE), theirs(images=image, text=PROMPT_ONE)
        assert out["input_ids"] == expected["input_ids"]


# --- errors --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ours(clip_pair):
    return clip_pair[0]


def test_more_images_than_placeholders(ours):
    images = [random_image(10, 10), random_image(12, 12)]
    with pytest.raises(InputError, match=r"2 image\(s\) given but the text has 1 <image>.*sample 0: 1"):
        ours(images=images, text=PROMPT_ONE)


def test_fewer_images_than_placeholders(ours):
    with pytest.raises(InputError, match=r"1 image\(s\) given.*3 <image>.*sample 0: 1, sample 1: 2"):
        ours(images=[random_image(10, 10)], text=[PROMPT_ONE, PROMPT_TWO], padding=True)


def test_per_prompt_image_lists_name_the_sample(ours):
    a, b = random_image(10, 10), random_image(12, 12)
    with pytest.raises(InputError, match=r"sample 1 has 2 <image> placeholder\(s\) but 1 image"):
        ours(images=[[a], [b]], text=[PROMPT_ONE, PROMPT_TWO], padding=True)
    with pytest.raises(InputError, match="2 lists.*3 prompts"):
        ours(images=[[a], [b]], text=[PROMPT_ONE, PROMPT_TWO, PROMPT_ONE], padding=True)


def test_placeholders_without_images(ours):
    with pytest.raises(InputError, match="no images were given"):
        ours(text=PROMPT_TWO)


def test_images_without_placeholders(ours):
    with pytest.raises(InputError, match=r"1 image\(s\) given but the text has 0 <image>"):
        ours(images=random_image(10, 10), text="no placeholder")


@pytest.mark.parametrize("text", [42, [PROMPT_ONE, None], [b"bytes"], {"text": "x"}])
def test_non_string_text(ours, text):
    with pytest.raises(InputError, match="text must be a string or a list of strings") as error:
        ours(text=text)
    assert isinstance(error.value, ValueError)


def test_images_as_paths_and_bytes(ours, tmp_path):
    """Paths and encoded bytes go through the image sources (llava_next_plugin.images)."""
    import io

    image = random_image(30, 50)
    path = tmp_path / "a.png"
    image.save(path)
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    expected = ours(images=[image, image], text=PROMPT_TWO, return_tensors="pt")
    out = ours(images=[str(path), encoded.getvalue()], text=PROMPT_TWO, return_tensors="pt")
    assert out["input_ids"].tolist() == expected["input_ids"].tolist()
    assert torch.equal(out["pixel_values"], expected["pixel_values"])
    with pytest.raises(ImageError, match="^image 1: ") as error:
        ours(images=[image, b"not an image at all"], text=PROMPT_TWO)
    assert error.value.index == 1


def test_image_and_text_swapped(ours):
    with pytest.raises(InputError, match=r"processor\(images=\.\.\., text=\.\.\.\)"):
        ours(PROMPT_ONE, random_image(10, 10))


def test_truncation_into_image_tokens_is_refused(ours):
    with pytest.raises(InputError, match="truncation cut into the image tokens"):
        ours(images=random_image(64, 64), text=PROMPT_ONE, truncation=True, max_length=8)


def test_overflowing_tokens_are_refused_with_images_and_kept_without(ours):
    long_text = PROMPT_ONE + " hello world" * 40
    with pytest.raises(InputError, match="return_overflowing_tokens splits a sample") as error:
        ours(
            images=random_image(64, 64), text=long_text, truncation=True, max_length=80, return_overflowing_tokens=True
        )
    assert error.value.param == "return_overflowing_tokens"
    # a text-only sample overflowing beside an image sample that fits: the image sample keeps its one row
    beside = ours(
        images=random_image(64, 64),
        text=[PROMPT_ONE, " hello world" * 200],
        truncation=True,
        max_length=len(ours(images=random_image(64, 64), text=PROMPT_ONE)["input_ids"][0]) + 4,
        return_overflowing_tokens=True,
    )
    assert len(beside["input_ids"]) > 2 and list(beside["overflow_to_sample_mapping"]).count(0) == 1
    text_only = "hello world" * 40
    out = ours(text=text_only, truncation=True, max_length=16, return_overflowing_tokens=True)
    assert (
        len(out["input_ids"]) > 1
        and out["input_ids"]
        == ours.tokenizer(text_only, truncation=True, max_length=16, return_overflowing_tokens=True)["input_ids"]
    )


def test_partial_edge_tiles_give_transformers_input_ids_and_pixel_values(clip_pair):
    """crop_size 18 with llava-v1.6's pinpoints (not multiples of 18): the same views and image tokens."""
    import transformers

    from llava_next_plugin.image_processing_fast import LlavaNextImageProcessorFast

    ours, ref = clip_pair
    partial = dict(
        size={"shortest_edge": 20},
        crop_size={"height": 18, "width": 18},
        image_grid_pinpoints=checkpoints.REAL_PINPOINTS,
    )
    settings = dict(patch_size=6, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    mine = LlavaNextProcessor(LlavaNextImageProcessorFast(**partial), ours.tokenizer, **settings)
    theirs = transformers.LlavaNextProcessor(transformers.LlavaNextImageProcessor(**partial), ref.tokenizer, **settings)
    image = random_image(100, 350)
    out = mine(images=image, text=PROMPT_ONE, return_tensors="pt")
    expected = theirs(images=image, text=PROMPT_ONE, return_tensors="pt")
    assert out["pixel_values"].shape == expected["pixel_values"].shape == (1, 1 + 38 * 19, 3, 18, 18)
    assert_same_text_side(out, expected)
    assert_same_images(out, expected)


# --- OpenAI's detail: the base view's tokens only ------------------------------------------------------------
def test_image_detail_low_expands_to_the_base_view_and_leaves_the_pixels_alone(ours, clip_folder):
    images = [random_image(33, 65), random_image(97, 31, seed=1)]
    base = ours.image_geometry(33, 65).base_tokens
    full = ours(images=images, text=PROMPT_TWO, return_tensors="pt")
    low = ours(images=images, text=PROMPT_TWO, return_tensors="pt", image_detail="low")
    mixed = ours(images=images, text=PROMPT_TWO, return_tensors="pt", image_detail=["high", "low"])
    assert image_token_count(low) == 2 * base == 2 * ours.num_image_tokens(33, 65, detail="low")
    assert image_token_count(mixed) == ours.num_image_tokens(33, 65) + base
    assert image_token_count(full) == ours.num_image_tokens(33, 65) + ours.num_image_tokens(97, 31)
    for batch in (low, mixed):
        assert torch.equal(batch["pixel_values"], full["pixel_values"])
        assert batch["image_sizes"].tolist() == full["image_sizes"].tolist()
    text_ids = [t for t in full["input_ids"][0].tolist() if t != checkpoints.IMAGE_TOKEN_ID]
    assert [t for t in low["input_ids"][0].tolist() if t != checkpoints.IMAGE_TOKEN_ID] == text_ids
    for auto in ("auto", ["high", "auto"]):
        same = ours(images=images, text=PROMPT_TWO, return_tensors="pt", image_detail=auto)
        assert torch.equal(same["input_ids"], full["input_ids"])


def test_unknown_image_detail_names_the_accepted_values(ours):
    with pytest.raises(InputError, match="'low', 'high', 'auto'"):
        ours(images=random_image(40, 40), text=PROMPT_ONE, image_detail="medium")
    with pytest.raises(InputError, match="image_detail has 1 values for 2 image"):
        ours(images=[random_image(40, 40)] * 2, text=PROMPT_TWO, image_detail=["low"])


# --- one hub-lookup rule: the same keywords reach every file lookup ---------------------------------------
def _hub_cache(source, cache_dir):
    """A hub cache (as huggingface_hub lays it out) of repo ``acme/tiny`` with two revisions: ``main`` is
    *source*; ``v2`` has one more tokenizer token, another image mean, and no patch_size in its
    processor_config.json, so it comes from v2's config.json (where it is 16, not 8)."""
    from transformers import AutoTokenizer

    repo = cache_dir / "models--acme--tiny"
    for revision, commit in (("main", "a" * 40), ("v2", "b" * 40)):
        snapshot = repo / "snapshots" / commit
        shutil.copytree(source, snapshot)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
    v2 = repo / "snapshots" / ("b" * 40)
    tokenizer = AutoTokenizer.from_pretrained(str(v2))
    tokenizer.add_tokens(["<v2-only>"])
    tokenizer.save_pretrained(str(v2))
    processor_config = json.loads((v2 / "processor_config.json").read_text())
    processor_config["image_processor"]["image_mean"] = [0.25, 0.25, 0.25]
    del processor_config["patch_size"]
    (v2 / "processor_config.json").write_text(json.dumps(processor_config))
    config = json.loads((v2 / "config.json").read_text())
    config["vision_config"]["patch_size"] = 16
    (v2 / "config.json").write_text(json.dumps(config))
    return cache_dir


@pytest.mark.parametrize("revision", ["main", "v2"])
def test_hub_keywords_reach_the_tokenizer_the_image_processor_and_config_json_alike(clip_folder, tmp_path, revision):
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    cache = _hub_cache(clip_folder, tmp_path / "cache")
    where = {"cache_dir": str(cache), "revision": revision, "local_files_only": True}
    v2 = revision == "v2"
    expected_vocab = len(AutoTokenizer.from_pretrained(str(clip_folder))) + (1 if v2 else 0)
    main_mean = list(LlavaNextProcessor.from_pretrained(str(clip_folder)).image_processor.image_mean)
    expected_mean = [0.25] * 3 if v2 else main_mean
    assert main_mean != [0.25] * 3
    for processor in (
        LlavaNextProcessor.from_pretrained("acme/tiny", **where),
        AutoProcessor.from_pretrained("acme/tiny", **where),
    ):
        assert isinstance(processor, LlavaNextProcessor)
        assert len(processor.tokenizer) == expected_vocab
        assert list(processor.image_processor.image_mean) == expected_mean
        assert processor.patch_size == (16 if v2 else checkpoints.TINY_PATCH)
    image_processor = AutoImageProcessor.from_pretrained("acme/tiny", **where)
    assert type(image_processor).__module__ == "llava_next_plugin.image_processing_fast"
    assert list(image_processor.image_mean) == expected_mean


@pytest.mark.parametrize(
    "kwargs, module",
    [
        ({}, "image_processing_fast"),
        ({"use_fast": True}, "image_processing_fast"),
        ({"use_fast": False}, "image_processing"),
        ({"backend": "torchvision"}, "image_processing_fast"),
        ({"backend": "pil"}, "image_processing"),
        ({"backend": "pil", "use_fast": True}, "image_processing"),  # backend wins, as in transformers
        ({"backend": "torch"}, "image_processing_fast"),
        ({"backend": "slow"}, "image_processing"),
    ],
)
def test_use_fast_and_backend_pick_the_same_class_through_every_entry_point(clip_folder, kwargs, module):
    from transformers import AutoImageProcessor, AutoProcessor

    expected = f"llava_next_plugin.{module}"
    for loaded in (
        LlavaNextProcessor.from_pretrained(str(clip_folder), **kwargs).image_processor,
        AutoProcessor.from_pretrained(str(clip_folder), **kwargs).image_processor,
        AutoImageProcessor.from_pretrained(str(clip_folder), **kwargs),
    ):
        assert type(loaded).__module__ == expected


def test_unknown_backend_is_refused_by_our_processor_naming_the_accepted_ones(clip_folder):
    with pytest.raises(InputError, match="'torchvision'.*'pil'"):
        LlavaNextProcessor.from_pretrained(str(clip_folder), backend="opencv")


def test_pinpoints_for_one_call_are_refused_when_tokens_are_counted(clip_pair):
    """The model tiles with its config's pinpoints: other ones for one call would give features that do not
    match the image tokens (transformers counts with the configured ones while tiling with the given ones)."""
    ours, _ = clip_pair
    image = Image.new("RGB", (90, 30))
    other = [[32, 96], [32, 32]]
    assert other != ours.image_processor.image_grid_pinpoints
    with pytest.raises(InputError, match="image_grid_pinpoints=.*for this call only") as info:
        ours(images=image, text="<image> what?", image_grid_pinpoints=other)
    assert info.value.param == "image_grid_pinpoints"
    # the configured ones, or images alone (no tokens to count), are fine
    same = ours(images=image, text="<image> what?", image_grid_pinpoints=ours.image_processor.image_grid_pinpoints)
    assert same["input_ids"] == ours(images=image, text="<image> what?")["input_ids"]
    assert ours(images=image, image_grid_pinpoints=other, return_tensors="pt")["pixel_values"].ndim == 5


def test_replace_image_token_gives_the_expansion_of_the_reference(clip_pair):
    ours, theirs = clip_pair
    images = [random_image(30, 50, 1), random_image(100, 20, 2)]
    inputs = ours.image_processor(images, return_tensors="pt")
    for index in range(2):
        expansion = ours.replace_image_token(inputs, index)
        assert expansion == theirs.replace_image_token(theirs.image_processor(images, return_tensors="pt"), index)
        assert expansion.count(ours.image_token) == ours.num_image_tokens(*inputs["image_sizes"][index].tolist())
