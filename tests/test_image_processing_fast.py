"""LlavaNextImageProcessorFast (pure torch) against transformers' torchvision ``LlavaNextImageProcessor``.

Same shapes and image sizes exactly; pixel values within 0.05 max-abs and 0.005 mean-abs (on CPU
both use torch's uint8 resize kernels, so they agree to float rounding). Runs on every device
this machine has.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import checkpoints
import numpy as np
import pytest
import torch
from PIL import Image
from test_image_processing import REAL_PHOTOS, SIZES, WIDE_SIZES, settings, synthetic
from transformers import LlavaNextImageProcessor as ReferenceTorchvision

from llava_next_plugin import geometry
from llava_next_plugin.errors import ImageError, InputError
from llava_next_plugin.image_processing import LlavaNextImageProcessor
from llava_next_plugin.image_processing_fast import LlavaNextImageProcessorFast

MAX_ABS, MEAN_ABS = 0.05, 0.005
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def assert_close_to_reference(ours, ref):
    ours_values, ref_values = ours["pixel_values"].cpu().float(), ref["pixel_values"].cpu().float()
    assert ours_values.shape == ref_values.shape
    assert ours["image_sizes"].tolist() == ref["image_sizes"].tolist()
    diff = (ours_values - ref_values).abs()
    assert diff.max().item() <= MAX_ABS
    assert diff.mean().item() <= MEAN_ABS


def run_both(images, device="cpu", **kwargs):
    ours = LlavaNextImageProcessorFast(**kwargs)(images, device=device, return_tensors="pt")
    ref = ReferenceTorchvision(**kwargs)(images, return_tensors="pt", device=device)
    return ours, ref


@pytest.mark.parametrize("height,width", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_matches_reference_on_llava_v16_geometry(height, width):
    ours, ref = run_both(synthetic(height, width), **settings())
    assert_close_to_reference(ours, ref)
    rows, cols = geometry.grid_shape(height, width, checkpoints.REAL_PINPOINTS, 336)
    assert tuple(ours["pixel_values"].shape) == (1, 1 + rows * cols, 3, 336, 336)
    assert ours["pixel_values"].dtype == torch.float32


@pytest.mark.parametrize("height,width", WIDE_SIZES, ids=[f"{h}x{w}" for h, w in WIDE_SIZES])
def test_matches_reference_on_another_pinpoint_set(height, width):
    ours, ref = run_both(synthetic(height, width), **settings(checkpoints.WIDE_PINPOINTS))
    assert_close_to_reference(ours, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference_on_a_4000x3000_photo_and_a_mixed_batch(device):
    images = [
        checkpoints.real_photo("retina.jpg").resize((4000, 3000)),
        synthetic(1, 1000),
        synthetic(1000, 1),
        checkpoints.real_photo("chelsea.png"),
    ]
    ours, ref = run_both(images, device=device, **settings())
    assert ours["pixel_values"].device.type == device
    assert_close_to_reference(ours, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_uint8_tensors_already_on_the_device(device):
    images = [
        torch.from_numpy(np.asarray(synthetic(h, w))).permute(2, 0, 1).to(device)
        for h, w in [(480, 640), (1000, 200), (33, 77), (768, 1024)]
    ]
    ours = LlavaNextImageProcessorFast(**settings())(images, return_tensors="pt")  # device follows the tensors
    assert ours["pixel_values"].device.type == device
    ref = ReferenceTorchvision(**settings())(images, return_tensors="pt")
    assert_close_to_reference(ours, ref)


@pytest.mark.parametrize("name", REAL_PHOTOS)
def test_matches_reference_on_real_photos(name):
    ours, ref = run_both(checkpoints.real_photo(name), **settings())
    assert_close_to_reference(ours, ref)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1"])
def test_matches_reference_on_image_modes(mode):
    photo = checkpoints.real_photo("coffee.png").convert("RGBA")
    photo.putalpha(Image.linear_gradient("L").resize(photo.size))
    ours, ref = run_both(photo.convert(mode), **settings())
    assert_close_to_reference(ours, ref)


def test_tiny_checkpoint_geometry_and_siglip_normalization():
    images = [synthetic(h, w) for h, w in [(1, 1), (20, 70), (70, 20), (64, 64), (95, 33)]]
    kwargs = settings(checkpoints.TINY_PINPOINTS, tile=checkpoints.TINY_TILE, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ours, ref = run_both(images, **kwargs)
    assert_close_to_reference(ours, ref)


def test_agrees_with_our_pil_processor():
    images = [checkpoints.real_photo("astronaut.png"), synthetic(99, 1234), synthetic(5, 5)]
    fast = LlavaNextImageProcessorFast(**settings())(images, return_tensors="pt")["pixel_values"]
    pil = LlavaNextImageProcessor(**settings())(images, return_tensors="np")["pixel_values"]
    assert fast.shape == pil.shape
    diff = (fast - torch.from_numpy(pil)).abs()
    assert diff.max() <= 0.25 and diff.mean() <= 0.02  # two resamplers (PIL vs torch), same geometry


def test_every_input_kind_gives_the_same_pixels():
    photo = checkpoints.real_photo("rocket.jpg")
    array = np.asarray(photo)
    chw = torch.from_numpy(array.copy()).permute(2, 0, 1)
    processor = LlavaNextImageProcessorFast(**settings())
    expected = processor(photo, return_tensors="pt")["pixel_values"]
    for image in (array, chw, chw.contiguous(), array.transpose(2, 0, 1), chw.permute(1, 2, 0)):
        torch.testing.assert_close(processor(image, return_tensors="pt")["pixel_values"], expected, atol=0, rtol=0)
    batch_nchw = torch.stack([chw, chw.flip(-1)])
    batch = processor(batch_nchw, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch[0], expected[0], atol=0, rtol=0)
    torch.testing.assert_close(
        processor([[photo], [chw.flip(-1)]], return_tensors="pt")["pixel_values"], batch, atol=0, rtol=0
    )
    grey = np.asarray(photo.convert("L"))
    torch.testing.assert_close(
        processor(grey, return_tensors="pt")["pixel_values"],
        processor(photo.convert("L"), return_tensors="pt")["pixel_values"],
    )


def test_float_tensors_match_the_reference_and_the_uint8_image():
    chw = torch.from_numpy(np.asarray(synthetic(300, 500)).copy()).permute(2, 0, 1)
    floats = chw.float() / 255
    ours = LlavaNextImageProcessorFast(**settings())(floats, do_rescale=False, return_tensors="pt")
    ref = ReferenceTorchvision(**settings())(floats, do_rescale=False, return_tensors="pt")
    assert_close_to_reference(ours, ref)
    # resized in float (not rounded, not clipped): close to the uint8 result on average
    from_uint8 = LlavaNextImageProcessorFast(**settings())(chw, return_tensors="pt")["pixel_values"]
    assert (ours["pixel_values"] - from_uint8).abs().mean() < 0.01


def test_alpha_tensors_composite_on_white():
    processor = LlavaNextImageProcessorFast(**settings())
    transparent = torch.zeros(4, 20, 30, dtype=torch.uint8)
    grey_alpha = torch.zeros(2, 20, 30, dtype=torch.uint8)
    white = processor(torch.full((3, 20, 30), 255, dtype=torch.uint8), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(processor(transparent, return_tensors="pt")["pixel_values"], white, atol=0, rtol=0)
    torch.testing.assert_close(processor(grey_alpha, return_tensors="pt")["pixel_values"], white, atol=0, rtol=0)


def test_mixed_batch_is_zero_padded_and_counts_follow_geometry():
    sizes = [(40, 900), (768, 1024), (1, 1)]
    out = LlavaNextImageProcessorFast(**settings())([synthetic(h, w) for h, w in sizes], return_tensors="np")
    counts = [1 + int(np.prod(geometry.grid_shape(h, w, checkpoints.REAL_PINPOINTS, 336))) for h, w in sizes]
    assert isinstance(out["pixel_values"], np.ndarray)
    assert out["pixel_values"].shape == (3, max(counts), 3, 336, 336)
    assert out["image_sizes"].tolist() == [list(s) for s in sizes]
    for i, count in enumerate(counts):
        assert not out["pixel_values"][i, count:].any()
        assert out["pixel_values"][i, count - 1].any()
    unpadded = LlavaNextImageProcessorFast(**settings())(
        [synthetic(h, w) for h, w in sizes], do_pad=False, return_tensors="pt"
    )
    assert [v.shape[0] for v in unpadded["pixel_values"]] == counts


def test_size_and_crop_that_differ_from_the_tile_match_the_reference():
    kwargs = dict(
        size={"shortest_edge": 40},
        crop_size={"height": 32, "width": 32},
        image_grid_pinpoints=checkpoints.TINY_PINPOINTS,
    )
    ours, ref = run_both([synthetic(50, 90), synthetic(7, 3)], **kwargs)
    assert_close_to_reference(ours, ref)
    # the tiles are resized from uint8 with torch's uint8 kernel, as torchvision's: the same pixels
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max().item() <= 1e-5


def test_bilinear_nearest_and_lanczos_resampling_match_the_reference():
    for resample in (0, 1, 2):  # 1: LANCZOS, torch's CPU kernel as torchvision's resize calls it
        ours, ref = run_both(synthetic(345, 678), **settings(resample=resample))
        assert_close_to_reference(ours, ref)


def test_an_image_holding_nan_or_inf_is_refused_naming_it():
    """Such pixels would make every logit of the request NaN: a 500 later, instead of the caller's 400 now."""
    processor = LlavaNextImageProcessorFast(**settings())
    good = torch.rand((3, 40, 30))
    for bad in (torch.full((3, 40, 30), float("nan")), np.full((40, 30, 3), np.inf, dtype=np.float32)):
        with pytest.raises(ImageError, match="image 1: the image holds NaN or infinite values"):
            processor([good, bad], return_tensors="pt")


