"""Our LlavaNextForConditionalGeneration vs transformers' own: time to first token, 32-token generation, peak memory.

    python benchmarks/model.py                 # CPU, tiny random checkpoint (64+ features everywhere)
    python benchmarks/model.py --cuda          # + full llava-v1.6-mistral-7b geometry, random bf16 weights

Timings: medians of ``--runs`` (>= 5) alternating runs (ours, reference, reference, ours, ...) in one process, after
one warm-up each. Peak memory: each model in its own subprocess (CPU: max RSS; CUDA: max allocated).
The verdict line checks the speed goal: ratio of medians (ours / reference) at most 1.05.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

GOAL = 1.05
NEW_TOKENS = 32


def model_classes():
    from transformers.models.llava_next.modeling_llava_next import LlavaNextForConditionalGeneration as Reference

    from llava_next_plugin.modeling import LlavaNextForConditionalGeneration as Ours

    return {"ours": Ours, "reference": Reference}


# --- inputs ------------------------------------------------------------------------------------------


def cpu_checkpoint(folder: Path) -> Path:
    import checkpoints

    if not (folder / "config.json").exists():
        checkpoints.build_checkpoint(folder, width=128, vision_width=64)
    return folder


def cpu_inputs(folder: Path) -> dict:
    """One real photo and a short prompt, through transformers' processor (the reference)."""
    import checkpoints
    from transformers import LlavaNextProcessor

    processor = LlavaNextProcessor.from_pretrained(folder)
    image = checkpoints.real_photo("chelsea.png").convert("RGB")
    return dict(processor(images=[image], text=["[INST] <image>\nDescribe the picture. [/INST]"], return_tensors="pt"))


def full_geometry_config():
    """llava-v1.6-mistral-7b's shapes: CLIP ViT-L/14 at 336 px, Mistral 7B, llava v1.6 pinpoints."""
    from transformers import AutoConfig, CLIPVisionConfig

    from llava_next_plugin.configuration import DEFAULT_PINPOINTS, LlavaNextConfig

    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = AutoConfig.for_model(
        "mistral",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32064,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        sliding_window=None,
        rms_norm_eps=1e-5,
        pad_token_id=32001,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlavaNextConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=32000,
        image_grid_pinpoints=DEFAULT_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=576,
        tie_word_embeddings=False,
    )


def full_geometry_inputs(config, device) -> dict:
    """A 1024x768 image (2340 image tokens) in a ~2361-token prompt; random pixels."""
    geom = config.image_geometry(768, 1024)
    text_before, text_after = (
        [1, 733, 16289, 28793, 28705],
        [13] + [1000 + i for i in range(15)] + [733, 28748, 16289, 28793],
    )
    ids = text_before + [config.image_token_index] * geom.num_tokens + text_after
    input_ids = torch.tensor([ids], device=device)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, geom.num_tiles, 3, config.tile_size, config.tile_size, generator=generator)
    return dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=pixels.to(device, torch.bfloat16),
        image_sizes=torch.tensor([[768, 1024]], device=device),
    )


def load(which: str, source, device: str):
    """``source``: a checkpoint folder (CPU) or ``"full"`` (random bf16 weights at 7B geometry, seeded)."""
    cls = model_classes()[which]
    if source != "full":
        return cls.from_pretrained(source).eval()
    config = full_geometry_config()
    torch.manual_seed(0)
    with torch.device(device):
        model = cls._from_config(config, dtype=torch.bfloat16)
    return model.eval()


# --- measurements ------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_generate(model, inputs, new_tokens: int, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    _sync(device)
    assert out.shape[1] == inputs["input_ids"].shape[1] + new_tokens
    return time.perf_counter() - start


def compare_speed(models: dict, inputs: dict, runs: int, device: str) -> dict:
    """Medians of alternating runs: time to first token and time for NEW_TOKENS tokens."""
    for model in models.values():  # warm-up
        timed_generate(model, inputs, 2, device)
    times = {name: {"ttft": [], "gen": []} for name in models}
    order = list(models)
    for run in range(runs):
        # ABBA order: neither model always runs first (caches, CPU frequency, neighbours' load).
        for name in order if run % 2 == 0 else order[::-1]:
            times[name]["ttft"].append(timed_generate(models[name], inputs, 1, device))
            times[name]["gen"].append(timed_generate(models[name], inputs, NEW_TOKENS, device))
    return {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}


