"""Images per second of our two LLaVA-NeXT image processors and transformers' two, on the same images.

    python benchmarks/preprocess.py            # CPU always; CUDA too when there is one
    python benchmarks/preprocess.py --repeats 50 --threads 2

Cases (llava-v1.6 geometry: 336 px tiles, its five pinpoints):
  cpu  photo-1024x768-pil   one 1024x768 photo given as a PIL image
  cpu  photo-1024x768-u8    the same photo as a uint8 [3, H, W] tensor
  cuda batch8-u8-device     8 mixed-size uint8 [3, H, W] tensors already on the GPU
  cuda batch8-pil           the same 8 images as PIL images (decoded, on the host)
Each case is timed after warm-up; the median (and minimum) of ``--repeats`` runs is reported, and
ratios are the reference's median divided by ours (higher is better for us). On a shared machine
the minimums are the steadier figure. ``--threads 2`` mimics a 2-core CPU on a bigger one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import checkpoints  # noqa: E402

from llava_next_plugin.image_processing import LlavaNextImageProcessor  # noqa: E402
from llava_next_plugin.image_processing_fast import LlavaNextImageProcessorFast  # noqa: E402

SETTINGS = dict(
    size={"shortest_edge": 336},
    crop_size={"height": 336, "width": 336},
    image_grid_pinpoints=checkpoints.REAL_PINPOINTS,
)
BATCH_SIZES = [(768, 1024), (480, 640), (1080, 1920), (336, 336), (1000, 300), (600, 800), (2000, 1500), (224, 400)]


def timings_of(run: Callable[[], object], repeats: int, device: str) -> tuple[float, float]:
    """``(median, min)`` wall seconds of ``run`` after two warm-up calls (CUDA work is waited for)."""

    def once() -> float:
        start = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once(), once()
    samples = [once() for _ in range(repeats)]
    return statistics.median(samples), min(samples)


def processors():
    from transformers import LlavaNextImageProcessor as ReferenceTorchvision
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return {
        "ours-fast": LlavaNextImageProcessorFast(**SETTINGS),
        "ours-pil": LlavaNextImageProcessor(**SETTINGS),
        "ref-torchvision": ReferenceTorchvision(**SETTINGS),
        "ref-pil": LlavaNextImageProcessorPil(**SETTINGS),
    }


def report(case: str, images: int, timings: dict[str, tuple[float, float]]) -> None:
    """One line per processor, then ratios (reference / ours) of medians, and of minimums in brackets."""
    print(f"\n{case}")
    for name, (median, fastest) in timings.items():
        print(
            f"  {name:16s} median {median * 1e3:8.2f} ms  min {fastest * 1e3:8.2f} ms  {images / median:8.1f} images/s"
        )
    refs = {k: v for k, v in timings.items() if k.startswith("ref-")}

    def ratio(ref: str, ours: str) -> str:
        return f"{timings[ref][0] / timings[ours][0]:.2f}x (min {timings[ref][1] / timings[ours][1]:.2f}x)"

    if refs and "ours-fast" in timings:
        best_ref = min(refs, key=lambda k: refs[k][0])
        print(f"  ours-fast vs the faster reference ({best_ref}): {ratio(best_ref, 'ours-fast')}")
        for name in refs:
            if name != best_ref:
                print(f"  ours-fast vs {name}: {ratio(name, 'ours-fast')}")
    if "ours-pil" in timings and "ref-pil" in timings:
        print(f"  ours-pil vs ref-pil: {ratio('ref-pil', 'ours-pil')}")


def cpu_cases(repeats: int) -> None:
    procs = processors()
    photo = checkpoints.real_photo("chelsea.png").convert("RGB").resize((1024, 768))
    timings = {}
    for name, proc in procs.items():
        timings[name] = timings_of(lambda proc=proc: proc(photo, return_tensors="pt"), repeats, "cpu")
    report("cpu photo-1024x768-pil (1 image per call)", 1, timings)

    tensor = torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1).contiguous()
    timings = {
        "ours-fast": timings_of(lambda: procs["ours-fast"](tensor, return_tensors="pt"), repeats, "cpu"),
        "ref-torchvision": timings_of(lambda: procs["ref-torchvision"](tensor, return_tensors="pt"), repeats, "cpu"),
    }
    report("cpu photo-1024x768-u8 tensor (1 image per call)", 1, timings)


def cuda_cases(repeats: int) -> None:
    procs = processors()
    photo = checkpoints.real_photo("astronaut.png").convert("RGB")
    pils = [photo.resize((w, h)) for h, w in BATCH_SIZES]
    on_device = [torch.from_numpy(np.asarray(p).copy()).permute(2, 0, 1).contiguous().cuda() for p in pils]
    timings = {
        "ours-fast": timings_of(lambda: procs["ours-fast"](on_device, return_tensors="pt"), repeats, "cuda"),
        "ref-torchvision": timings_of(
            lambda: procs["ref-torchvision"](on_device, return_tensors="pt", device="cuda"), repeats, "cuda"
        ),
    }
    report(f"cuda batch8-u8-device ({torch.cuda.get_device_name()}, 8 images per call)", 8, timings)
    timings = {
        "ours-fast": timings_of(lambda: procs["ours-fast"](pils, return_tensors="pt", device="cuda"), repeats, "cuda"),
        "ref-torchvision": timings_of(
            lambda: procs["ref-torchvision"](pils, return_tensors="pt", device="cuda"), repeats, "cuda"
        ),
    }
    report("cuda batch8-pil (8 PIL images per call, processed on the GPU)", 8, timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, repeats={args.repeats}")
    if not args.skip_cpu:
        cpu_cases(args.repeats)
    if torch.cuda.is_available():
        cuda_cases(args.repeats)
    else:
        print("\n(no CUDA device: GPU cases skipped)")


if __name__ == "__main__":
    main()