def test_lanczos_where_torch_has_no_kernel_is_bicubic_with_one_warning():
    """torch's LANCZOS resize exists for float32/64 and uint8 on a CPU (older releases and some devices have none:
    there the processor resizes bicubic, said once); asked for half floats, which it lacks, it says so."""
    from llava_next_plugin import image_processing_fast as fast

    half = torch.rand((1, 3, 40, 30)).half()
    fast._LANCZOS.pop(("cpu", torch.float16), None)
    with pytest.warns(UserWarning, match=r"resample=1 \(LANCZOS\).*bicubic is used instead"):
        assert fast._lanczos_here(half) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the answer is kept
        assert fast._lanczos_here(half) is False and fast._lanczos_here(half.float()) is True


def test_loads_llava_hf_folders_and_saves_files_transformers_reads(tiny_checkpoint, tmp_path):
    ours = LlavaNextImageProcessorFast.from_pretrained(tiny_checkpoint)
    assert ours.image_grid_pinpoints == checkpoints.TINY_PINPOINTS
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "LlavaNextImageProcessor"
    image = synthetic(70, 20)
    reference = ReferenceTorchvision.from_pretrained(tmp_path)
    assert_close_to_reference(ours(image, return_tensors="pt"), reference(image, return_tensors="pt"))
    assert LlavaNextImageProcessorFast.from_pretrained(tmp_path).to_dict() == ours.to_dict()


