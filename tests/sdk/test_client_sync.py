"""The sync ``Client`` twin, the light import, and the transport seam."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import threading
import time

import anyio
import pytest
from llava_next_sdk import (
    APITimeoutError,
    AsyncClient,
    AsyncTransport,
    AuthenticationError,
    Client,
    GenerationResult,
    InvalidImageError,
    LlavaNextError,
    Usage,
)
from llava_next_sdk.hookspecs import hookimpl
from llava_next_sdk.plugins import get_plugin_manager
from PIL import Image


def test_the_sync_client_generates_streams_and_maps(standin):
    url, record = standin.endpoint("ok")
    with Client(base_url=url, model="standin-model", api_key="k") as client:
        assert client.generate(Image.new("RGB", (4, 4)), "hello", max_tokens=3).text == "echo[1]: hello"
        with client.stream(None, "one two") as stream:
            assert list(stream) == ["echo[0]:", " one", " two"]
        assert stream.result.finish_reason == "stop" and stream.usage.prompt_tokens == 7
        results = client.map([(None, "a"), ([b"junk"], "b"), "c"], concurrency=2)
        assert [getattr(r, "text", None) for r in results] == ["echo[0]: a", None, "echo[0]: c"]
        assert isinstance(results[1], InvalidImageError)
        assert client.chat([{"role": "user", "content": "hi"}]).text == "echo[0]: hi"
    assert record.count == 5
    client.close()  # idempotent


def test_the_sync_client_raises_the_same_errors(standin):
    url, _ = standin.endpoint("unauthorized")
    with Client(base_url=url, model="m") as client:
        with pytest.raises(AuthenticationError):
            client.generate(None, "hi")
        with pytest.raises(AuthenticationError):
            with client.stream(None, "hi"):
                pass


def test_leaving_a_sync_stream_early_closes_the_connection(standin):
    url, record = standin.endpoint("endless")
    with Client(base_url=url, model="m") as client:
        with client.stream(None, "go") as stream:
            for delta in stream:
                if delta == "tok1 ":
                    break
        assert record.stream_closed.wait(5)
        assert stream.result is None and stream.text.startswith("tok0 tok1 ")


def test_a_sync_stream_iterated_without_with_says_how_to_use_it_instead_of_waiting_forever(standin):
    url, record = standin.endpoint("ok")
    with Client(base_url=url, model="m") as client:
        with pytest.raises(RuntimeError, match="with client.stream"):
            next(iter(client.stream(None, "hi")))
    assert record.count == 0  # nothing was sent


def test_the_sync_client_works_inside_a_running_event_loop(standin):
    """As in Jupyter, where the cell already runs inside an asyncio loop."""
    url, _ = standin.endpoint("ok")

    async def notebook_cell() -> str:
        with Client(base_url=url, model="m") as client:
            return client.generate(None, "from a cell").text

    assert asyncio.run(notebook_cell()) == "echo[0]: from a cell"


def test_closing_the_sync_client_stops_its_thread(standin):
    url, _ = standin.endpoint("ok")
    before = set(threading.enumerate())
    client = Client(base_url=url, model="m")
    client.generate(None, "x")
    client.close()
    assert [t for t in threading.enumerate() if t.name == "llava-next-sdk-loop" and t not in before] == []
    forgotten = Client(base_url=url, model="m")
    thread = forgotten._runner._thread
    del forgotten  # never closed: collecting it stops its thread
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_closing_the_sync_client_ends_a_call_running_on_another_thread_and_later_calls_say_it_is_closed(standin):
    url, _ = standin.endpoint("slow")  # answers after 2 s
    client = Client(base_url=url, model="m")
    outcome: dict = {}

    def call() -> None:
        try:
            client.generate(None, "hi")
        except BaseException as exc:  # noqa: BLE001 - what the call raised is the point
            outcome["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    threading.Event().wait(0.3)  # the call is waiting for the answer
    client.close()
    caller.join(5)
    assert not caller.is_alive()
    error = outcome["error"]
    assert isinstance(error, LlavaNextError) and "closed while this call was running" in str(error)
    with pytest.raises(LlavaNextError, match="this client is closed"):
        client.generate(None, "again")
    with pytest.raises(LlavaNextError, match="this client is closed"):
        with client.stream(None, "again"):
            pass


def test_closing_the_sync_client_while_another_thread_reads_a_stream_says_the_client_was_closed(standin):
    url, _ = standin.endpoint("endless")
    client = Client(base_url=url, model="m")
    outcome: dict = {}
    started = threading.Event()

    def read() -> None:
        try:
            with client.stream(None, "hi") as stream:
                for _ in stream:
                    started.set()
        except BaseException as exc:  # noqa: BLE001 - what the reader got is the point
            outcome["error"] = exc

    reader = threading.Thread(target=read)
    reader.start()
    assert started.wait(30)
    client.close()
    reader.join(10)
    assert not reader.is_alive()
    assert "the client was closed while this call was running" in str(outcome["error"])


def test_with_options_gives_a_sync_client_on_the_same_loop_thread(standin):
    url, record = standin.endpoint("slow")  # answers after 2 s
    with Client(base_url=url, model="m", max_retries=0) as client:
        quick = client.with_options(timeout=0.3)
        assert quick._runner is client._runner
        with pytest.raises(APITimeoutError):
            quick.generate(None, "hi")
        with pytest.raises(APITimeoutError):
            client.generate(None, "hi", timeout=0.3)
        quick.close()
        assert client.generate(None, "hi").text == "echo[0]: hi"
        with pytest.raises(LlavaNextError, match="closed"):
            quick.generate(None, "hi")


def test_a_sync_client_made_before_a_fork_works_in_the_child_and_stays_the_parents(standin):
    """multiprocessing's fork workers and pre-forking servers: the loop thread does not survive fork, so the child
    builds its own client (from the same arguments) at its first call; the parent's is untouched."""
    import multiprocessing

    url, record = standin.endpoint("ok")
    client = Client(base_url=url, model="standin-model")
    assert client.generate(None, "parent").text == "echo[0]: parent"
    results = multiprocessing.get_context("fork").Queue()

    def child() -> None:
        try:
            with client.stream(None, "child stream") as stream:
                streamed = "".join(stream)
            results.put((client.generate(None, "child").text, streamed))
            client.close()
        except BaseException as exc:  # the parent's assertion says what went wrong
            results.put(repr(exc))

    def idle_child() -> None:  # never calls it: exits without waiting on the parent's thread
        client.close()

    for target in (child, idle_child):
        process = multiprocessing.get_context("fork").Process(target=target)
        process.start()
        process.join(30)
        assert process.exitcode == 0, process.exitcode
    assert results.get(timeout=5) == ("echo[0]: child", "echo[0]: child stream")
    assert client.generate(None, "parent again").text == "echo[0]: parent again"  # the parent's own client
    client.close()
    assert record.count == 4
    code = "import os, sys; from llava_next_sdk import Client; c = Client(base_url=sys.argv[1], model='m')\n"
    code += "c.generate(None, 'x')\npid = os.fork()\nif pid == 0: sys.exit(0)\nos.waitpid(pid, 0); c.close()"
    started = time.monotonic()  # a forked child leaving through sys.exit runs the finalizers: none may wait
    subprocess.run([sys.executable, "-c", code, url], check=True, timeout=60)
    assert time.monotonic() - started < 15


