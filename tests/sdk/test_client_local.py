"""The client in-process: one shared engine under clients on different event loops and threads."""

from __future__ import annotations

import functools
import re
import threading

import anyio
import checkpoints
import pytest
from llava_next_sdk import (
    AsyncClient,
    BadRequestError,
    Client,
    GenerationResult,
    InvalidImageError,
    LlavaNextError,
    ModelNotFoundError,
    OverloadedError,
    UnsupportedParameterError,
)
from PIL import Image

PROMPT = "Describe the picture."


def local_engine(client: AsyncClient):
    """The engine under a local client (its transport may still stand in for the not-yet-loaded one)."""
    transport = client.transport
    return (getattr(transport, "loaded", None) or transport)._engine


def picture(color) -> Image.Image:
    return Image.new("RGB", (40, 30), color)


async def greedy(client: AsyncClient, color) -> GenerationResult:
    return await client.generate(picture(color), PROMPT, max_tokens=4, temperature=0)


def test_clients_on_asyncio_and_trio_threads_share_one_engine(tiny_checkpoint):
    """Two event loops of different kinds, at the same time, on one in-process engine."""
    results: dict[str, object] = {}
    engines: dict[str, object] = {}
    start = threading.Barrier(2)

    def run(backend: str) -> None:
        async def main() -> None:
            async with AsyncClient(model=str(tiny_checkpoint)) as client:
                await greedy(client, "white")  # load (or find) the shared engine
                start.wait(timeout=120)  # then both loops submit concurrently
                with anyio.fail_after(120):
                    results[backend] = [await greedy(client, c) for c in ("red", "blue")]
                    async with client.stream(picture("red"), PROMPT, max_tokens=4, temperature=0) as stream:
                        results[backend + "-stream"] = [d async for d in stream]
                engines[backend] = local_engine(client)

        try:
            anyio.run(main, backend=backend)
        except BaseException as exc:  # surfaced by the assertions below
            results[backend] = exc

    threads = [threading.Thread(target=run, args=(backend,)) for backend in ("asyncio", "trio")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for backend in ("asyncio", "trio"):
        assert isinstance(results[backend], list), results[backend]
    assert engines["asyncio"] is engines["trio"]
    texts = {backend: [r.text for r in results[backend]] for backend in ("asyncio", "trio")}
    assert texts["asyncio"] == texts["trio"]
    assert "".join(results["asyncio-stream"]) == "".join(results["trio-stream"]) == texts["asyncio"][0]
    usage = results["trio"][0].usage
    assert usage.completion_tokens == 4 and usage.image_tokens and usage.prompt_tokens > usage.image_tokens


@pytest.mark.anyio
async def test_the_local_client_maps_in_order_and_records_failures(tiny_checkpoint):
    async with AsyncClient(model=str(tiny_checkpoint)) as client:
        alone = [await greedy(client, c) for c in ("red", "green")]
        results = await client.map(
            [(picture("red"), PROMPT), ([b"not an image"], PROMPT), (picture("green"), PROMPT)],
            concurrency=2,
            max_tokens=4,
            temperature=0,
        )
    assert isinstance(results[1], InvalidImageError) and results[1].index == 0
    assert [results[0].text, results[2].text] == [r.text for r in alone]


def test_a_local_map_wider_than_the_engine_queue_completes_every_item_by_retrying(tiny_checkpoint):
    """concurrency=100 against a queue of 2: refused requests are retried with backoff, as over HTTP."""
    small = {"max_queue": 2, "max_batch_size": 2}  # one shared engine for both clients below
    prompts = [f"Item {i}" for i in range(24)]

    async def main(max_retries: int):
        async with AsyncClient(model=str(tiny_checkpoint), max_retries=max_retries, **small) as client:
            results = await client.map(prompts, concurrency=100, max_tokens=2, temperature=0)
            return results, local_engine(client).stats["requests_rejected"]

    without, _ = anyio.run(main, 0)
    assert any(isinstance(r, OverloadedError) for r in without)  # the queue does refuse this crowd
    results, rejected = anyio.run(main, 8)
    assert [type(r).__name__ for r in results] == ["GenerationResult"] * len(prompts), results
    assert rejected > 0 and all(r.usage.completion_tokens == 2 for r in results)


def test_allowed_url_domains_makes_a_local_client_refuse_other_hosts_as_a_server_does(tiny_checkpoint, tmp_path):
    import functools
    import http.server

    picture("red").save(tmp_path / "red.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

    async def main():
        async with AsyncClient(model=str(tiny_checkpoint), allowed_url_domains=["127.0.0.1"]) as client:
            fetched = await client.generate(f"http://127.0.0.1:{port}/red.png", PROMPT, max_tokens=2, temperature=0)
            with pytest.raises(InvalidImageError) as info:
                await client.generate([picture("blue"), f"http://localhost:{port}/red.png"], PROMPT, max_tokens=2)
            return fetched, info.value

    try:
        fetched, error = anyio.run(main)
    finally:
        server.shutdown()
        server.server_close()
    assert fetched.usage.image_tokens > 0
    assert error.index == 1 and error.status == 400
    assert "image 1: URLs from 'localhost' are not allowed" in error.message
    assert "allowed hosts: 127.0.0.1" in error.message
    with pytest.raises(TypeError, match="allowed_url_domains=3 must be a list of host names"):
        AsyncClient(model=str(tiny_checkpoint), allowed_url_domains=3)


def test_the_sync_client_runs_a_local_model(tiny_checkpoint):
    with Client(model=str(tiny_checkpoint)) as client:
        result = client.generate(picture("red"), PROMPT, max_tokens=4, temperature=0)
        with client.stream(picture("red"), PROMPT, max_tokens=4, temperature=0) as stream:
            deltas = list(stream)
    assert "".join(deltas) == result.text == stream.result.text
    assert result.usage.completion_tokens == 4
    # the model named as a server started on this folder names it: by the folder's name, never its path
    assert result.model == stream.result.model == tiny_checkpoint.name


def test_a_local_client_asks_for_the_compiled_decode_step_with_compile(tiny_checkpoint):
    """``compile=True`` reaches the shared engine: on CPU, where the default is eager, its decode step is then
    compiled (and warmed up) before it serves; ``compile=False`` there is the default engine itself."""
    from llava_next_plugin.engine import get_shared_engine

    with Client(model=str(tiny_checkpoint), device="cpu", compile=True) as client:
        result = client.generate(picture("red"), PROMPT, max_tokens=4, temperature=0)
    assert result.usage.completion_tokens == 4
    compiled = get_shared_engine(str(tiny_checkpoint), device="cpu", compile=True)  # the client's, shared
    try:
        assert compiled.runner.compiled
        default = get_shared_engine(str(tiny_checkpoint), device="cpu")
        assert get_shared_engine(str(tiny_checkpoint), device="cpu", compile=False) is default
        assert default is not compiled and not default.runner.compiled
    finally:
        compiled.shutdown(drain=False)


async def _first_request(**options):
    async with AsyncClient(**options) as client:  # the local transport may load at the first request
        await client.generate(None, "Hi", max_tokens=1)


def test_a_local_client_whose_shared_engine_stopped_loads_it_again(tiny_checkpoint):
    """The model's shared engine shut down (by another part of the application, or its thread failed): the
    client's next request loads a new one instead of being refused as "shutting down" for ever."""
    from llava_next_plugin.engine import get_shared_engine

    options = {"device": "cpu", "max_batch_size": 3}  # an engine of this test's own
    with Client(model=str(tiny_checkpoint), **options) as client:
        first = client.generate(None, PROMPT, max_tokens=4, temperature=0)
        stopped = get_shared_engine(str(tiny_checkpoint), **options)
        stopped.shutdown()
        again = client.generate(None, PROMPT, max_tokens=4, temperature=0)
    assert again.text == first.text
    assert get_shared_engine(str(tiny_checkpoint), **options) is not stopped


def test_a_local_client_closed_while_its_model_loads_refuses_the_call_and_keeps_no_engine(tiny_checkpoint):
    """aclose() lands while the first call's load runs in a worker thread (held here on the shared engines' lock
    for this model and options, as a slow disk would hold it): that call ends with a typed error once the load
    is done, and the closed client holds no engine."""
    from llava_next_sdk import APIConnectionError

    from llava_next_plugin.engine import get_shared_engine, shared

    options = {"device": "cpu", "max_batch_size": 5}  # an engine of this test's own
    key = shared.shared_key(str(tiny_checkpoint), **options)
    with shared._LOCK:
        load_lock = shared._KEY_LOCKS.setdefault(key, threading.Lock())
    client = AsyncClient(model=str(tiny_checkpoint), **options)

    async def scenario():
        async with anyio.create_task_group() as group:
            outcome = {}

            async def first_call():
                try:
                    outcome["result"] = await client.generate(None, PROMPT, max_tokens=2, temperature=0)
                except APIConnectionError as exc:
                    outcome["error"] = exc

            load_lock.acquire()  # the load started by the call waits here
            try:
                group.start_soon(first_call)
                await anyio.sleep(0.5)
                outcome["transport"] = getattr(client.transport, "loaded", None) or client.transport
                await client.aclose()
            finally:
                load_lock.release()
        return outcome

    try:
        outcome = anyio.run(scenario)
        assert "closed while its model was loading" in str(outcome.get("error")), outcome
        assert type(outcome["transport"]).__name__ == "LocalTransport" and outcome["transport"]._engine is None
    finally:
        get_shared_engine(str(tiny_checkpoint), **options).shutdown(drain=False)


def test_a_local_client_counts_messages_and_parts_against_its_limits_as_a_server_does(tiny_checkpoint):
    from llava_next_sdk import BadRequestError

    from llava_next_plugin.validation import Limits

    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "More"},
    ]
    with Client(model=str(tiny_checkpoint), request_limits=Limits(max_messages=2)) as client:
        with pytest.raises(BadRequestError, match="the request holds 3 messages; at most 2 are accepted") as error:
            client.chat(chat, max_tokens=2)
        assert error.value.param == "messages"
        parts = [{"type": "text", "text": "a"}] * 3
        with pytest.raises(BadRequestError, match="a message holds 3 content parts; at most 2"):
            client.chat([{"role": "user", "content": parts}], max_tokens=2)