def test_without_torchvision_plain_transformers_reads_our_files_and_we_still_work(tmp_path):
    """A fresh interpreter where torchvision looks uninstalled and llava_next_plugin is imported last."""
    LlavaNextImageProcessorFast(**settings(checkpoints.TINY_PINPOINTS, tile=32)).save_pretrained(tmp_path)
    script = textwrap.dedent(f"""
        import sys

        class HideTorchvision:  # makes torchvision look uninstalled to find_spec and import alike
            def __init__(self, inner):
                self.inner = inner
            def find_spec(self, name, path=None, target=None):
                if name == "torchvision" or name.startswith("torchvision."):
                    return None
                return self.inner.find_spec(name, path, target)
            def __getattr__(self, name):
                return getattr(self.inner, name)

        sys.meta_path[:] = [HideTorchvision(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
        import numpy as np
        from transformers import AutoImageProcessor

        plain = AutoImageProcessor.from_pretrained({str(tmp_path)!r})
        assert type(plain).__module__.startswith("transformers."), type(plain)
        image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
        expected = plain(image, return_tensors="pt", input_data_format="channels_last")["pixel_values"]

        from llava_next_plugin.image_processing_fast import LlavaNextImageProcessorFast
        fast = LlavaNextImageProcessorFast.from_pretrained({str(tmp_path)!r})
        ours = fast(image, return_tensors="pt")["pixel_values"]
        assert ours.shape == expected.shape, (ours.shape, expected.shape)
        assert (ours - expected).abs().mean() < 0.02  # PIL's resampler there, torch's here
        assert "torchvision" not in sys.modules
        print("ok")
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_defaults_are_llava_v16_and_unset_keys_are_ignored():
    image = synthetic(600, 800)
    ours = LlavaNextImageProcessorFast()(image, do_pad=None, default_to_square=None, return_tensors="pt")
    ref = ReferenceTorchvision(**settings())(image, return_tensors="pt")
    assert_close_to_reference(ours, ref)


def test_flipped_and_strided_arrays_are_accepted():
    array = np.asarray(synthetic(90, 120))
    processor = LlavaNextImageProcessorFast(**settings())
    for view in (array[::-1], array[:, ::2], array[..., ::-1]):
        expected = processor(np.ascontiguousarray(view), return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(processor(view, return_tensors="pt")["pixel_values"], expected, atol=0, rtol=0)


def test_a_default_device_can_be_set_and_is_saved_as_text(tmp_path):
    processor = LlavaNextImageProcessorFast(device=torch.device(DEVICES[-1]), **settings())
    assert processor(synthetic(30, 40), return_tensors="pt")["pixel_values"].device.type == DEVICES[-1]
    processor.save_pretrained(tmp_path)
    assert LlavaNextImageProcessorFast.from_pretrained(tmp_path).device == DEVICES[-1]


# ---- bad input ----


def test_bad_tensors_are_invalid_images_with_their_index():
    processor = LlavaNextImageProcessorFast(**settings())
    good = torch.zeros(3, 8, 8, dtype=torch.uint8)
    cases = [
        (torch.zeros(3, 0, 8, dtype=torch.uint8), r"empty \(0x8 pixels\)"),
        (torch.zeros((3, 8, 8), dtype=torch.complex64), "float or integer, got torch.complex64"),
        (torch.zeros(5, 8, 8, dtype=torch.uint8), "got 5"),
        (torch.zeros(8, dtype=torch.uint8), "2 or 3 dimensions"),
    ]
    for bad, message in cases:
        with pytest.raises(ImageError, match=rf"^image 1: .*{message}") as info:
            processor([good, bad], return_tensors="pt")
        assert info.value.index == 1


def test_unsupported_resample_and_return_type_are_bad_requests():
    with pytest.raises(InputError, match="has no torch kernel"):
        LlavaNextImageProcessorFast(**settings(resample=4))(synthetic(9, 9), return_tensors="pt")
    with pytest.raises(InputError, match="return_tensors"):
        LlavaNextImageProcessorFast(**settings())(synthetic(9, 9), return_tensors="tf")


def test_integer_tensors_are_read_as_pixel_numbers_as_transformers_does():
    """int64 & co. go through the float path (resized as numbers, not as 8-bit pixels); transformers'
    torchvision backend does the same up to its own rounding (within half a pixel level: 0.0075 here)."""
    pixels = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 50, 70), dtype=np.uint8))
    processor = LlavaNextImageProcessorFast(**settings())
    reference = ReferenceTorchvision(**settings())
    as_float = processor(pixels.float(), return_tensors="pt")["pixel_values"]
    for dtype in (torch.int64, torch.int32, torch.int16):
        out = processor(pixels.to(dtype), return_tensors="pt")["pixel_values"]
        assert torch.equal(out, as_float)
        theirs = reference(pixels.to(dtype), return_tensors="pt")["pixel_values"]
        assert out.shape == theirs.shape and (out - theirs).abs().max() <= 0.05


@pytest.mark.parametrize("height,width", [(400, 400), (30, 50), (333, 127), (100, 350)])
def test_pinpoints_that_are_not_whole_tiles_give_transformers_partial_edge_tiles(height, width):
    from test_image_processing import PARTIAL_TILES

    image = synthetic(height, width)
    ours = LlavaNextImageProcessorFast(**PARTIAL_TILES)(image, return_tensors="pt")["pixel_values"]
    theirs = ReferenceTorchvision(**PARTIAL_TILES)(image, return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape
    assert ours.shape[1] in (1 + 38 * 19, 1 + 38 * 38)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
