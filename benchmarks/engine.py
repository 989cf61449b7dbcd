"""Benchmark the engine on CPU against the previous engine (the single-class one, run from git), in one run.

Figures printed (ratios are what matter on a shared CPU; no assertions):

* throughput: 16 concurrent streams of 32 tokens on a small checkpoint, tokens/s of the new engine and of
  the previous one, and their ratio (issue 12 asks >= 2x): the median of ``--rounds`` runs of each, taking
  turns, since one run lasts a fraction of a second and a shared CPU is not steady for that long (the garbage
  collector is off while a run is timed, as ``timeit`` does); then the
  same streams arriving ``--gap`` seconds apart, so that each joins a batch already decoding;
* stall: on a mid-size checkpoint, while a ~3k-token prompt joins two running streams, the largest gap
  between two tokens of a running stream, as a fraction of that prompt's time to first token (<= 1/3);
* second turn: time to first token of a follow-up question about the same image (same first exchange) over
  the first turn's (<= 0.35x with prefix and image reuse);
* the same throughput with long prompts (``--prompt-words``, ~600-1200 words: the previous engine prefills
  them all in one padded forward, the new one 8 chunks at once and then a chunk per step while streams decode);
* optionally (``--compile``) the same throughput with the decode step compiled, taking its turn in each round.

Usage::

    python benchmarks/engine.py                 # builds the checkpoints in a temp folder
    python benchmarks/engine.py --previous c4886c1 --streams 16 --tokens 32 --rounds 7
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import itertools
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def previous_engine_module(commit: str, folder: Path):
    """The engine module as it was at *commit*, imported as a sibling of the current package's modules."""
    source = subprocess.run(
        ["git", "show", f"{commit}:llava_next_plugin/engine.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    path = folder / "previous_engine.py"
    path.write_text(source)
    import llava_next_plugin  # noqa: F401  (the package its relative imports resolve in)

    spec = importlib.util.spec_from_file_location("llava_next_plugin._previous_engine", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build(folder: Path, **kwargs) -> Path:
    import checkpoints

    return checkpoints.build_checkpoint(folder, **kwargs)


def load(path: Path):
    import transformers

    model = transformers.AutoModelForImageTextToText.from_pretrained(path).eval()
    return model, transformers.AutoProcessor.from_pretrained(path)


def photo(width: int, height: int):
    import checkpoints

    return checkpoints.real_photo().convert("RGB").resize((width, height))


def ask(text: str, images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


@contextlib.contextmanager
def no_garbage_collection():
    """Python's cyclic garbage collector off while a run is timed (as ``timeit`` does). The engines built and
    dropped in turn leave garbage whose collection, measured at 30 ms, landed inside whichever 50 ms run came next;
    with the collector off it falls after the run (at the next allocations once it is back on). The engine itself
    leaves no cyclic garbage to collect: a collection after 5 runs of 16 requests with the collector off found 0
    unreachable objects."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def warm_up(engine, params_cls) -> None:
    """Two short requests at once, so that an engine built for this run has run a step of several rows (the new
    engine packs its LM head on a CPU at its first such step) before the run is timed."""
    short = params_cls(max_tokens=4, temperature=0)
    handles = [engine.submit(engine.prepare(ask(f"warm up {i}"), [photo(64, 48)], short)) for i in range(2)]
    for handle in handles:
        handle.result(timeout=600)


def throughput(engine, params_cls, streams: int, tokens: int, words: int = 0) -> float:
    """Generated tokens per second for *streams* requests submitted at once (with *words*, prompts of about
    ``words + 37 * i`` words, so that their lengths differ)."""
    params = params_cls(max_tokens=tokens, temperature=0)
    warm_up(engine, params_cls)
    padding = [" ".join(["word"] * (words + 37 * i)) if words else "" for i in range(streams)]
    prepared = [
        engine.prepare(ask(f"{padding[i]} Describe picture number {i}."), [photo(40 + 4 * i, 64 - 2 * i)], params)
        for i in range(streams)
    ]
    with no_garbage_collection():
        start = time.perf_counter()
        handles = [engine.submit(p) for p in prepared]
        generated = sum(h.result(timeout=600).completion_tokens for h in handles)
        return generated / (time.perf_counter() - start)


def staggered(engine, params_cls, streams: int, tokens: int, gap: float) -> float:
    """Generated tokens per second when *streams* requests arrive *gap* seconds apart, each joining a batch
    that is already decoding (the case where the previous engine copied the whole KV cache on every join)."""
    params = params_cls(max_tokens=tokens, temperature=0)
    warm_up(engine, params_cls)
    prepared = [
        engine.prepare(ask(f"Tell me about picture {i}."), [photo(44 + 4 * i, 60 - 2 * i)], params)
        for i in range(streams)
    ]
    with no_garbage_collection():
        start = time.perf_counter()
        handles = []
        for request in prepared:
            handles.append(engine.submit(request))
            time.sleep(gap)
        generated = sum(h.result(timeout=600).completion_tokens for h in handles)
        return generated / (time.perf_counter() - start)


def stall(engine, params_cls, long_words: int) -> tuple[float, float, int]:
    """(largest token gap of running streams while a long prompt joins, that prompt's TTFT, its tokens)."""
    arrivals: list[list[float]] = [[], []]
    running = [
        engine.submit(engine.prepare(ask(f"Talk {i}", images=0), [], params_cls(max_tokens=2000, temperature=0)))
        for i in range(2)
    ]

    def read(handle, times):
        try:
            for _ in handle:
                times.append(time.perf_counter())
        except Exception:
            pass

    readers = [threading.Thread(target=read, args=(h, t)) for h, t in zip(running, arrivals, strict=True)]
    for reader in readers:
        reader.start()
    while min(map(len, arrivals)) < 5:
        time.sleep(0.01)
    prepared = engine.prepare(ask("word " * long_words), [photo(96, 32)], params_cls(max_tokens=1, temperature=0))
    submitted = time.perf_counter()
    result = engine.submit(prepared).result(timeout=600)
    ttft = result.time_to_first_token
    for handle in running:
        handle.cancel()
    for reader in readers:
        reader.join(60)
    gaps = []
    for times in arrivals:
        window = [t for t in times if submitted - 1.0 <= t <= submitted + ttft + 0.5]
        gaps += [b - a for a, b in itertools.pairwise(window)]
    return max(gaps, default=float("nan")), ttft, prepared.prompt_tokens


def second_turn(engine, params_cls, words: int) -> tuple[float, float]:
    """(first turn's TTFT, follow-up's TTFT) for a long question about one image, then a follow-up."""
    image = photo(96, 64)
    question = "Look closely. " + "detail " * words
    params = params_cls(max_tokens=8, temperature=0)
    # a first prompt of this length pays one-time costs (kernels chosen for new sizes, the prefix store's first
    # allocation): an unrelated one pays them, so that they inflate neither turn
    engine.generate(ask("Warm up. " + "other " * words), [photo(80, 72)], params)
    first = engine.generate(ask(question), [image], params)
    follow_up = ask(question) + [
        {"role": "assistant", "content": [{"type": "text", "text": first.text}]},
        {"role": "user", "content": [{"type": "text", "text": "And the colours?"}]},
    ]
    second = engine.generate(follow_up, [image], params)
    return first.time_to_first_token, second.time_to_first_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--previous", default="c4886c1", help="git commit of the previous engine")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved throughput runs of each engine")
    parser.add_argument("--gap", type=float, default=0.01, help="seconds between arrivals in the staggered run")
    parser.add_argument("--long-words", type=int, default=2900, help="words of the long prompt (~1 token each)")
    parser.add_argument("--turn-words", type=int, default=1000)
    parser.add_argument("--mid-width", type=int, default=512, help="text width of the mid-size checkpoint")
    parser.add_argument("--compile", action="store_true", help="also measure the compiled decode step")
    parser.add_argument(
        "--prompt-words", type=int, default=600, help="also measure throughput with long prompts (0: skip)"
    )
    args = parser.parse_args()

    import torch

    from llava_next_plugin.engine import Engine, SamplingParams

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        previous = previous_engine_module(args.previous, tmp)
        small = load(build(tmp / "small"))
        mid = load(build(tmp / "mid", width=args.mid_width, vision_width=64))

        print(
            f"throughput: {args.streams} streams x {args.tokens} tokens, small checkpoint, CPU "
            f"({torch.get_num_threads()} threads), {args.rounds} rounds, the engines taking turns"
        )
        contenders = [
            ("previous", lambda: previous.Engine(*small, max_batch_size=args.streams), previous.SamplingParams),
            ("new", lambda: Engine(*small, max_batch_size=args.streams, compile=False), SamplingParams),
        ]
        warm = 0.0
        if args.compile:
            # one engine, compiled once, taking its turn in every round (idle between turns, its thread holds no
            # OpenMP workers); no reuse, so that a round does not reuse the previous round's prompts
            compiled = Engine(*small, max_batch_size=args.streams, compile=True, reuse_memory=0)
            warm = compiled.warm_up()
            contenders.append(("new, compiled", lambda: compiled, SamplingParams))
        rates: dict[str, list[float]] = {name: [] for name, _, _ in contenders}
        for _ in range(args.rounds):  # a run takes a fraction of a second: one slow moment must not decide it
            for name, make, params_cls in contenders:
                engine = make().start()
                rates[name].append(throughput(engine, params_cls, args.streams, args.tokens))
                if name != "new, compiled":
                    engine.shutdown(drain=False)
        if args.compile:
            compiled.shutdown(drain=False)
        old_tps = statistics.median(rates["previous"])
        for name, _, _ in contenders:
            median = statistics.median(rates[name])
            spread = f"{min(rates[name]):.0f}-{max(rates[name]):.0f}"
            line = f"  {name + ' engine':22s} {median:8.1f} tok/s (median of {args.rounds}; {spread})"
            if name != "previous":
                ratios = sorted(n / o for n, o in zip(rates[name], rates["previous"], strict=True))
                line += (
                    f"\n  {'':22s} ratio of medians {median / old_tps:.2f}x (goal >= 2x); per round "
                    f"{ratios[0]:.2f}-{ratios[-1]:.2f}x, median {statistics.median(ratios):.2f}x"
                )
                if name == "new, compiled":
                    line += f"; warm-up {warm:.1f} s"
            print(line)
        print(f"  the same streams arriving {args.gap * 1000:.0f} ms apart (each joins a decoding batch):")
        old = previous.Engine(*small, max_batch_size=args.streams).start()
        old_staggered = staggered(old, previous.SamplingParams, args.streams, args.tokens, args.gap)
        old.shutdown(drain=False)
        new = Engine(*small, max_batch_size=args.streams, compile=False).start()
        new_staggered = staggered(new, SamplingParams, args.streams, args.tokens, args.gap)
        new.shutdown(drain=False)
        print(f"  previous engine {old_staggered:8.1f} tok/s")
        print(f"  new engine      {new_staggered:8.1f} tok/s   ratio {new_staggered / old_staggered:.2f}x")
        if args.prompt_words:
            print(f"  the same streams with prompts of ~{args.prompt_words}-{args.prompt_words + 37 * 15} words:")
            rates = []
            for make, params_cls in (
                (lambda: previous.Engine(*small, max_batch_size=args.streams), previous.SamplingParams),
                (lambda: Engine(*small, max_batch_size=args.streams, compile=False, reuse_memory=0), SamplingParams),
            ):
                engine = make().start()
                rates.append(throughput(engine, params_cls, args.streams, args.tokens, args.prompt_words))
                engine.shutdown(drain=False)
            print(f"  previous engine {rates[0]:8.1f} tok/s")
            print(f"  new engine      {rates[1]:8.1f} tok/s   ratio {rates[1] / rates[0]:.2f}x")
        print(
            f"stall: a ~{args.long_words}-token prompt joins 2 running streams, mid-size checkpoint "
            f"(width {args.mid_width})"
        )
        for name, make, params_cls in (
            ("previous", lambda: previous.Engine(*mid, max_batch_size=4), previous.SamplingParams),
            ("new", lambda: Engine(*mid, max_batch_size=4, compile=False, reuse_memory=0), SamplingParams),
        ):
            engine = make().start()
            gap, ttft, tokens = stall(engine, params_cls, args.long_words)
            engine.shutdown(drain=False)
            print(
                f"  {name:8s} prompt {tokens} tokens: TTFT {ttft:.2f} s, largest gap {gap:.3f} s, "
                f"gap/TTFT {gap / ttft:.2f} (goal <= 0.33)"
            )

        print(f"second turn: follow-up about the same image (~{args.turn_words}-word first question), mid-size")
        for name, make, params_cls in (
            ("previous", lambda: previous.Engine(*mid, max_batch_size=4), previous.SamplingParams),
            ("new", lambda: Engine(*mid, max_batch_size=4, compile=False), SamplingParams),
        ):
            engine = make().start()
            engine.generate(ask("warm up"), [photo(32, 32)], params_cls(max_tokens=2, temperature=0))
            first, second = second_turn(engine, params_cls, args.turn_words)
            engine.shutdown(drain=False)
            print(
                f"  {name:8s} first TTFT {first:.3f} s, second {second:.3f} s, ratio {second / first:.2f} "
                "(goal <= 0.35)"
            )


if __name__ == "__main__":
    main()