def test_a_decoded_image_too_large_for_a_server_is_refused_alike_by_a_local_client_and_over_http(tiny_checkpoint):
    """2800x2800 noise is within the pixel limit but 22 MiB as PNG, over the 20 MiB a server accepts per image: a
    local client refuses it as an HTTP client does before sending it, and as the server does when it is sent."""
    import random

    from llava_next_sdk.images import MAX_IMAGE_BYTES

    from llava_next_plugin.engine import get_shared_engine
    from llava_next_plugin.server import create_app, serve_in_thread
    from llava_next_plugin.validation import Limits

    assert Limits().max_image_bytes == MAX_IMAGE_BYTES  # the server's default limit is the SDK's
    noise = Image.frombytes("RGB", (2800, 2800), random.Random(0).randbytes(2800 * 2800 * 3))

    def refusal(**client_options) -> InvalidImageError:
        with Client(**client_options) as client:
            with pytest.raises(InvalidImageError) as info:
                client.generate([picture("red"), noise], PROMPT, max_tokens=2)
        return info.value

    local = refusal(model=str(tiny_checkpoint))
    engine = get_shared_engine(str(tiny_checkpoint))  # the local client's
    with serve_in_thread(create_app(engine, limits=Limits(), shutdown_engine=False)) as server:
        over_http = refusal(base_url=server.url, model=tiny_checkpoint.name, max_retries=0)
        from_the_server = refusal(base_url=server.url, model=tiny_checkpoint.name, max_retries=0, max_image_bytes=None)
    assert local.message == over_http.message
    assert re.fullmatch(
        rf"image 1: the decoded image \(RGB, 2800x2800\) is \d+ bytes as PNG .* over the {MAX_IMAGE_BYTES} bytes "
        r"\(20 MiB\) allowed per image .*; downscale it .*, or pass the image's file .*",
        local.message,
    )
    assert local.index == over_http.index == from_the_server.index == 1
    assert local.status == over_http.status == from_the_server.status == 400
    assert f"at most {MAX_IMAGE_BYTES} are allowed" in from_the_server.message


