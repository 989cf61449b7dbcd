"""Benchmark ``llava-next serve`` on loopback: batching vs one-at-a-time, latency, memory; and ``transformers serve``.

One run, figures printed (no assertions; ratios are what matter on a shared CPU):

* 16 concurrent streaming requests vs the same 16 sent one after another: total wall time and generated
  tokens per second for each, and the speed-up (continuous batching must win);
* p50 / p99 latency (request to last token) and time to first token under the concurrent load;
* resident memory of the server process before and after ``--soak`` requests (default 500; growth beyond
  noise would be a leak);
* the same concurrent and sequential loads against ``transformers serve`` hosting the same checkpoint,
  when it starts (it needs transformers' ``serving`` extra).

Usage::

    python benchmarks/serve.py                       # builds a tiny random checkpoint in a temp folder
    python benchmarks/serve.py --model PATH --max-tokens 32 --soak 500 --no-transformers
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    """Resident memory of *pid* (and its children) in MiB, from /proc."""
    import psutil

    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20


def image_url(width: int, height: int) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    import checkpoints

    buffer = io.BytesIO()
    checkpoints.real_photo().convert("RGB").resize((width, height)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def start(command: list[str], base: str, timeout: float = 300.0) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[:3]} exited: {process.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"{command[:3]} did not start within {timeout} s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()


async def one_stream(http: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streaming request: latency, time to first token, completion tokens."""
    started = time.perf_counter()
    first = None
    tokens = 0
    async with http.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter() - started
    return {"latency": time.perf_counter() - started, "ttft": first or 0.0, "tokens": tokens}


async def load(url: str, bodies: list[dict], concurrency: int) -> tuple[float, list[dict]]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as http:

        async def run(body):
            async with limit:
                return await one_stream(http, url, body)

        started = time.perf_counter()
        results = await asyncio.gather(*(run(b) for b in bodies))
        return time.perf_counter() - started, results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def measure(name: str, url: str, bodies: list[dict]) -> dict:
    concurrent_s, concurrent = asyncio.run(load(url, bodies, len(bodies)))
    sequential_s, sequential = asyncio.run(load(url, bodies, 1))
    tokens = sum(r["tokens"] for r in concurrent) or 1
    tokens_seq = sum(r["tokens"] for r in sequential) or 1
    latencies = [r["latency"] for r in concurrent]
    figures = {
        "concurrent_s": concurrent_s,
        "sequential_s": sequential_s,
        "concurrent_tok_s": tokens / concurrent_s,
        "sequential_tok_s": tokens_seq / sequential_s,
        "speedup": (tokens / concurrent_s) / (tokens_seq / sequential_s),
        "p50_s": statistics.median(latencies),
        "p99_s": percentile(latencies, 99),
        "ttft_p50_s": statistics.median(r["ttft"] for r in concurrent),
    }
    print(
        f"{name}: {len(bodies)} concurrent streams {concurrent_s:.2f} s ({figures['concurrent_tok_s']:.1f} tok/s) | "
        f"one at a time {sequential_s:.2f} s ({figures['sequential_tok_s']:.1f} tok/s) | "
        f"batching speed-up x{figures['speedup']:.2f} | latency p50 {figures['p50_s']:.2f} s "
        f"p99 {figures['p99_s']:.2f} s | ttft p50 {figures['ttft_p50_s']:.2f} s"
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: build a tiny random one)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--soak", type=int, default=500, help="requests for the memory check (0 to skip)")
    parser.add_argument("--no-transformers", action="store_true", help="skip the `transformers serve` comparison")
    args = parser.parse_args()

    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT / "tests"))
        import checkpoints

        model = str(checkpoints.build_checkpoint(Path(tempfile.mkdtemp(prefix="llava-next-bench-"))))
    sizes = [(80, 50), (30, 90), (64, 64), (50, 50)]
    bodies = [
        {
            "model": model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_url(*sizes[i % len(sizes)])}},
                        {"type": "text", "text": f"Describe picture number {i}."},
                    ],
                }
            ],
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for i in range(args.requests)
    ]

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start(
        [
            sys.executable,
            "-m",
            "llava_next_plugin.serve_cli",
            "--model",
            model,
            "--port",
            str(port),
            "--max-batch-size",
            str(args.requests),
            "--max-queue",
            "1024",
            "--log-level",
            "warning",
        ],
        base,
    )
    try:
        asyncio.run(load(base + "/v1/chat/completions", bodies[:2], 2))  # warm-up
        ours = measure("llava-next serve", base + "/v1/chat/completions", bodies)
        if args.soak:
            soak = [{**b, "max_tokens": 4} for b in bodies]
            asyncio.run(load(base + "/v1/chat/completions", soak * 4, 16))  # settle allocator pools
            before = rss_mib(server.pid)
            started = time.perf_counter()
            asyncio.run(load(base + "/v1/chat/completions", (soak * (args.soak // len(soak) + 1))[: args.soak], 16))
            after = rss_mib(server.pid)
            print(
                f"llava-next serve: RSS {before:.0f} MiB before, {after:.0f} MiB after {args.soak} requests "
                f"({after - before:+.0f} MiB, {args.soak / (time.perf_counter() - started):.1f} req/s)"
            )
    finally:
        stop(server)

    if not args.no_transformers:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        try:
            reference = start(["transformers", "serve", model, "--host", "127.0.0.1", "--port", str(port)], base)
        except Exception as exc:  # not installed, or cannot host this checkpoint
            print(f"transformers serve: not measured ({str(exc)[:300]})")
            return
        try:
            theirs = measure("transformers serve", base + "/v1/chat/completions", bodies)
            print(
                f"llava-next serve vs transformers serve, 16 concurrent streams: "
                f"x{ours['concurrent_tok_s'] / theirs['concurrent_tok_s']:.2f} tokens/s"
            )
        except Exception as exc:
            print(f"transformers serve: failed under load ({str(exc)[:300]})")
        finally:
            stop(reference)


if __name__ == "__main__":
    main()
