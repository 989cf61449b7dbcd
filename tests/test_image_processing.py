"""LlavaNextImageProcessor (PIL + numpy) against transformers' ``LlavaNextImageProcessorPil``.

Same inputs through both; pixel values must agree within 1e-5 (max-abs), shapes and image sizes
exactly. Synthetic images cover odd and extreme sizes; scikit-image's photos cover real content.
"""

from __future__ import annotations

import io
import json

import checkpoints
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil as ReferencePil,
)

from llava_next_plugin import geometry
from llava_next_plugin.errors import ImageError, InputError
from llava_next_plugin.image_processing import LlavaNextImageProcessor, LlavaNextImageProcessorPil

TOLERANCE = 1e-5

# (height, width): tiny, extreme aspect ratios, odd sizes, around tile and pinpoint boundaries.
SIZES = [
    (1, 1),
    (1, 1000),
    (1000, 1),
    (2, 3),
    (7, 5),
    (13, 17),
    (31, 64),
    (99, 101),
    (200, 200),
    (223, 225),
    (300, 451),
    (336, 336),
    (337, 335),
    (335, 673),
    (480, 640),
    (500, 1500),
    (511, 1023),
    (640, 480),
    (671, 673),
    (768, 1024),
    (1000, 333),
    (1008, 336),
    (1009, 337),
    (1080, 1920),
    (1500, 500),
    (2000, 37),
]
WIDE_SIZES = [(1, 1), (1, 1000), (1000, 1), (333, 1400), (1400, 333), (700, 690), (1111, 1012), (3, 4000)]
REAL_PHOTOS = [
    "chelsea.png",
    "astronaut.png",
    "coffee.png",
    "rocket.jpg",
    "camera.png",
    "logo.png",
    "horse.png",
    "no_time_for_that_tiny.gif",
]


def settings(pinpoints=checkpoints.REAL_PINPOINTS, tile: int = 336, **extra) -> dict:
    """llava-hf's preprocessor settings for a tile size and pinpoint set."""
    return dict(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints, **extra
    )


def synthetic(height: int, width: int, seed: int = 0) -> Image.Image:
    """A gradient with noise and a hard edge: smooth and sharp content for the resamplers."""
    rng = np.random.default_rng(seed + height * 7919 + width)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 255 // max(width, 1), ys * 255 // max(height, 1), (xs + ys) % 256], axis=-1)
    noise = rng.integers(0, 64, size=(height, width, 3))
    pixels = (base + noise) % 256
    pixels[:, : width // 3] //= 2
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def run_both(images, **kwargs):
    ours = LlavaNextImageProcessor(**kwargs)(images, return_tensors="np")
    ref = ReferencePil(**kwargs)(images, return_tensors="np")
    return ours, ref


def assert_matches_reference(ours, ref):
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    assert ours["pixel_values"].dtype == np.asarray(ref["pixel_values"]).dtype  # float32, or uint8 left unscaled
    np.testing.assert_array_equal(ours["image_sizes"], np.asarray(ref["image_sizes"]))
    # 1e-5 on normalized values; relative to the magnitude when normalization is switched off
    scale = max(1.0, float(np.abs(ref["pixel_values"]).max()))
    assert np.abs(ours["pixel_values"] - ref["pixel_values"]).max() <= TOLERANCE * scale


@pytest.mark.parametrize("height,width", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_matches_reference_on_llava_v16_geometry(height, width):
    ours, ref = run_both(synthetic(height, width), **settings())
    assert_matches_reference(ours, ref)
    rows, cols = geometry.grid_shape(height, width, checkpoints.REAL_PINPOINTS, 336)
    assert ours["pixel_values"].shape == (1, 1 + rows * cols, 3, 336, 336)
    assert ours["image_sizes"].tolist() == [[height, width]]


@pytest.mark.parametrize("height,width", WIDE_SIZES, ids=[f"{h}x{w}" for h, w in WIDE_SIZES])
def test_matches_reference_on_another_pinpoint_set(height, width):
    ours, ref = run_both(synthetic(height, width), **settings(checkpoints.WIDE_PINPOINTS))
    assert_matches_reference(ours, ref)


def test_matches_reference_on_a_4000x3000_photo():
    photo = checkpoints.real_photo("retina.jpg").resize((4000, 3000))
    ours, ref = run_both(photo, **settings())
    assert_matches_reference(ours, ref)
    assert ours["image_sizes"].tolist() == [[3000, 4000]]


def test_matches_reference_on_tiny_checkpoint_geometry():
    images = [synthetic(h, w) for h, w in [(1, 1), (20, 70), (70, 20), (64, 64), (95, 33)]]
    ours, ref = run_both(images, **settings(checkpoints.TINY_PINPOINTS, tile=checkpoints.TINY_TILE))
    assert_matches_reference(ours, ref)


@pytest.mark.parametrize("name", REAL_PHOTOS)
def test_matches_reference_on_real_photos(name):
    ours, ref = run_both(checkpoints.real_photo(name), **settings())
    assert_matches_reference(ours, ref)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "PA", "CMYK", "1", "YCbCr", "RGBX"])