def test_a_local_clients_timeout_bounds_each_call_after_the_load_and_cancels_its_request(tiny_checkpoint):
    """``timeout=`` as for a server: a call that runs longer raises APITimeoutError and its request is cancelled,
    streamed or not; the model's loading (at the first call) is not the call's time."""
    from llava_next_sdk import APITimeoutError

    from llava_next_plugin.engine import get_shared_engine

    options = {"device": "cpu", "max_batch_size": 6}  # an engine of this test's own: the first call loads it
    with Client(model=str(tiny_checkpoint), timeout=0.5, **options) as client:
        assert client.generate(None, PROMPT, max_tokens=2, temperature=0).usage.completion_tokens == 2
        engine = get_shared_engine(str(tiny_checkpoint), **options)
        with pytest.raises(APITimeoutError, match="longer than its total timeout of 0.5 s"):
            client.generate(None, PROMPT, max_tokens=4000, temperature=0, stop=None)
        with pytest.raises(APITimeoutError), client.stream(None, PROMPT, max_tokens=4000, temperature=0) as stream:
            for _ in stream:
                pass
        assert checkpoints.wait_for(lambda: engine.stats_snapshot().get("requests_cancelled", 0) == 2, 30)
        # per call and with_options, as over HTTP: the same engine, the client's own options unchanged
        twin = client.with_options(timeout=30)
        assert twin.generate(None, PROMPT, max_tokens=40, temperature=0, stop=None).usage.completion_tokens == 40
        assert client.generate(None, PROMPT, max_tokens=40, temperature=0, timeout=30, stop=None).text
        with pytest.raises(APITimeoutError, match="total timeout of 0.01 s"):
            twin.generate(None, PROMPT, max_tokens=4000, temperature=0, timeout=0.01, stop=None)
        with pytest.raises(UnsupportedParameterError, match="headers are sent to an HTTP endpoint"):
            client.generate(None, PROMPT, extra_headers={"X-A": "1"})
        with pytest.raises(BadRequestError, match="timeout=-1"):  # as over HTTP: bad input, not a TypeError
            client.generate(None, PROMPT, timeout=-1)
        with pytest.raises(BadRequestError, match="max_retries=-1"):
            client.generate(None, PROMPT, max_retries=-1)
        twin.close()  # only the twin
        assert client.generate(None, PROMPT, max_tokens=2, temperature=0).usage.completion_tokens == 2
        with pytest.raises(LlavaNextError, match="closed"):
            twin.generate(None, PROMPT, max_tokens=2)
        assert checkpoints.wait_for(lambda: engine.stats_snapshot().get("requests_cancelled", 0) == 3, 30)
    engine.shutdown(drain=False)
    with pytest.raises(TypeError, match="timeout=-1"):
        Client(model=str(tiny_checkpoint), timeout=-1).generate(None, PROMPT)