def peak_memory_child(which: str, source: str, device: str) -> None:
    """Runs in its own process: load, generate, print the peak memory in MiB as JSON."""
    model = load(which, source if source == "full" else Path(source), device)
    inputs = full_geometry_inputs(model.config, device) if source == "full" else cpu_inputs(Path(source))
    timed_generate(model, inputs, NEW_TOKENS, device)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"peak_mib": peak}))


def peak_memory(which: str, source, device: str) -> float:
    cmd = [sys.executable, __file__, "--peak-child", which, "--source", str(source), "--device", device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def report(title: str, speed: dict, memory: dict, tokens_in: int) -> bool:
    ours, ref = speed["ours"], speed["reference"]
    ttft_ratio, gen_ratio = ours["ttft"] / ref["ttft"], ours["gen"] / ref["gen"]
    print(f"\n== {title} (prompt {tokens_in} tokens, {NEW_TOKENS} new tokens)")
    print(f"{'':12}{'first token':>14}{f'{NEW_TOKENS} tokens':>14}{'tokens/s':>10}{'peak MiB':>11}")
    for name in ("ours", "reference"):
        t = speed[name]
        print(
            f"{name:12}{t['ttft'] * 1e3:>11.1f} ms{t['gen']:>12.3f} s{NEW_TOKENS / t['gen']:>10.1f}"
            f"{memory[name]:>11.0f}"
        )
    ok = ttft_ratio <= GOAL and gen_ratio <= GOAL
    print(
        f"ratio ours/reference: first token {ttft_ratio:.3f}, {NEW_TOKENS} tokens {gen_ratio:.3f}, "
        f"memory {memory['ours'] / memory['reference']:.3f} -> {'OK' if ok else 'SLOWER'} (goal <= {GOAL})"
    )
    return ok


def run_cpu(runs: int, threads: int) -> bool:
    torch.set_num_threads(threads)
    folder = cpu_checkpoint(Path(tempfile.gettempdir()) / "llava-next-bench-cpu")
    models = {name: load(name, folder, "cpu") for name in ("ours", "reference")}
    inputs = cpu_inputs(folder)
    speed = compare_speed(models, inputs, runs, "cpu")
    del models
    memory = {name: peak_memory(name, folder, "cpu") for name in ("ours", "reference")}
    return report("CPU, tiny random checkpoint", speed, memory, inputs["input_ids"].shape[1])


def run_cuda(runs: int) -> bool:
    device = "cuda"
    speed = {}
    inputs = None
    # One model on the GPU at a time would make alternating runs impossible; two 7B bf16 models fit in 80 GB.
    models = {name: load(name, "full", device) for name in ("ours", "reference")}
    models["ours"].load_state_dict(models["reference"].state_dict())
    inputs = full_geometry_inputs(models["ours"].config, device)
    speed = compare_speed(models, inputs, runs, device)
    del models
    torch.cuda.empty_cache()
    memory = {name: peak_memory(name, "full", device) for name in ("ours", "reference")}
    return report(
        f"CUDA {torch.cuda.get_device_name()}, llava-v1.6-mistral-7b geometry, random bf16",
        speed,
        memory,
        inputs["input_ids"].shape[1],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 is the least noisy on a shared machine)")
    parser.add_argument("--cuda", action="store_true", help="also run the full-geometry section on CUDA")
    parser.add_argument("--peak-child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        return peak_memory_child(args.peak_child, args.source, args.device)
    runs = max(5, args.runs)
    ok = run_cpu(runs, args.threads)
    if args.cuda:
        if not torch.cuda.is_available():
            raise SystemExit("--cuda: no CUDA device is available")
        ok = run_cuda(runs) and ok
    print("\nverdict:", "ours is not slower than the reference" if ok else "ours is SLOWER than the reference")


if __name__ == "__main__":
    main()
