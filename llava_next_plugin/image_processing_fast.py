"""LlavaNextImageProcessorFast: anyres preprocessing in plain torch, on CPU or CUDA.

The same views as :class:`~llava_next_plugin.image_processing.LlavaNextImageProcessor` (base view,
then the grid tiles row by row; geometry from :mod:`llava_next_plugin.geometry`), computed with few,
large tensor operations per image:

1. two resizes of the original image (``torch.nn.functional.interpolate``, antialiased; uint8
   kernels on channels-last memory on CPU, float on CUDA, rounded back to whole pixel values);
2. each grid tile copied straight from the fitted image into ``pixel_values`` (uint8 -> float32
   and channels-last -> planar in the same copy; zeros only in the tile's margins, no canvas);
3. one in-place multiply-add per view (rescale + normalize fused), right after it is written.

Pinpoints that are not whole numbers of tiles leave partial tiles at the right and bottom edges: then,
as in transformers, every view is resized (``size``) and centre-cropped (``crop_size``) on its own.

On a CPU with more than one torch thread, the base view (resize, copy, normalize) is made on one
background thread while the grid's resize runs: torch's resize kernels use a single core.

torchvision is not needed. Inputs: PIL images, numpy uint8 arrays ``[H, W(, C)]``, torch uint8 or
float tensors ``[C, H, W]`` (on any device), lists of them, or 4-D batches.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BatchFeature

from . import geometry
from .errors import ImageError, InputError
from .image_processing import (
    UNSET,
    LlavaNextImageProcessorBase,
    LlavaNextImageProcessorKwargs,
    PreprocessSettings,
    _layout,
    check_image_size,
    per_image,
    resize_worker,
    to_rgb_array,
)

__all__ = ["LlavaNextImageProcessorFast", "LlavaNextImageProcessorFastKwargs"]

# The keyword arguments of this processor under the name transformers' convention gives them
# (``<processor class>Kwargs`` in the processor's module): the same TypedDict as the PIL processor's.
LlavaNextImageProcessorFastKwargs = LlavaNextImageProcessorKwargs

# PIL resampling filter -> interpolate mode (LANCZOS: torch's antialiased kernel, where the build has one)
INTERPOLATE_MODES = {0: "nearest-exact", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LANCZOS: dict[tuple[str, torch.dtype], bool] = {}  # whether torch resizes with LANCZOS here, by device and dtype


def _lanczos_here(image: torch.Tensor) -> bool:
    """Whether ``F.interpolate`` has a LANCZOS kernel for *image*'s device and dtype (torch's CPU kernels, in
    recent releases); where it has none, LANCZOS falls back to bicubic with one warning, as transformers' processor
    falls back on CUDA."""
    key = (image.device.type, image.dtype)
    if key not in _LANCZOS:
        try:
            probe = torch.zeros((1, 3, 4, 4), dtype=image.dtype, device=image.device)
            F.interpolate(probe, size=(2, 3), mode="lanczos", antialias=True, align_corners=False)
            _LANCZOS[key] = True
        except (NotImplementedError, RuntimeError, ValueError):
            _LANCZOS[key] = False
            warnings.warn(
                f"resample=1 (LANCZOS): this torch ({torch.__version__}) has no LANCZOS resize for {image.dtype} on "
                f"{image.device.type}; bicubic is used instead. For LANCZOS use the PIL LlavaNextImageProcessor",
                UserWarning,
                stacklevel=4,
            )
    return _LANCZOS[key]


def _resize(image: torch.Tensor, size: tuple[int, int], mode: str, whole_pixels: bool) -> torch.Tensor:
    """``[1, 3, H, W]`` -> ``[1, 3, h, w]``, same dtype; float results of uint8 images are rounded and clamped.

    uint8 inputs use torch's uint8 CPU kernels (what torchvision uses); elsewhere the resize runs in
    float32 and, for images that were uint8 (``whole_pixels``), is brought back to whole pixel values.
    """
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    if mode == "lanczos" and not _lanczos_here(image):
        mode = "bicubic"
    smooth = mode in ("bilinear", "bicubic", "lanczos")
    resized = F.interpolate(image, size=size, mode=mode, antialias=smooth, align_corners=False if smooth else None)
    if whole_pixels and resized.is_floating_point():
        resized = resized.clamp_(0, 255).round_()
    return resized


def _resize_source(image: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` -> the ``[1, 3, H, W]`` both resizes read, in the layout their kernels like best.

    torch's uint8 CPU resize kernels work on channels-last memory: PIL and numpy images already are
    (``[H, W, 3]`` viewed as ``[3, H, W]``); planar uint8 tensors are interleaved once here (numpy's
    stack is several times faster than ``contiguous(memory_format=channels_last)`` for uint8). On other
    devices uint8 images are converted to float once, for both resizes.
    """
    if image.stride(0) == 0:  # an expanded grey image: give the kernels real channels
        image = image.contiguous()
    if image.dtype == torch.uint8 and image.device.type != "cpu":
        image = image.float()
    elif image.dtype == torch.uint8 and image.stride(0) != 1:
        image = torch.from_numpy(_interleave(image.numpy())).permute(2, 0, 1)
    if image.stride(0) == 1:  # channels-last memory: stride the batch dim so interpolate keeps it
        return image.as_strided((1, *image.shape), (image.numel(), *image.stride()))
    return image.unsqueeze(0)