def test_unknown_options_of_a_local_client_are_refused_by_name(tiny_checkpoint):
    with pytest.raises(TypeError, match=r"unknown option\(s\) for a local model: devcie; accepted: .*device"):
        anyio.run(functools.partial(_first_request, model=str(tiny_checkpoint), devcie="cpu"))
    with pytest.raises(TypeError, match=r"read_timeout: options of a server client, with base_url="):
        anyio.run(functools.partial(_first_request, model=str(tiny_checkpoint), read_timeout=5))


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"model": "./no/such/checkpoint"}, ModelNotFoundError, "'./no/such/checkpoint' does not exist"),
        ({"device": "gpu0"}, ValueError, "device='gpu0' is not a torch device"),
        ({"dtype": "float17"}, ValueError, "dtype='float17' is not a torch dtype"),
    ],
    ids=["missing-folder", "bad-device", "bad-dtype"],
)
def test_a_local_model_that_cannot_load_says_why_with_a_typed_error(tiny_checkpoint, options, error, match):
    with pytest.raises(error, match=match):
        anyio.run(functools.partial(_first_request, **{"model": str(tiny_checkpoint), **options}))


# A process where the model package cannot be imported, as where only llava-next-sdk is installed.
WITHOUT_MODEL_PACKAGE = """
import sys

import anyio


class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == "llava_next_plugin" or name.startswith("llava_next_plugin."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


from llava_next_sdk import AsyncClient, LlavaNextError

if sys.argv[1] == "at-construction":
    sys.meta_path.insert(0, Refuse())
    try:
        AsyncClient(model="some/checkpoint")
    except LlavaNextError as exc:
        print("raised", type(exc).__name__, exc)
else:  # the package disappears between construction and the first request
    client = AsyncClient(model="some/checkpoint")
    sys.meta_path.insert(0, Refuse())
    try:
        anyio.run(client.generate, None, "Hi")
    except LlavaNextError as exc:
        print("raised", type(exc).__name__, exc)
print("torch imported:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("when", ["at-construction", "at-first-request"])
def test_without_the_model_package_a_local_client_says_what_to_install(when):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_MODEL_PACKAGE, when], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "raised LlavaNextError" in done.stdout
    message = done.stdout.split("raised LlavaNextError", 1)[1]
    if when == "at-construction":  # no provider of local: URLs can be found
        assert "needs the model package, which is not installed: pip install llava-next-plugin" in message
    else:  # its metadata is there but the import fails: the entry point and the fix are named
        assert "entry point 'local = llava_next_plugin.local_transport'" in message
        assert "No module named 'llava_next_plugin'" in message and "pip install" in message
    assert "torch imported: False" in done.stdout


# A fresh process (the model package not imported yet) in which a ticker task shares the event loop with the
# first request. When the import of each heavy package (the plugin, torch, transformers) runs, a finder first
# on sys.meta_path holds it until the ticker has ticked three more times, and records the thread it runs on.
# In a worker thread the loop ticks on and the import goes ahead; on the loop's own thread the ticker cannot
# tick, so the hold gives up (after HOLD_UP_TO seconds, a deadlock guard, not a measure) and the import is
# reported as having stalled the loop. No duration is compared.
TICKER_DURING_FIRST_REQUEST = """
import sys
import threading

