"""Benchmark the engine on a GPU: llava-v1.6-mistral-7B geometry, random bf16 weights, ours vs transformers'.

Both models hold the same weights (transformers' ``LlavaNextForConditionalGeneration`` shares our model's
tensors), one 1024x768 image (2361 prompt tokens at 7B geometry). Figures printed, in one run (< 8 min on an
H100-class card):

* time to first token: the engine vs the reference's ``generate`` (one token);
* decode tokens/s at batch 1: the engine vs the reference's default ``generate`` (issue 12: >= 2.5x);
* batch of 8 requests with mixed image sizes, tokens/s: the engine vs the reference's batched ``generate``
  (>= 2x);
* peak memory of each, the KV slots the engine allocated, and its compile warm-up time.

Usage (one command)::

    python benchmarks/gpu.py                  # CUDA, 7B geometry, bf16, compiled decode step
    python benchmarks/gpu.py --no-compile     # the eager engine
    python benchmarks/gpu.py --smoke          # tiny sizes on CPU (what CI runs): every code path, no figures

On this workplace's lent GPU machine, whose image has older transformers and no mistral_common, use
``benchmarks/gpu_device.sh`` (it says how). Each figure is printed (and flushed) as soon as it is measured, so a
run stopped at its time limit still reports what it got.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "sdk"))  # llava_next_sdk, when the checkout is run without installing it
sys.path.insert(0, str(ROOT))


def configs(smoke: bool):
    """(our LlavaNextConfig, tile size, patch size) for 7B geometry, or tiny sizes when *smoke*."""
    from transformers import CLIPVisionConfig, MistralConfig

    from llava_next_plugin import LlavaNextConfig

    if not smoke:  # llava-v1.6-mistral-7b's geometry: one definition, shared with benchmarks/model.py
        from model import full_geometry_config

        return full_geometry_config(), 336, 14
    import checkpoints

    text = MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=checkpoints.VOCAB_SIZE,
        max_position_embeddings=4096,
        pad_token_id=checkpoints.PAD_TOKEN_ID,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=checkpoints.TINY_TILE,
        patch_size=checkpoints.TINY_PATCH,
        projection_dim=32,
    )
    tile, patch, pinpoints = checkpoints.TINY_TILE, checkpoints.TINY_PATCH, checkpoints.TINY_PINPOINTS
    config = LlavaNextConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=32000,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=pinpoints,
        image_seq_length=(tile // patch) ** 2,
        tie_word_embeddings=False,
    )
    return config, tile, patch


def build(smoke: bool, device: str, dtype):
    """(our model, transformers' model sharing its weights, processor)."""
    import checkpoints
    import torch
    import transformers

    from llava_next_plugin.modeling import LlavaNextForConditionalGeneration

    config, tile, patch = configs(smoke)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            ours = LlavaNextForConditionalGeneration(config).eval()
            with torch.no_grad():
                for parameter in ours.parameters():  # random matrices of a sane scale; norms stay at 1
                    if parameter.dim() >= 2:
                        parameter.normal_(0, 0.02)
            reference = transformers.LlavaNextForConditionalGeneration(
                transformers.LlavaNextConfig(
                    **{k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")}
                )
            )
    finally:
        torch.set_default_dtype(previous)
    reference = reference.eval()  # built on the device in dtype already (a .to(dtype) would cast its fp32 rotary
    # buffers, which ours keep in fp32)
    missing, unexpected = reference.load_state_dict(ours.state_dict(), strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(
            f"weights do not map onto transformers' model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    folder = Path(tempfile.mkdtemp())
    tokenizer = checkpoints.build_tokenizer(folder)
    image_processor = transformers.LlavaNextImageProcessor(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=config.image_grid_pinpoints,
    )
    processor = transformers.LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=checkpoints.MISTRAL_CHAT_TEMPLATE,
    )
    return ours, reference, processor


def photo(width: int, height: int):
    import checkpoints

    return checkpoints.real_photo().convert("RGB").resize((width, height))


def ask(text: str, images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def reference_generate(model, processor, images, tokens: int, device: str) -> tuple[float, int]:
    """(seconds, generated tokens) of transformers' greedy ``generate`` over *images* (one prompt each)."""
    import torch

    prompt = "[INST] <image>\nDescribe the picture. [/INST]"
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding=True).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    sync(device)
    return time.perf_counter() - start, (out.shape[1] - inputs["input_ids"].shape[1]) * len(images)


def say(text: str) -> None:
    """Print *text* now (a run stopped at its limit keeps every figure printed before)."""
    print(text, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (CI): runs every path quickly")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per request in the decode figures")
    parser.add_argument("--context", type=int, default=4096, help="the engine's max context (sizes its KV slots)")
    args = parser.parse_args()

    import torch

    from llava_next_plugin.engine import Engine, SamplingParams

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke for the CPU smoke mode")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    tokens = 8 if args.smoke else args.tokens
    size = (64, 48) if args.smoke else (1024, 768)
    mixed = (
        [(64, 48), (48, 64), (32, 32), (96, 32), (32, 96), (80, 60), (60, 80), (40, 40)]
        if args.smoke
        else [(1024, 768), (768, 1024), (336, 336), (1008, 336), (336, 1008), (800, 600), (600, 800), (512, 512)]
    )
    begun = time.perf_counter()
    say(f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, device {device}")
    ours, reference, processor = build(args.smoke, device, dtype)
    say(
        f"built {'tiny' if args.smoke else '7B-geometry'} models on {device} ({dtype}) in "
        f"{time.perf_counter() - begun:.1f} s"
    )

    # --- the reference: transformers' generate
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reference_generate(reference, processor, [photo(*size)], 2, device)  # warm
    ttft_ref, _ = reference_generate(reference, processor, [photo(*size)], 1, device)
    t_ref, n_ref = reference_generate(reference, processor, [photo(*size)], tokens, device)
    decode_ref = (n_ref - 1) / max(t_ref - ttft_ref, 1e-9)
    say(f"reference: time to first token {ttft_ref * 1e3:.0f} ms, decode at batch 1 {decode_ref:.1f} tok/s")
    t_batch_ref, n_batch_ref = reference_generate(reference, processor, [photo(*s) for s in mixed], tokens, device)
    peak_ref = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    gib = 1 << 30
    say(f"reference: batch of 8 {n_batch_ref / t_batch_ref:.1f} tok/s, peak memory {peak_ref / gib:.2f} GiB")
    del reference
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    # --- ours: the engine
    engine = Engine(
        ours,
        processor,
        max_batch_size=8,
        max_context=args.context,
        compile=False if (args.no_compile or args.smoke) else None,
    )
    # random weights: every request generates its max_tokens, as min_new_tokens makes the reference do (the set is
    # the engine's own, which its batch reads)
    engine.eos_token_ids.clear()
    greedy = SamplingParams(max_tokens=tokens, temperature=0)
    prepared = [engine.prepare(ask("Describe the picture."), [photo(*s)], greedy) for s in mixed]
    # CUDA graphs are recorded per length bucket up to the warm-up context: the longest these requests reach
    longest = max(p.prompt_tokens for p in prepared) + tokens
    warm = engine.warm_up(context=longest if engine.runner.compiled else 1)
    runner = engine.runner
    say(
        f"engine warm-up up to {longest} tokens of context: {warm:.1f} s, "
        + (
            f"compiled{' (CUDA graphs)' if runner.graphs else ''}"
            if runner.compiled
            else "eager"
            + (f" (the compiled step was given up: {runner.compile_failure})" if runner.compile_failure else "")
        )
    )
    engine.start()
    # a warm request (its image is none of the timed ones: nothing of it is reused by them)
    engine.generate(
        ask("Describe the picture."), [photo(*size).transpose(1)], SamplingParams(max_tokens=2, temperature=0)
    )
    first = engine.generate(
        ask("Describe the picture."), [photo(*size).rotate(180)], SamplingParams(max_tokens=1, temperature=0)
    )
    single = engine.generate(ask("Describe the picture."), [photo(*size).transpose(0)], greedy)
    decode_ours = (single.completion_tokens - 1) / max(single.total_seconds - single.time_to_first_token, 1e-9)
    say(
        f"time to first token: engine {first.time_to_first_token * 1e3:.0f} ms, reference "
        f"{ttft_ref * 1e3:.0f} ms  (goal: engine <= reference)"
    )
    say(
        f"decode, batch 1: engine {decode_ours:.1f} tok/s, reference generate {decode_ref:.1f} tok/s, "
        f"ratio {decode_ours / decode_ref:.2f}x (goal >= 2.5x)"
    )
    start = time.perf_counter()
    handles = [engine.submit(p) for p in prepared]
    n_batch = sum(h.result(timeout=600).completion_tokens for h in handles)
    t_batch = time.perf_counter() - start
    peak_ours = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    engine.shutdown(drain=False)

    say(f"prompt: {prepared[0].prompt_tokens} tokens for a {size[0]}x{size[1]} image; {tokens} tokens per request")
    say(
        f"batch of 8, mixed images: engine {n_batch / t_batch:.1f} tok/s, reference batched generate "
        f"{n_batch_ref / t_batch_ref:.1f} tok/s, ratio {(n_batch / t_batch) / (n_batch_ref / t_batch_ref):.2f}x "
        "(goal >= 2x)"
    )
    say(
        f"peak memory: engine {peak_ours / gib:.2f} GiB (KV slots {engine.kv_cache_bytes / gib:.2f} GiB, reuse up to "
        f"{engine.reuse_bytes / gib:.2f} GiB), reference {peak_ref / gib:.2f} GiB (goal: engine <= reference + KV "
        "slots + reuse)"
    )
    say(
        f"warm-up ({'compiled' if runner.compiled else 'eager'}): {warm:.1f} s; whole run "
        f"{time.perf_counter() - begun:.0f} s"
        + (f"; the compiled step was given up: {runner.compile_failure}" if runner.compile_failure else "")
    )


if __name__ == "__main__":
    main()