def _interleave(planar: np.ndarray) -> np.ndarray:
    """``[3, H, W]`` -> ``[H, W, 3]``; with more than one torch thread, the top half on the background thread."""
    if torch.get_num_threads() == 1:
        return np.stack(list(planar), axis=-1)
    interleaved = np.empty((*planar.shape[1:], planar.shape[0]), dtype=planar.dtype)
    half = planar.shape[1] // 2

    def interleave_rows(rows: slice) -> None:
        np.stack(list(planar[:, rows]), axis=-1, out=interleaved[rows])

    top_job = resize_worker().submit(interleave_rows, slice(0, half))
    interleave_rows(slice(half, None))
    top_job.result()
    return interleaved


def _center_crop(views: torch.Tensor, crop: tuple[int, int] | None) -> torch.Tensor:
    """``[N, 3, H, W]`` centre-cropped (zero-padded where smaller) to ``crop``; as they are when None
    (``do_center_crop=False``)."""
    if crop is None:
        return views
    height, width = views.shape[-2:]
    crop_h, crop_w = crop
    if crop_h > height or crop_w > width:
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        # the odd pixel of padding goes right / below, as in transformers' torchvision backend
        views = F.pad(views, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        height, width = views.shape[-2:]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return views[..., top : top + crop_h, left : left + crop_w]


class LlavaNextImageProcessorFast(LlavaNextImageProcessorBase):
    """LLaVA-NeXT anyres image processor in torch (CPU and CUDA), without torchvision.

    ``processor(images, return_tensors="pt", device="cuda")`` returns a ``BatchFeature`` with ``pixel_values``
    ``[batch, max_views, 3, H, W]`` float32 on ``device`` (zeros where an image has fewer views; uint8 for 8-bit
    images with neither ``do_rescale`` nor ``do_normalize``, as transformers gives them) and
    ``image_sizes`` ``[batch, 2]`` int64 ``(height, width)`` on the CPU. ``device`` defaults to the
    processor's ``device`` attribute (``LlavaNextImageProcessorFast(device="cuda")`` or
    ``from_pretrained(path, device="cuda")``), else the device of the first tensor given, else the
    CPU. With ``do_pad=False``, ``pixel_values`` is a list of ``[views_i, 3, H, W]`` tensors (one tensor when
    every image has as many views, as transformers stacks them). With
    ``return_tensors=None`` (the default), as transformers: a list of one tensor per image and a list of
    ``(height, width)`` tuples.

    Against transformers' torchvision ``LlavaNextImageProcessor``: same shapes, sizes and views;
    on CPU the pixels agree to float rounding (the same uint8 resize kernels).
    """

    def __init__(self, device: str | torch.device | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if device is not None:
            self.device = str(device)  # saved as a plain string

    def preprocess(
        self,
        images: Any,
        return_tensors: Any = UNSET,
        device: str | torch.device | None = None,
        input_data_format: Any = UNSET,
        data_format: Any = UNSET,
        **overrides: Any,
    ) -> BatchFeature:
        return_tensors, input_data_format, data_format = self.call_defaults(
            return_tensors, input_data_format, data_format
        )
        if data_format not in (None, "channels_first") and getattr(data_format, "value", None) != "channels_first":
            raise InputError("pixel_values are always channels_first [3, H, W]", param="data_format")
        settings = self.settings(**overrides)
        mode = INTERPOLATE_MODES.get(settings.resample)
        if mode is None:
            raise InputError(
                f"resample={settings.resample} has no torch kernel: use 0 (nearest), 1 (LANCZOS), 2 (bilinear) or "
                "3 (bicubic), or the PIL LlavaNextImageProcessor",
                param="resample",
            )
        flat = self.flatten_images(images)
        if not flat:
            raise ImageError("no images were given: pass at least one image")
        device = _target_device(flat, device if device is not None else getattr(self, "device", None))
        with torch.no_grad():
            pixels = [
                _to_tensor(img, i, device, input_data_format, settings.do_convert_rgb) for i, img in enumerate(flat)
            ]
            sizes = [(int(p.shape[-2]), int(p.shape[-1])) for p in pixels]
            counts = [settings.num_views(h, w) for h, w in sizes]
            view_h, view_w = settings.view_size
            scale = torch.tensor(settings.scale, dtype=torch.float32).view(3, 1, 1).to(device)
            offset = torch.tensor(settings.offset, dtype=torch.float32).view(3, 1, 1).to(device)
            # neither rescaled nor normalized, 8-bit images stay 8-bit (as transformers' do)
            whole = settings.identity and all(p.dtype == torch.uint8 for p in pixels)
            dtype = torch.uint8 if whole else torch.float32
            # stacked when padded, or when every image has as many views (as transformers stacks them)
            if settings.do_pad or len(set(counts)) == 1:
                pixel_values: Any = torch.empty(
                    (len(pixels), max(counts), 3, view_h, view_w), dtype=dtype, device=device
                )
            else:
                pixel_values = [torch.empty((n, 3, view_h, view_w), dtype=dtype, device=device) for n in counts]
            for i, image in enumerate(pixels):
                normalize = None if settings.identity else (scale, offset)
                self.copy_views(image, settings, mode, pixel_values[i][: counts[i]], normalize)
                if settings.do_pad:
                    pixel_values[i, counts[i] :].zero_()  # the padding views
        kind = getattr(return_tensors, "value", return_tensors)
        image_sizes: Any = torch.tensor(sizes, dtype=torch.int64).reshape(len(sizes), 2)  # or numpy, below
        if kind == "np":
            pixel_values = (
                [p.cpu().numpy() for p in pixel_values]
                if isinstance(pixel_values, list)
                else pixel_values.cpu().numpy()
            )
            image_sizes = image_sizes.numpy()
        elif kind is None:  # transformers' shape of "no tensors": one tensor per image, sizes as tuples
            return BatchFeature(data=per_image(pixel_values, image_sizes))
        elif kind != "pt":
            raise InputError(f"return_tensors={return_tensors!r}: use 'pt', 'np' or None", param="return_tensors")
        return BatchFeature(data={"pixel_values": pixel_values, "image_sizes": image_sizes})

    @staticmethod
    def copy_views(
        image: torch.Tensor,
        settings: PreprocessSettings,
        mode: str,
        out: torch.Tensor,
        normalize: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        """The views of one ``[3, H, W]`` image into ``out`` ``[1 + rows*cols, 3, h, w]``, normalized.

        ``normalize`` is ``(scale, offset)``, each ``[3, 1, 1]`` float32: rescale + normalize fused into
        ``x * scale + offset``, applied to each view right after it is written (while it is in cache); ``None``
        for neither (``out`` may then be uint8, as the image is).
        """

        def normalized(views: torch.Tensor) -> None:
            if normalize is not None:
                views.mul_(normalize[0]).add_(normalize[1])

        height, width = image.shape[-2:]
        best_h, best_w = settings.best_resolution(height, width)
        new_h, new_w = geometry.resize_within(height, width, best_h, best_w)
        top, left = geometry.pad_offsets(new_h, new_w, best_h, best_w)
        rows, cols = geometry.view_grid_shape(best_h, best_w, settings.tile_size)
        tile = settings.tile_size

        whole_pixels = image.dtype == torch.uint8
        source = _resize_source(image)
        partial = settings.partial_tiles(best_h, best_w)
        plain_tiles = not (settings.view_resize or settings.center_crop or partial)

        @torch.no_grad()  # grad mode is per thread: the worker's is on
        def base_view() -> torch.Tensor:
            """The base view ``[1, 3, h, w]``; with plain tiles also written, normalized, to ``out[0]``."""
            base = _resize(source, settings.base_size, mode, whole_pixels)
            if plain_tiles:
                normalized(out[0].copy_(base[0]))
            return base

        if source.device.type == "cpu" and torch.get_num_threads() > 1:
            # torch's CPU resize kernels use one core each: make the base view beside the grid's resize.
            base_job = resize_worker().submit(base_view)
            resized = _resize(source, (new_h, new_w), mode, whole_pixels)[0]  # [3, new_h, new_w]
            base = base_job.result()
        else:
            resized = _resize(source, (new_h, new_w), mode, whole_pixels)[0]
            base = base_view()
        if plain_tiles:
            # Each tile is written straight from the resized image: no canvas, zeros only in the margins.
            for index in range(rows * cols):
                row, col = divmod(index, cols)
                _paste_tile(resized, (top - row * tile, left - col * tile), out[1 + index])
                normalized(out[1 + index])
            return

        canvas = resized.new_zeros((3, best_h, best_w))
        canvas[:, top : top + new_h, left : left + new_w] = resized
        if partial:  # edge tiles smaller than the rest: each view resized and cropped on its own
            out[0].copy_(_center_crop(base, settings.crop)[0])
            for index in range(rows * cols):
                row, col = divmod(index, cols)
                piece = canvas[:, row * tile : (row + 1) * tile, col * tile : (col + 1) * tile][None]
                target = settings.partial_view_size(*piece.shape[-2:])
                if target != tuple(piece.shape[-2:]):
                    if piece.dtype == torch.uint8:  # torch's uint8 kernels, as torchvision: channels-last memory
                        piece = piece.contiguous(memory_format=torch.channels_last)
                    piece = _resize(piece, target, mode, whole_pixels)
                out[1 + index].copy_(_center_crop(piece, settings.crop)[0])
            normalized(out)
            return
        tiles = canvas.view(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4)  # [rows, cols, 3, T, T], a view
        tiles = tiles.reshape(rows * cols, 3, tile, tile)
        if settings.view_resize:
            if tiles.dtype == torch.uint8:  # torch's uint8 kernels, as torchvision: channels-last memory
                tiles = tiles.contiguous(memory_format=torch.channels_last)
            tiles = _resize(tiles, settings.view_resize, mode, whole_pixels)
        if settings.center_crop:
            tiles, base = _center_crop(tiles, settings.center_crop), _center_crop(base, settings.center_crop)
        out[1:].copy_(tiles)
        out[0].copy_(base[0])
        normalized(out)


def _paste_tile(image: torch.Tensor, origin: tuple[int, int], tile: torch.Tensor) -> None:
    """Fill ``tile`` ``[3, T, T]`` with the part of ``image`` ``[3, h, w]`` placed at ``origin`` (tile coordinates).

    ``origin`` is where the image's top-left pixel lands, relative to the tile's top-left corner
    (negative when the image starts before the tile). Pixels the image does not cover are zeros.
    """
    size_h, size_w = tile.shape[-2:]
    height, width = image.shape[-2:]
    top, left = origin
    y0, y1 = min(max(top, 0), size_h), min(max(top + height, 0), size_h)  # rows of the tile the image covers
    x0, x1 = min(max(left, 0), size_w), min(max(left + width, 0), size_w)
    if y0 == y1 or x0 == x1:
        tile.zero_()
        return
    tile[:, :y0].zero_()
    tile[:, y1:].zero_()
    tile[:, y0:y1, :x0].zero_()
    tile[:, y0:y1, x1:].zero_()
    tile[:, y0:y1, x0:x1].copy_(image[:, y0 - top : y1 - top, x0 - left : x1 - left])


def _target_device(images: list[Any], device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for image in images:
        if isinstance(image, torch.Tensor):
            return image.device
    return torch.device("cpu")


def _to_tensor(image: Any, index: int, device: torch.device, input_data_format: Any, convert_rgb: bool) -> torch.Tensor:
    """One image as a ``[3, H, W]`` tensor on ``device``: uint8, or float for float inputs."""
    if isinstance(image, np.ndarray) and image.dtype.kind == "f":
        image = torch.from_numpy(np.ascontiguousarray(image))  # float arrays: the tensor path below
        if input_data_format is None and image.ndim == 3:
            input_data_format = _layout(image.shape, None, "channels_last")
    if not isinstance(image, torch.Tensor):
        pixels = to_rgb_array(image, index, input_data_format, convert_rgb)  # [H, W, 3] uint8
        if any(stride < 0 for stride in pixels.strides):  # e.g. a flipped view: torch needs positive strides
            pixels = np.ascontiguousarray(pixels)
        with warnings.catch_warnings():  # PIL's arrays are read-only; we never write to them
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(pixels)
        return tensor.to(device).permute(2, 0, 1)
    return _tensor_to_rgb(image.to(device), index, input_data_format, convert_rgb)


def _tensor_to_rgb(image: torch.Tensor, index: int, input_data_format: Any, convert_rgb: bool) -> torch.Tensor:
    """A ``[C, H, W]`` / ``[H, W, C]`` / ``[H, W]`` tensor as ``[3, H, W]``; alpha composited on white."""
    if image.ndim == 2:
        image = image.unsqueeze(0)
    elif image.ndim == 3:
        if _layout(image.shape, input_data_format, "channels_first") == "channels_last":
            image = image.permute(2, 0, 1)
    else:
        raise ImageError(f"an image tensor needs 2 or 3 dimensions, got shape {tuple(image.shape)}", index=index)
    check_image_size(image.shape[-2], image.shape[-1], index)
    if image.dtype == torch.bool:
        image = image.to(torch.uint8) * 255
    elif image.dtype == torch.uint16 and image.numel() and int(image.to(torch.int32).max()) <= 255:
        image = image.to(torch.uint8)  # 8-bit values held in 16 bits: as they are, as transformers reads them
    elif image.dtype == torch.uint16:  # 16-bit images: scaled to 8 bits, as for PIL's I;16 images
        image = image.to(torch.float32).mul_(255 / 65535).round_().to(torch.uint8)
    elif image.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint32, torch.uint64):
        image = image.to(torch.float32)  # pixel values as numbers, as transformers' torchvision backend reads them
    if image.dtype != torch.uint8 and image.dtype not in FLOAT_DTYPES:
        raise ImageError(
            f"tensors must be uint8 (0..255), uint16, bool, float or integer, got {image.dtype}: convert with "
            f".to(torch.uint8)",
            index=index,
        )
    if image.dtype in (torch.float16, torch.bfloat16, torch.float64):
        image = image.float()
    if image.is_floating_point() and not bool(torch.isfinite(image).all()):  # it would make the logits NaN too
        raise ImageError("the image holds NaN or infinite values: give pixel values in [0, 1] or [0, 255]", index=index)
    channels = image.shape[0]
    if channels == 3:
        return image
    if not convert_rgb or channels not in (1, 2, 4):
        raise ImageError(
            f"an image needs 3 channels{'' if not convert_rgb else ' (or 1, 2, 4 to convert)'}, got {channels} "
            f"(shape {tuple(image.shape)})" + (": pass do_convert_rgb=True" if not convert_rgb else ""),
            index=index,
        )
    if channels == 1:
        return image.expand(3, -1, -1)
    # Grey+alpha or RGBA over white. Float images are taken as [0, 1] when they fit, else [0, 255].
    white = 255.0 if image.dtype == torch.uint8 or float(image.max()) > 1 else 1.0
    colour, alpha = image[:-1].float(), image[-1:].float() / white
    rgb = (colour * alpha).add_((1 - alpha) * white)
    if image.dtype == torch.uint8:
        rgb = rgb.round_().to(torch.uint8)
    return rgb.expand(3, -1, -1) if channels == 2 else rgb