def test_a_sync_stream_of_a_client_made_on_the_same_line_and_what_it_tells_while_read(standin):
    url, _ = standin.endpoint("ok")
    with Client(base_url=url, model="m").stream(None, "one two") as stream:  # the client is not kept by the caller
        gc.collect()
        first = next(stream)
        assert stream.text == first == "echo[0]:" and stream.result is None and stream.finish_reason is None
        result = stream.until_done()
    assert result.text == stream.text == "echo[0]: one two" and stream.finish_reason == "stop"


def test_importing_the_sdk_and_a_remote_client_loads_neither_torch_nor_transformers():
    code = (
        "import sys, llava_next_sdk\n"
        "client = llava_next_sdk.AsyncClient(base_url='http://127.0.0.1:9/v1', model='m')\n"
        "sync = llava_next_sdk.Client(base_url='http://127.0.0.1:9/v1', model='m'); sync.close()\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
        "print(','.join(heavy) or 'light')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "light"


def test_a_client_needs_a_model_or_a_base_url():
    with pytest.raises(TypeError, match="model=.*base_url="):
        AsyncClient()
    with pytest.raises(TypeError, match="unknown option.*device"):
        AsyncClient(base_url="http://127.0.0.1:9/v1", device="cuda")
    with pytest.raises(LlavaNextError, match="no transport serves 'ftp://x'"):
        AsyncClient(base_url="ftp://x")


class EchoTransport:
    """A transport plugin of our own: proves the client only talks to the seam."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.closed = False

    async def generate(self, request):
        return GenerationResult(f"{self.url}: {request.messages[-1].text}", "stop", Usage(1, 1))

    def stream(self, request):
        transport = self

        class Items:
            async def __aenter__(self):
                async def items():
                    for word in ("a", "b"):
                        yield word
                    yield await transport.generate(request)

                return items()

            async def __aexit__(self, *exc):
                return None

        return Items()

    async def aclose(self):
        self.closed = True


class EchoPlugin:
    @hookimpl
    def llava_next_sdk_transport(self, url, options):
        return EchoTransport(url) if url.startswith("echo:") else None


@pytest.mark.anyio
async def test_a_plugin_transport_is_picked_by_url_scheme():
    plugin = EchoPlugin()
    manager = get_plugin_manager()
    manager.register(plugin)
    try:
        async with AsyncClient(base_url="echo://there") as client:
            assert isinstance(client.transport, AsyncTransport)
            assert (await client.generate(None, "hi")).text == "echo://there: hi"
            async with client.stream(None, "x") as stream:
                assert [d async for d in stream] == ["a", "b"]
            assert stream.result.text == "echo://there: x"
        assert client.transport.closed
    finally:
        manager.unregister(plugin)


class WrongTypesPlugin:
    """A buggy transport plugin: a class where an instance is due, or a string."""

    @hookimpl
    def llava_next_sdk_transport(self, url, options):
        return {"class:": EchoTransport, "text:": "a transport"}.get(url.split("//")[0])


def test_a_transport_plugin_returning_no_transport_is_a_typed_error_saying_what_it_returned():
    from llava_next_sdk import LlavaNextError

    plugin = WrongTypesPlugin()
    manager = get_plugin_manager()
    manager.register(plugin)
    try:
        with pytest.raises(LlavaNextError, match="returned the class EchoTransport, not a transport"):
            AsyncClient(base_url="class://x")
        with pytest.raises(LlavaNextError, match="returned a str, not a transport: return an instance with generate"):
            AsyncClient(base_url="text://x")
    finally:
        manager.unregister(plugin)


class SlowToLoadPlugin:
    """Provides ``slow:`` URLs, taking a while to give its transport (as importing torch does)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.calls = seconds, 0

    @hookimpl
    def llava_next_sdk_transport(self, url, options):
        if not url.startswith("slow:"):
            return None
        self.calls += 1
        time.sleep(self.seconds)
        return EchoTransport(url)


def test_waiting_for_another_callers_load_can_be_cancelled_and_the_load_is_done_once():
    """The first call loads the transport (in a worker thread); a second call waits for it on the event loop,
    so its own deadline ends its wait at once rather than after the whole load."""
    from llava_next_sdk.transports.deferred import DeferredTransport

    plugin = SlowToLoadPlugin(1.5)
    manager = get_plugin_manager()
    manager.register(plugin)
    transport = DeferredTransport("slow:x", {}, "slow")

    async def scenario() -> float:
        async with anyio.create_task_group() as group:
            group.start_soon(transport._get)  # loads
            await anyio.sleep(0.2)
            started = time.monotonic()
            with anyio.move_on_after(0.2):
                await transport._get()  # waits for the first
            waited = time.monotonic() - started
        assert isinstance(await transport._get(), EchoTransport)
        await transport.aclose()
        return waited

    try:
        assert anyio.run(scenario) < 1.0 and plugin.calls == 1
    finally:
        manager.unregister(plugin)