def test_matches_reference_on_image_modes(mode):
    photo = checkpoints.real_photo("chelsea.png")
    if mode in ("LA", "RGBA", "PA"):
        photo = photo.convert("RGBA")
        photo.putalpha(Image.linear_gradient("L").resize(photo.size))
    ours, ref = run_both(photo.convert(mode), **settings())
    assert_matches_reference(ours, ref)


def test_transparent_pixels_become_white_like_the_reference():
    rgba = Image.new("RGBA", (40, 30), (200, 10, 10, 0))
    palette = Image.new("P", (40, 30), 5)
    palette.info["transparency"] = 5
    processor = LlavaNextImageProcessor(**settings())
    white = (1.0 - np.array(processor.image_mean)) / np.array(processor.image_std)
    for image in (rgba, palette):
        ours, ref = run_both(image, **settings())
        assert_matches_reference(ours, ref)
        np.testing.assert_allclose(ours["pixel_values"][0, 0, :, 100, 100], white, atol=1e-5)


def test_sixteen_bit_images_are_scaled_not_clipped():
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    image = Image.fromarray(ramp)
    assert image.mode == "I;16"
    as_8bit = Image.fromarray(np.round(ramp / 257).astype(np.uint8), "L")
    processor = LlavaNextImageProcessor(**settings())
    ours = processor(image, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(ours, processor(as_8bit, return_tensors="np")["pixel_values"], atol=1e-5)
    # transformers' own conversion clips at 255: most of this ramp would be white
    assert np.asarray(image.convert("L")).mean() > 250
    # 16-bit arrays and tensors mean the same
    import torch

    from llava_next_plugin.image_processing_fast import LlavaNextImageProcessorFast

    np.testing.assert_allclose(processor(ramp, return_tensors="np")["pixel_values"], ours, atol=1e-5)
    fast = LlavaNextImageProcessorFast(**settings())
    torch.testing.assert_close(fast(torch.from_numpy(ramp)[None])["pixel_values"], fast(as_8bit)["pixel_values"])


def test_32_bit_and_float_grey_images_are_scaled_meaningfully():
    ramp = np.linspace(0, 1, 32 * 48, dtype=np.float32).reshape(32, 48)
    as_8bit = Image.fromarray(np.round(ramp * 255).astype(np.uint8), "L")
    processor = LlavaNextImageProcessor(**settings())
    expected = processor(as_8bit, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(
        processor(Image.fromarray(ramp, "F"), return_tensors="np")["pixel_values"], expected, atol=1e-5
    )
    wide = Image.fromarray((np.round(ramp * 255) * 257).astype(np.int32), "I")
    np.testing.assert_allclose(processor(wide, return_tensors="np")["pixel_values"], expected, atol=1e-5)


def test_numpy_torch_and_pil_inputs_agree():
    import torch

    photo = checkpoints.real_photo("coffee.png")
    array = np.asarray(photo)
    processor = LlavaNextImageProcessor(**settings())
    expected = processor(photo, return_tensors="np")["pixel_values"]
    for image in (array, array.transpose(2, 0, 1), torch.from_numpy(array.copy()).permute(2, 0, 1)):
        np.testing.assert_array_equal(processor(image, return_tensors="np")["pixel_values"], expected)
    grey = np.asarray(photo.convert("L"))
    np.testing.assert_array_equal(
        processor(grey, return_tensors="np")["pixel_values"],
        processor(photo.convert("L"), return_tensors="np")["pixel_values"],
    )


def test_an_ambiguous_array_is_read_channels_first_with_a_warning_as_the_reference_reads_it():
    from llava_next_plugin.image_processing_fast import LlavaNextImageProcessorFast

    pixels = np.asarray(synthetic(40, 3)).transpose(2, 0, 1).copy()  # [3, 40, 3]: 3 channels, 40 x 3 pixels
    with pytest.warns(UserWarning, match="input_data_format='channels_last'"):
        ours = LlavaNextImageProcessor(**settings())(pixels, return_tensors="np")
    assert_matches_reference(ours, ReferencePil(**settings())(pixels, return_tensors="np"))
    assert ours["image_sizes"].tolist() == [[40, 3]]
    with pytest.warns(UserWarning, match="channels-first"):
        fast = LlavaNextImageProcessorFast(**settings())(pixels, return_tensors="np")
    assert fast["image_sizes"].tolist() == [[40, 3]]
    said = LlavaNextImageProcessor(**settings())(pixels, return_tensors="np", input_data_format="channels_last")
    assert said["image_sizes"].tolist() == [[3, 40]]  # the caller's word wins, and no warning is needed
    two_rows = np.asarray(synthetic(2, 40))  # [2, 40, 3]: transformers counts 1, 3 or 4 channels, not 2
    for processor in (LlavaNextImageProcessor(**settings()), LlavaNextImageProcessorFast(**settings())):
        assert processor(two_rows, return_tensors="np")["image_sizes"].tolist() == [[2, 40]]
    assert_matches_reference(
        LlavaNextImageProcessor(**settings())(two_rows, return_tensors="np"),
        ReferencePil(**settings())(two_rows, return_tensors="np"),
    )


def test_a_transparent_image_read_from_a_path_drops_its_alpha_as_the_reference_reads_one(tmp_path):
    """transformers composites a PIL image's transparency on white but reads a path or URL with
    ``convert("RGB")`` (alpha dropped): the processors follow it for both, so the same call gives the same pixels."""
    from transformers import LlavaNextImageProcessor as ReferenceTorchvision

    from llava_next_plugin.image_processing_fast import LlavaNextImageProcessorFast

    pixels = np.asarray(synthetic(60, 80).convert("RGBA")).copy()
    pixels[:, :40, 3] = 0  # the left half transparent (its colours still there, as in most exported PNGs)
    path = tmp_path / "half.png"
    Image.fromarray(pixels, "RGBA").save(path)
    for ours_cls, ref_cls in (
        (LlavaNextImageProcessor, ReferencePil),
        (LlavaNextImageProcessorFast, ReferenceTorchvision),
    ):
        ours = ours_cls(**settings())(str(path), return_tensors="np")
        ref = ref_cls(**settings())(str(path), return_tensors="np")
        np.testing.assert_allclose(ours["pixel_values"], ref["pixel_values"], atol=0.05)
        from_pil = ours_cls(**settings())(Image.open(path), return_tensors="np")  # composited on white, as theirs
        np.testing.assert_allclose(
            from_pil["pixel_values"],
            ref_cls(**settings())(Image.open(path), return_tensors="np")["pixel_values"],
            atol=0.05,
        )
        assert np.abs(from_pil["pixel_values"] - ours["pixel_values"]).max() > 0.5


@pytest.mark.parametrize("fast", [False, True], ids=["pil", "fast"])
def test_unpadded_equal_view_counts_are_stacked_and_unscaled_pixels_stay_8_bit_as_the_reference_gives_them(fast):
    from transformers import LlavaNextImageProcessor as ReferenceTorchvision

    from llava_next_plugin.image_processing_fast import LlavaNextImageProcessorFast

    ours_cls, ref_cls = (
        (LlavaNextImageProcessorFast, ReferenceTorchvision) if fast else (LlavaNextImageProcessor, ReferencePil)
    )
    images = [synthetic(50, 70), synthetic(52, 69, seed=1)]  # the same grid: as many views each
    for extra in (
        {"do_pad": False},
        {"do_rescale": False, "do_normalize": False},
        {"do_pad": False, "do_rescale": False, "do_normalize": False},
    ):
        for kind in ("pt", "np"):
            ours = ours_cls(**settings())(images, return_tensors=kind, **extra)["pixel_values"]
            ref = ref_cls(**settings())(images, return_tensors=kind, **extra)["pixel_values"]
            assert type(ours) is type(ref) and ours.dtype == ref.dtype and tuple(ours.shape) == tuple(ref.shape)
            np.testing.assert_allclose(np.asarray(ours, dtype=np.float32), np.asarray(ref, dtype=np.float32), atol=0.05)
    for extra in ({"rescale_factor": 1.0}, {"do_rescale": False, "image_mean": [0.0] * 3, "image_std": [1.0] * 3}):
        # arithmetic that changes nothing is still a rescale or a normalization: float32, as transformers gives
        ours = ours_cls(**settings())(images, return_tensors="np", **extra)["pixel_values"]
        assert ours.dtype == ref_cls(**settings())(images, return_tensors="np", **extra)["pixel_values"].dtype
    uneven = ours_cls(**settings())([synthetic(50, 70), synthetic(600, 600)], return_tensors="pt", do_pad=False)
    assert [len(v) for v in uneven["pixel_values"]] == [3, 5]  # different counts: still a list


def test_uint16_arrays_of_8_bit_values_are_read_as_the_reference_reads_them_and_others_are_scaled():
    from llava_next_plugin.image_processing_fast import LlavaNextImageProcessorFast

    eight = np.asarray(synthetic(40, 60))
    for processor in (LlavaNextImageProcessor(**settings()), LlavaNextImageProcessorFast(**settings())):
        expected = processor(eight, return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(
            processor(eight.astype(np.uint16), return_tensors="np")["pixel_values"], expected, atol=1e-6
        )
        sixteen = eight.astype(np.uint16) * 257  # the same picture over 16 bits
        np.testing.assert_allclose(processor(sixteen, return_tensors="np")["pixel_values"], expected, atol=1e-6)
    assert_matches_reference(
        LlavaNextImageProcessor(**settings())(eight.astype(np.uint16), return_tensors="np"),
        ReferencePil(**settings())(eight.astype(np.uint16), return_tensors="np"),
    )


@pytest.mark.parametrize("fast", [False, True], ids=["pil", "fast"])
def test_do_convert_rgb_false_refuses_arrays_that_are_not_rgb_as_it_refuses_pil_images(fast):
    from llava_next_plugin.image_processing_fast import LlavaNextImageProcessorFast

    processor = (LlavaNextImageProcessorFast if fast else LlavaNextImageProcessor)(**settings(), do_convert_rgb=False)
    rgba = np.asarray(synthetic(40, 60).convert("RGBA"))
    for image in (rgba, rgba[..., 0], torch.from_numpy(rgba.copy()).permute(2, 0, 1)):
        with pytest.raises(ImageError, match="do_convert_rgb=True"):
            processor(image, return_tensors="np")
    assert processor(rgba[..., :3], return_tensors="np")["pixel_values"].shape[0] == 1


def test_rgba_arrays_composite_on_white_like_the_reference():
    rgba = np.asarray(checkpoints.real_photo("logo.png"))
    ours = LlavaNextImageProcessor(**settings())(rgba, return_tensors="np")
    ref = ReferencePil(**settings())(rgba, return_tensors="np", input_data_format="channels_last")
    assert_matches_reference(ours, ref)


def test_mixed_size_batch_is_zero_padded_and_each_image_matches_alone():
    images = [synthetic(40, 900), synthetic(768, 1024), synthetic(1, 1), checkpoints.real_photo("camera.png")]
    processor = LlavaNextImageProcessor(**settings())
    batch = processor(images, return_tensors="pt")
    counts = [processor(image, return_tensors="np")["pixel_values"].shape[1] for image in images]
    assert tuple(batch["pixel_values"].shape) == (4, max(counts), 3, 336, 336)
    assert batch["image_sizes"].tolist() == [[40, 900], [768, 1024], [1, 1], [512, 512]]
    for i, image in enumerate(images):
        alone = processor(image, return_tensors="np")["pixel_values"][0]
        np.testing.assert_array_equal(batch["pixel_values"][i, : counts[i]].numpy(), alone)
        assert not batch["pixel_values"][i, counts[i] :].any()
    ours, ref = run_both(images, **settings())
    assert_matches_reference(ours, ref)


def test_nested_lists_flatten_like_several_images_per_prompt():
    a, b, c = synthetic(50, 60), synthetic(300, 20), synthetic(9, 9)
    processor = LlavaNextImageProcessor(**settings())
    nested = processor([[a, b], [c]], return_tensors="np")
    flat = processor([a, b, c], return_tensors="np")
    np.testing.assert_array_equal(nested["pixel_values"], flat["pixel_values"])


def test_without_padding_each_image_keeps_its_own_view_count():
    processor = LlavaNextImageProcessor(**settings())
    sizes = [(40, 900), (768, 1024)]
    out = processor([synthetic(h, w) for h, w in sizes], do_pad=False, return_tensors="pt")
    views = [1 + np.prod(geometry.grid_shape(h, w, checkpoints.REAL_PINPOINTS, 336)) for h, w in sizes]
    assert views == [4, 5]
    assert [tuple(v.shape) for v in out["pixel_values"]] == [(n, 3, 336, 336) for n in views]


def test_per_call_overrides_match_the_reference():
    image = synthetic(123, 456)
    for override in (
        {"do_normalize": False},
        {"do_rescale": False},
        {"image_mean": [0.5] * 3, "image_std": [0.5] * 3},
        {"resample": 2},
        {"do_normalize": None},  # a flag given as None is off, as transformers reads it
        {"do_rescale": None, "do_normalize": None},
        {"do_pad": None},
    ):
        ours = LlavaNextImageProcessor(**settings())(image, return_tensors="np", **override)
        ref = ReferencePil(**settings())(image, return_tensors="np", **override)
        assert_matches_reference(ours, ref)


def test_size_and_crop_that_differ_from_the_tile_match_the_reference():
    kwargs = dict(
        size={"shortest_edge": 40},
        crop_size={"height": 32, "width": 32},
        image_grid_pinpoints=checkpoints.TINY_PINPOINTS,
    )
    ours, ref = run_both([synthetic(50, 90), synthetic(7, 3)], **kwargs)
    assert_matches_reference(ours, ref)


def test_saved_files_load_in_transformers_class_and_back(tmp_path):
    ours = LlavaNextImageProcessor(**settings(checkpoints.WIDE_PINPOINTS, image_mean=[0.5] * 3, image_std=[0.5] * 3))
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "LlavaNextImageProcessor"
    reference = ReferencePil.from_pretrained(tmp_path)
    image = synthetic(333, 1400)
    assert_matches_reference(ours(image, return_tensors="np"), reference(image, return_tensors="np"))
    again = LlavaNextImageProcessor.from_pretrained(tmp_path)
    assert again.to_dict() == ours.to_dict()


def test_loads_a_llava_hf_checkpoint_folder(tiny_checkpoint):
    ours = LlavaNextImageProcessor.from_pretrained(tiny_checkpoint)
    assert ours.image_grid_pinpoints == checkpoints.TINY_PINPOINTS
    assert ours.crop_size == {"height": checkpoints.TINY_TILE, "width": checkpoints.TINY_TILE}
    ref = ReferencePil.from_pretrained(tiny_checkpoint)
    image = synthetic(70, 20)
    assert_matches_reference(ours(image, return_tensors="np"), ref(image, return_tensors="np"))


def test_pil_alias_is_the_same_class():
    assert LlavaNextImageProcessorPil is LlavaNextImageProcessor


# ---- bad input: typed errors that name the image and the fix ----


def test_zero_size_images_are_refused_with_their_index():
    processor = LlavaNextImageProcessor(**settings())
    for empty in (Image.new("RGB", (0, 5)), np.zeros((5, 0, 3), np.uint8)):
        with pytest.raises(ImageError, match=r"^image 1: .*empty \(\d+x\d+ pixels\)") as info:
            processor([synthetic(5, 5), empty], return_tensors="np")
        assert info.value.index == 1
        assert isinstance(info.value, ValueError)


def test_truncated_image_bytes_are_an_invalid_image():
    buffer = io.BytesIO()
    synthetic(200, 200).save(buffer, format="PNG")
    truncated = Image.open(io.BytesIO(buffer.getvalue()[:400]))
    with pytest.raises(ImageError, match="image 0: .*is truncated or corrupted"):
        LlavaNextImageProcessor(**settings())(truncated, return_tensors="np")


def test_images_past_pil_pixel_limit_are_refused(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="image 0: .*over the limit of 2000"):
        LlavaNextImageProcessor(**settings())(np.zeros((50, 50, 3), np.uint8), return_tensors="np")


def test_a_lazily_opened_image_that_pil_only_warns_about_is_processed_as_transformers_does(monkeypatch):
    """Between MAX_IMAGE_PIXELS and twice that, PIL opens an image with a warning and transformers' processors
    use it; ours do too (the loader for outside sources refuses from 1x: that is a serving rule, not theirs)."""
    encoded = io.BytesIO()
    synthetic(40, 30).save(encoded, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the image has 1200 pixels: 1.2x
    images = [Image.open(io.BytesIO(encoded.getvalue())) for _ in range(2)]  # lazily opened, not decoded
    ours = LlavaNextImageProcessor(**settings())(images[0], return_tensors="np")
    ref = ReferencePil(**settings())(images[1], return_tensors="np")
    assert_matches_reference(ours, ref)


@pytest.mark.parametrize(
    "array,message",
    [
        (np.full((8, 8, 3), 2.5, np.float32), "whole floats within 0..255\\) or floats within \\[0, 1\\]"),
        (np.zeros((8, 8, 5), np.uint8), "1, 2, 3 or 4 channels"),
        (np.zeros((2, 8, 8, 3, 1), np.uint8), "2 or 3 dimensions"),
        ("cat.png", "file not found: 'cat.png'"),  # a path is read, as by the reference
        ({"url": "cat.png"}, "unsupported image type dict"),
    ],
)
def test_unusable_arrays_say_what_to_pass(array, message):
    with pytest.raises(ImageError, match=message):
        LlavaNextImageProcessor(**settings())(array, return_tensors="np")


def test_grey_and_alpha_arrays_convert():
    processor = LlavaNextImageProcessor(**settings())
    grey_alpha = np.stack([np.full((9, 9), 100, np.uint8), np.full((9, 9), 0, np.uint8)], axis=-1)
    white = processor(np.full((9, 9, 3), 255, np.uint8), return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(processor(grey_alpha, return_tensors="np")["pixel_values"], white)


def test_float_images_within_0_1_are_read_as_transformers_pil_backend_reads_them():
    """Pixels / 255 (torchvision's to_tensor), as numpy or torch, needing grad or not: brought back to 8 bits, as
    transformers' PIL backend does, so that with do_rescale=False they give the uint8 image's pixel values."""
    photo = np.asarray(synthetic(45, 70))
    unit = photo.astype(np.float32) / 255
    processor = LlavaNextImageProcessor(**settings())
    from_uint8 = processor(photo, return_tensors="np")["pixel_values"]
    for floats in (unit, torch.from_numpy(unit).permute(2, 0, 1).clone().requires_grad_()):
        ours = processor(floats, do_rescale=False, return_tensors="np")["pixel_values"]
        reference_input = floats.detach() if isinstance(floats, torch.Tensor) else floats
        theirs = ReferencePil(**settings())(reference_input, do_rescale=False, return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
        np.testing.assert_allclose(ours, from_uint8, rtol=0, atol=1e-5)
    bfloat16 = torch.from_numpy(unit).permute(2, 0, 1).to(torch.bfloat16)  # numpy has none: read as float32
    assert processor(bfloat16, do_rescale=False, return_tensors="np")["pixel_values"].shape == from_uint8.shape
    with pytest.warns(UserWarning, match="image 0 holds floats within \\[0, 1\\] and do_rescale is on"):
        processor(unit, return_tensors="np")
    whole = photo.astype(np.float64)  # whole pixel numbers held as floats: as the uint8 image
    np.testing.assert_array_equal(processor(whole, return_tensors="np")["pixel_values"], from_uint8)


def test_bad_settings_are_bad_requests():
    with pytest.raises(InputError, match="entry \\[336, 0\\] is smaller than one 336px tile"):
        LlavaNextImageProcessor(**settings([[336, 0]]))(synthetic(9, 9), return_tensors="np")
    with pytest.raises(InputError, match="entry \\[16, 16\\] is smaller than one 336px tile"):
        LlavaNextImageProcessor(**settings())(synthetic(9, 9), image_grid_pinpoints=[[16, 16]], return_tensors="np")
    with pytest.raises(InputError, match="list of \\[height, width\\] pairs"):
        LlavaNextImageProcessor(**settings())(synthetic(9, 9), image_grid_pinpoints=[[336]], return_tensors="np")
    with pytest.raises(InputError, match="crop_size .* is not square"):
        LlavaNextImageProcessor(**settings())(
            synthetic(9, 9), crop_size={"height": 336, "width": 300}, return_tensors="np"
        )
    with pytest.raises(InputError, match="unknown image processor argument"):
        LlavaNextImageProcessor(**settings())(synthetic(9, 9), do_magic=True, return_tensors="np")
    with pytest.raises(InputError, match="size="):
        LlavaNextImageProcessor(size={"longest_edge": 3})
    with pytest.raises(InputError, match="image_mean needs one value per RGB channel"):
        LlavaNextImageProcessor(image_mean=[0.5, 0.5])
    with pytest.raises(ImageError, match="no images"):
        LlavaNextImageProcessor(**settings())([], return_tensors="np")


def test_pil_processor_works_in_a_forked_child_after_use_in_the_parent():
    """DataLoader workers fork: the background resize thread must not be inherited as a dead one.

    (Only the PIL processor: any torch CPU op in a forked child can hang once the parent has used
    torch's intra-op threads, transformers' torchvision processor included; that is torch's limit.)
    """
    import multiprocessing

    photo = checkpoints.real_photo().convert("RGB")
    processor = LlavaNextImageProcessor()
    expected = processor(photo, return_tensors="np")["pixel_values"]

    def child(queue):
        queue.put(processor(photo, return_tensors="np")["pixel_values"])

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    try:
        result = queue.get(timeout=60)  # read before joining: a large result fills the pipe
    except Exception:  # queue.Empty: nothing came back in time
        result = None
    finally:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
    assert result is not None, "the PIL processor hung in a forked child"
    np.testing.assert_array_equal(result, expected)


def test_integer_arrays_of_8bit_values_are_read_as_uint8_images():
    pixels = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    processor = LlavaNextImageProcessor(**settings())
    expected = processor(pixels, return_tensors="np")["pixel_values"]
    reference = ReferencePil(**settings())
    for dtype in (np.int64, np.int32):
        np.testing.assert_array_equal(processor(pixels.astype(dtype), return_tensors="np")["pixel_values"], expected)
        theirs = reference(pixels.astype(dtype), return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(expected, theirs, rtol=0, atol=1e-5)
    with pytest.raises(ImageError, match="integers or whole floats within 0..255.*got int64 within \\[0, 510\\]"):
        processor(pixels.astype(np.int64) * 2, return_tensors="np")


PARTIAL_TILES = dict(
    size={"shortest_edge": 20}, crop_size={"height": 18, "width": 18}, image_grid_pinpoints=checkpoints.REAL_PINPOINTS
)  # 336, 672, 1008: not multiples of 18


@pytest.mark.parametrize("height,width", [(400, 400), (30, 50), (333, 127), (100, 350)])
def test_pinpoints_that_are_not_whole_tiles_give_transformers_partial_edge_tiles(height, width):
    """transformers cuts the padded best resolution into ceil(side / tile) tiles per side, the last ones
    partial, and resizes (shortest edge) and centre-crops each view on its own: 1 + 38 x 19 = 723 views
    for a 672 x 336 best resolution."""
    image = synthetic(height, width)
    ours = LlavaNextImageProcessor(**PARTIAL_TILES)(image, return_tensors="np")["pixel_values"]
    theirs = ReferencePil(**PARTIAL_TILES)(image, return_tensors="np")["pixel_values"]
    assert ours.shape == theirs.shape
    assert ours.shape[1] in (1 + 38 * 19, 1 + 38 * 38)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_partial_edge_tiles_need_a_center_crop_or_a_resize_to_one_view_size():
    with pytest.raises(InputError, match="not whole grids of 18px tiles.*do_center_crop"):
        LlavaNextImageProcessor(**PARTIAL_TILES)(synthetic(40, 40), do_center_crop=False, return_tensors="np")


@pytest.mark.parametrize("size", [(18, 18), (20, 20), (18, 24)])
def test_partial_edge_tiles_resized_to_a_height_and_width_need_no_center_crop(size):
    """size {height, width} brings every view, the partial edge tiles too, to one size: as transformers."""
    settings = dict(PARTIAL_TILES, size={"height": size[0], "width": size[1]}, do_center_crop=False)
    image = synthetic(100, 350)
    for ours_class, reference_class in _pairs():
        ours = ours_class(**settings)(image, return_tensors="np")["pixel_values"]
        theirs = np.asarray(reference_class(**settings)(image, return_tensors="np")["pixel_values"])
        assert ours.shape == theirs.shape and ours.shape[-2:] == size
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def _pairs():
    """(ours, the reference) for both backends."""
    from transformers import LlavaNextImageProcessor as ReferenceTorchvision

    from llava_next_plugin.image_processing_fast import LlavaNextImageProcessorFast

    return [(LlavaNextImageProcessor, ReferencePil), (LlavaNextImageProcessorFast, ReferenceTorchvision)]


@pytest.mark.parametrize("pair", [0, 1], ids=["pil", "torch"])
def test_paths_are_read_as_by_the_reference(tmp_path, pair):
    ours_class, reference_class = _pairs()[pair]
    path = tmp_path / "photo.png"
    synthetic(90, 130).save(path)
    for images in (str(path), [path]):
        ours = ours_class(**settings())(images, return_tensors="pt")
        reference = reference_class(**settings())(str(path), return_tensors="pt")
        assert torch.allclose(ours["pixel_values"], reference["pixel_values"], atol=2e-2)
        assert ours["image_sizes"].tolist() == reference["image_sizes"].tolist() == [[90, 130]]
    with pytest.raises(ImageError, match="file not found"):
        ours_class(**settings())(str(tmp_path / "missing.png"))


@pytest.mark.parametrize("pair", [0, 1], ids=["pil", "torch"])
def test_common_keywords_without_effect_are_taken_as_by_the_reference(pair):
    """transformers' shared image keywords that LLaVA-NeXT's preprocessing does not use change nothing."""
    ours_class, _ = _pairs()[pair]
    processor, image = ours_class(**settings()), synthetic(90, 130)
    plain = processor(image, return_tensors="pt")["pixel_values"]
    for extra in (
        {"default_to_square": False},
        {"pad_size": {"height": 700, "width": 700}},
        {"image_seq_length": 576},
        {"device": "cpu"},
        {"disable_grouping": True},
    ):
        assert torch.equal(processor(image, return_tensors="pt", **extra)["pixel_values"], plain), extra


@pytest.mark.parametrize("pair", [0, 1], ids=["pil", "torch"])
def test_resample_may_be_a_torchvision_interpolation_mode(pair):
    from torchvision.transforms import InterpolationMode

    ours_class, _ = _pairs()[pair]
    image = synthetic(90, 130)
    by_code = ours_class(**settings(), resample=2)(image, return_tensors="pt")["pixel_values"]
    made = ours_class(**settings(), resample=InterpolationMode.BILINEAR)
    assert made.resample == 2  # saved as PIL's code, as the reference writes it
    assert torch.equal(made(image, return_tensors="pt")["pixel_values"], by_code)
    called = ours_class(**settings())(image, return_tensors="pt", resample=InterpolationMode.BILINEAR)
    assert torch.equal(called["pixel_values"], by_code)
    with pytest.raises(InputError, match="not a resampling filter"):
        ours_class(**settings(), resample="sharpest")


@pytest.mark.parametrize("pair", [0, 1], ids=["pil", "torch"])
def test_return_tensors_set_on_the_processor_is_its_default_as_in_the_reference(pair):
    ours_class, reference_class = _pairs()[pair]
    image = synthetic(90, 130)
    ours = ours_class(**settings(), return_tensors="pt")(image)
    reference = reference_class(**settings(), return_tensors="pt")(image)
    assert isinstance(ours["pixel_values"], torch.Tensor) and isinstance(reference["pixel_values"], torch.Tensor)
    assert isinstance(ours_class(**settings())(image)["pixel_values"], list)  # without it: one array per image


@pytest.mark.parametrize("pair", [0, 1], ids=["pil", "torch"])
def test_an_explicit_return_tensors_none_asks_for_lists_even_over_the_processors_own(pair):
    ours_class, _ = _pairs()[pair]
    processor = ours_class(**settings(), return_tensors="pt")
    assert isinstance(processor(synthetic(90, 130), return_tensors=None)["pixel_values"], list)


def test_resample_given_as_an_enum_of_codes_and_bools_refused():
    import enum

    class Filters(enum.Enum):
        BILINEAR = 2

    assert LlavaNextImageProcessor(**settings(), resample=Filters.BILINEAR).resample == 2
    with pytest.raises(InputError, match="not a resampling filter"):
        LlavaNextImageProcessor(**settings(), resample=True)