import anyio

from llava_next_sdk import AsyncClient

WATCHED = ("llava_next_plugin", "torch", "transformers")
HOLD_UP_TO = 120.0
loop_thread = threading.get_ident()
ticks = 0
ticked = threading.Condition()
imports = {}


def hold(name):
    on_loop = threading.get_ident() == loop_thread
    with ticked:
        start = ticks
        loop_ran = ticked.wait_for(lambda: ticks >= start + 3, timeout=HOLD_UP_TO)
    imports[name] = (on_loop, loop_ran)


class HoldHeavyImports:  # finds what the other finders find; holds its execution (the import itself) first
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name not in WATCHED:
            return None
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if finder is not cls and hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                run = spec.loader.exec_module

                def exec_module(module):
                    hold(name)
                    run(module)

                spec.loader.exec_module = exec_module
                return spec
        return None


async def main():
    global ticks
    done = anyio.Event()

    async def ticker():
        global ticks
        while not done.is_set():
            await anyio.sleep(0.001)
            with ticked:
                ticks += 1
                ticked.notify_all()

    print("imported before:", any(name in sys.modules for name in WATCHED))
    sys.meta_path.insert(0, HoldHeavyImports)
    async with anyio.create_task_group() as group:
        group.start_soon(ticker)
        async with AsyncClient(model=sys.argv[1]) as client:
            result = await client.generate(None, "Hi", max_tokens=2, temperature=0)
        done.set()
    print("tokens:", result.usage.completion_tokens)
    for name in WATCHED:
        on_loop, loop_ran = imports.get(name, (None, None))
        print(f"import {name}: on the loop's thread: {on_loop}, the loop ticked meanwhile: {loop_ran}")


anyio.run(main)
"""


def test_the_first_local_request_loads_the_model_package_without_stalling_the_event_loop(tiny_checkpoint):
    """Importing torch and transformers takes seconds: the first local request does it in a worker thread, and
    a task on the same event loop keeps running while it does."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", TICKER_DURING_FIRST_REQUEST, str(tiny_checkpoint)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "imported before: False" in done.stdout and "tokens: 2" in done.stdout
    for name in ("llava_next_plugin", "torch", "transformers"):
        expected = f"import {name}: on the loop's thread: False, the loop ticked meanwhile: True"
        assert expected in done.stdout, done.stdout


def test_a_local_client_hands_a_pil_image_over_without_encoding_it(tiny_checkpoint):
    """No PNG round trip in-process: the image the user gave is never saved (encoded) on its way to the model."""
    encoded = []

    class RecordingImage(Image.Image):
        def save(self, *args, **kwargs):
            encoded.append(args)
            return super().save(*args, **kwargs)

    image = RecordingImage()
    image.__dict__.update(picture("red").__dict__)
    with Client(model=str(tiny_checkpoint)) as client:
        given = client.generate(image, PROMPT, max_tokens=4, temperature=0)
        plain = client.generate(picture("red"), PROMPT, max_tokens=4, temperature=0)
    assert encoded == []
    assert given.text == plain.text and given.usage == plain.usage


@pytest.mark.parametrize("backends", [("asyncio", "asyncio"), ("asyncio", "trio")])
def test_one_client_used_from_two_event_loops_at_once_loads_once_and_answers_both(tiny_checkpoint, backends):
    """Each thread runs its own loop and the client's first requests come at the same moment: the load is
    shared across loops (an anyio lock of the first loop left the other waiting forever, or raised)."""
    client = AsyncClient(model=str(tiny_checkpoint))
    answers: dict[int, object] = {}
    both = threading.Barrier(2)

    def ask(i: int, backend: str) -> None:
        both.wait()
        try:
            answers[i] = anyio.run(
                functools.partial(client.generate, picture("red"), "Hi", max_tokens=3, temperature=0), backend=backend
            ).text
        except BaseException as exc:  # the assertion below shows it
            answers[i] = exc

    threads = [threading.Thread(target=ask, args=(i, b), daemon=True) for i, b in enumerate(backends)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads), f"a loop still waits: {answers}"
    assert isinstance(answers[0], str) and answers[0] == answers[1], answers
    anyio.run(client.aclose)
