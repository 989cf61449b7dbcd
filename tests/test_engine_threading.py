"""The engine under many threads: one engine thread, hooks on it and once per request, shutdown keeps its
timeout, preparing one request never waits for another's, stats are safe to read anywhere, leaving a stream
cancels it, and the shared engine is found whatever spelling its options use."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
import transformers
from checkpoints import ask, photo, wait_for
from llava_next_sdk.errors import RequestCancelledError, ServerError

from llava_next_plugin.engine import Engine, SamplingParams
from llava_next_plugin.engine.detokenizer import StopMatcher, TextStream
from llava_next_plugin.engine.shared import get_shared_engine, shared_key
from llava_next_plugin.hooks import get_plugin_manager, hookimpl

GREEDY = SamplingParams(max_tokens=6, temperature=0)
ENGINE_THREAD = "llava-next-engine"


class Observer:
    """Records each hook call with the thread it ran on; ``before_generate`` waits for ``gate`` when held."""

    def __init__(self, hold: bool = False) -> None:
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self.started: list[tuple[str, str]] = []
        self.ended: list[tuple[str, str, str | None]] = []

    @hookimpl
    def llava_next_before_generate(self, request_id, request):
        self.started.append((request_id, threading.current_thread().name))
        self.gate.wait(60)

    @hookimpl
    def llava_next_after_generate(self, request_id, result):
        self.ended.append((request_id, threading.current_thread().name, result["error"]))


@pytest.fixture
def observer():
    observers = []

    def make(hold: bool = False) -> Observer:
        observer = Observer(hold)
        get_plugin_manager().register(observer)
        observers.append(observer)
        return observer

    yield make
    for observer in observers:
        observer.gate.set()
        get_plugin_manager().unregister(observer)


def test_many_threads_starting_an_engine_at_once_start_one_engine_thread(reference):
    engine = Engine(*reference, max_batch_size=1)
    barrier = threading.Barrier(16)

    def start():
        barrier.wait()
        engine.start()

    before = {t.ident for t in threading.enumerate() if t.name == ENGINE_THREAD}
    threads = [threading.Thread(target=start) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        started = [t for t in threading.enumerate() if t.name == ENGINE_THREAD and t.ident not in before]
        assert started == [engine._thread]
    finally:
        engine.shutdown(drain=False)


def test_hooks_of_a_request_cancelled_in_the_queue_run_on_the_engine_thread(reference, observer):
    engine = Engine(*reference, max_batch_size=1).start()
    seen = observer(hold=True)
    try:
        running = engine.submit(engine.prepare(ask("Busy"), [photo()], GREEDY))
        assert wait_for(lambda: seen.started)
        queued = engine.submit(engine.prepare(ask("Queued"), [photo()], GREEDY))
        queued.cancel()
        assert engine.queue_depth == 0  # its place is free at once
        seen.gate.set()
        running.result(timeout=60)
        with pytest.raises(RequestCancelledError):
            queued.result(timeout=60)
    finally:
        engine.shutdown(drain=False)
    assert {(rid, thread) for rid, thread, _ in seen.ended} == {(running.id, ENGINE_THREAD), (queued.id, ENGINE_THREAD)}
    assert [rid for rid, _ in seen.started] == [running.id]


def test_a_batched_prefill_retried_row_by_row_calls_before_generate_once_per_request(reference, engine, observer):
    model, processor = reference
    requests = [(ask("One"), [photo(40, 40)]), (ask("Two"), [photo(60, 30)]), (ask("Three"), [photo(30, 60)])]
    expected = [engine.generate(m, i, GREEDY).token_ids for m, i in requests]
    failing_model = transformers.LlavaNextForConditionalGeneration.from_pretrained(model.config._name_or_path).eval()

    def refuse_batched_prefill(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and embeds.shape[0] > 1 and embeds.shape[1] > 1:
            raise RuntimeError("batched prefill refused")

    failing_model.model.language_model.register_forward_pre_hook(refuse_batched_prefill, with_kwargs=True)
    failing = Engine(failing_model, processor, max_batch_size=4)
    seen = observer()
    try:
        handles = [failing.submit(failing.prepare(m, i, GREEDY)) for m, i in requests]
        failing.start()  # all queued: they join together, their batched prefill fails, each is re-run alone
        assert [h.result(timeout=120).token_ids for h in handles] == expected
    finally:
        failing.shutdown(drain=False)
    assert sorted(rid for rid, _ in seen.started) == sorted(h.id for h in handles)
    assert {thread for _, thread in seen.started} == {ENGINE_THREAD}


class StopsTheEngineThread:
    """``before_generate`` holds the first request until ``gate`` is set, and raises ``SystemExit`` (which no
    ``except Exception`` catches: the engine thread stops) for the request ``stop_on``."""

    def __init__(self) -> None:
        self.gate, self.entered = threading.Event(), threading.Event()
        self.stop_on: str | None = None

    @hookimpl
    def llava_next_before_generate(self, request_id, request):
        if request_id == self.stop_on:
            raise SystemExit("a plugin stopped the engine thread")
        self.entered.set()
        self.gate.wait(60)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread stops on purpose
def test_requests_taken_from_the_queue_with_one_that_stops_the_engine_thread_are_ended_not_lost(reference):
    """Three requests leave the queue together; the first one's hook stops the engine thread. The two others,
    no longer queued and not yet in the batch, end with the engine's error instead of waiting forever."""
    plugin = StopsTheEngineThread()
    get_plugin_manager().register(plugin)
    engine = Engine(*reference, max_batch_size=4)
    try:
        first = engine.submit(engine.prepare(ask("First"), [photo()], GREEDY))
        assert plugin.entered.wait(60)  # the engine thread holds the first request in its hook
        plugin.stop_on = "stops"
        handles = [engine.submit(engine.prepare(ask(t), [photo()], GREEDY), request_id=t) for t in ("stops", "a", "b")]
        plugin.gate.set()  # the next step takes all three from the queue; the first of them stops the thread
        for handle in [first, *handles]:
            with pytest.raises(ServerError, match="the engine stopped"):
                handle.result(timeout=60)
        assert not engine.accepting
    finally:
        plugin.gate.set()
        get_plugin_manager().unregister(plugin)
        engine.shutdown(drain=False)


def test_a_hook_that_shuts_the_engine_down_does_not_wait_for_itself(reference):
    """``shutdown()`` (draining, by default) from a hook on the engine thread, with another request running:
    only that thread could end it, so the call does not wait; both requests end, typed."""
    engine = Engine(*reference, max_batch_size=2).start()

    class ShutsDown:
        @hookimpl
        def llava_next_before_generate(self, request_id, request):
            if request_id == "shuts-down":
                engine.shutdown()

    plugin = ShutsDown()
    get_plugin_manager().register(plugin)
    try:
        running = engine.submit(engine.prepare(ask("Long"), [photo()], SamplingParams(max_tokens=400, temperature=0)))
        stream = iter(running)  # kept: an iterator left early cancels its request
        next(stream)
        last = engine.submit(engine.prepare(ask("Last"), [photo()], GREEDY), request_id="shuts-down")
        for handle in (running, last):
            with pytest.raises(ServerError) as info:
                handle.result(timeout=60)
            assert info.value.status == 503
        assert not engine.accepting
    finally:
        get_plugin_manager().unregister(plugin)
        engine.shutdown(drain=False)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # SystemExit ends the thread
@pytest.mark.parametrize("raised", ["CancelledError", "SystemExit"])
def test_an_observer_raising_a_base_exception_still_ends_the_request(reference, raised):
    """``after_generate`` raising asyncio's CancelledError (an async client the hook drives, cancelled) is logged
    like any error; SystemExit stops the engine thread; either way the request has ended, never left waiting."""
    import asyncio

    engine = Engine(*reference, max_batch_size=1).start()

    class Raises:
        @hookimpl
        def llava_next_after_generate(self, request_id, result):
            raise asyncio.CancelledError() if raised == "CancelledError" else SystemExit(3)

    plugin = Raises()
    get_plugin_manager().register(plugin)
    try:
        handle = engine.submit(engine.prepare(ask("Hi"), [photo()], GREEDY))
        assert len(handle.result(timeout=60).token_ids) == GREEDY.max_tokens
        if raised == "CancelledError":
            again = engine.submit(engine.prepare(ask("Again"), [photo()], GREEDY))
            assert len(again.result(timeout=60).token_ids) == GREEDY.max_tokens
        else:
            assert wait_for(lambda: engine.stopped, 30)
    finally:
        get_plugin_manager().unregister(plugin)
        engine.shutdown(drain=False)


def test_a_request_cancelled_in_the_queue_adds_no_prompt_tokens_to_the_counters(reference):
    engine = Engine(*reference, max_batch_size=1).start()
    try:
        running = engine.submit(engine.prepare(ask("Long"), [photo()], SamplingParams(max_tokens=400, temperature=0)))
        stream = iter(running)  # kept: an iterator left early cancels its request
        next(stream)
        before = engine.stats_snapshot()
        queued = engine.submit(engine.prepare(ask("Queued"), [photo()], GREEDY))
        queued.cancel()
        with pytest.raises(RequestCancelledError):
            queued.result(timeout=60)
        after = engine.stats_snapshot()
        assert after["requests_cancelled"] == before.get("requests_cancelled", 0) + 1
        assert after.get("prompt_tokens", 0) == before.get("prompt_tokens", 0)
        assert after.get("image_tokens", 0) == before.get("image_tokens", 0)
        running.cancel()
    finally:
        engine.shutdown(drain=False)


def test_shutdown_keeps_its_timeout_and_records_each_request_once(reference, observer):
    engine = Engine(*reference, max_batch_size=1).start()
    seen = observer(hold=True)
    stuck = engine.submit(engine.prepare(ask("Stuck"), [photo()], GREEDY))
    queued = engine.submit(engine.prepare(ask("Queued"), [photo()], GREEDY))
    assert wait_for(lambda: seen.started)  # the engine thread waits in before_generate
    stopper = threading.Thread(target=engine.shutdown, kwargs={"drain": True, "timeout": 0.5})
    stopper.start()
    stopper.join(20)
    returned = not stopper.is_alive()
    seen.gate.set()  # the engine thread goes on, finds the engine stopped, and must not end them again
    stopper.join(60)
    engine._thread.join(60)
    assert returned, "shutdown(timeout=0.5) was still waiting for the engine thread"
    for handle in (stuck, queued):
        with pytest.raises(ServerError, match="shut down"):
            handle.result(timeout=1)
    ends = [rid for rid, _, _ in seen.ended]
    assert sorted(ends) == sorted([stuck.id, queued.id])
    snapshot = engine.stats_snapshot()
    assert sum(v for k, v in snapshot.items() if k.startswith("requests_")) == 2


def test_breaking_out_of_a_thread_stream_cancels_the_request(engine):
    handle = engine.submit(engine.prepare(ask("Long"), [photo()], SamplingParams(max_tokens=400, temperature=0)))
    for _ in handle:
        break
    with pytest.raises(RequestCancelledError):
        handle.result(timeout=60)
    assert wait_for(lambda: engine.batch_size == 0)


def test_stats_snapshot_is_a_plain_copy_safe_to_read_while_the_engine_counts(engine):
    errors, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            try:
                for key, value in engine.stats_snapshot().items():
                    assert isinstance(key, str) and isinstance(value, int)
                sum(engine.stats.values())
            except Exception as exc:  # e.g. "dictionary changed size during iteration"
                errors.append(exc)
                return

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        handles = [engine.submit(engine.prepare(ask(f"Count {i}"), [photo()], GREEDY)) for i in range(6)]
        for h in handles:
            h.result(timeout=120)
    finally:
        stop.set()
        for t in readers:
            t.join(30)
    assert errors == []
    snapshot = engine.stats_snapshot()
    snapshot["requests_ok"] = -1
    assert engine.stats_snapshot()["requests_ok"] >= 6  # a copy: changing it changes nothing
    assert engine.accepting is True


class GatedProcessor:
    """transformers' processor, except that a prompt containing ``SLOW`` waits for ``gate`` in tokenization."""

    def __init__(self, inner, gate: threading.Event) -> None:
        self.inner, self.gate = inner, gate

    def __call__(self, *args, text=None, **kwargs):
        if text and "SLOW" in text:
            self.gate.wait(60)
        return self.inner(*args, text=text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __deepcopy__(self, memo):
        return GatedProcessor(copy.deepcopy(self.inner, memo), self.gate)


def test_preparing_one_request_never_waits_for_another_being_tokenized(reference):
    model, processor = reference
    gate = threading.Event()
    engine = Engine(model, GatedProcessor(processor, gate))
    try:
        slow = threading.Thread(target=engine.prepare, args=(ask("SLOW one"), [photo()], GREEDY))
        slow.start()
        time.sleep(0.2)  # let it reach the tokenizer
        done = threading.Event()
        fast = threading.Thread(target=lambda: (engine.prepare(ask("quick"), [photo()], GREEDY), done.set()))
        fast.start()
        fast.join(30)
        assert done.is_set() and slow.is_alive()  # the quick one finished while the slow one still tokenizes
    finally:
        gate.set()
        slow.join(30)
        engine.shutdown(drain=False)


def test_shared_engines_are_keyed_by_what_options_mean(tiny_checkpoint):
    assert shared_key(tiny_checkpoint, dtype="bfloat16") == shared_key(tiny_checkpoint, dtype=torch.bfloat16)
    assert shared_key(tiny_checkpoint, dtype="float32", device="cpu") == shared_key(
        tiny_checkpoint, dtype=torch.float32, device=torch.device("cpu")
    )
    assert shared_key(tiny_checkpoint, dtype="float32") != shared_key(tiny_checkpoint, dtype="bfloat16")
    # compile: unset means the device's default (eager on CPU)
    assert shared_key(tiny_checkpoint, device="cpu") == shared_key(tiny_checkpoint, device="cpu", compile=False)
    assert shared_key(tiny_checkpoint, device="cpu") != shared_key(tiny_checkpoint, device="cpu", compile=True)
    first = get_shared_engine(tiny_checkpoint, dtype="float32", device="cpu", max_batch_size=2)
    try:
        assert get_shared_engine(tiny_checkpoint, dtype=torch.float32, device="cpu", max_batch_size=2) is first
    finally:
        first.shutdown(drain=False)


def test_shared_engines_load_once_per_key_and_a_load_holds_up_no_other_key(tiny_checkpoint):
    from llava_next_plugin.engine import shared

    options = {"dtype": "float32", "device": "cpu", "max_batch_size": 3}
    other_key = shared_key(str(tiny_checkpoint) + "-elsewhere", **options)
    with shared._LOCK:
        other_load = shared._KEY_LOCKS.setdefault(other_key, threading.Lock())
    barrier, engines = threading.Barrier(4), []

    def get():
        barrier.wait()
        engines.append(get_shared_engine(tiny_checkpoint, **options))

    with other_load:  # as while another caller loads another model, for as long as this test runs
        threads = [threading.Thread(target=get) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        loaded = len(engines)
    try:
        assert loaded == 4, "a caller for this model waited for the load of another"
        assert all(e is engines[0] for e in engines)  # four callers at once, one engine loaded
    finally:
        engines[0].shutdown(drain=False)


def test_stop_strings_are_matched_across_tokens_overlaps_and_very_long_stops():
    matcher = StopMatcher(["aab", "xyz"])
    assert matcher.feed("aaa", 0) is None and matcher.partial == 2  # "aa" may start "aab": held back
    assert matcher.feed("ab", 3) == 2  # "aaaab": the stop starts at character 2

    class Characters:  # a tokenizer whose tokens are single characters
        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

    long_stop = "ab" * 150_000
    stream = TextStream(Characters(), stop=[long_stop, "!!"])
    text = "hello " + "ab" * 1000 + " world!! more"
    deltas = [stream.add(ord(c)) for c in text] + [stream.flush()]
    assert "".join(deltas) == stream.text == "hello " + "ab" * 1000 + " world"
    assert stream.stopped


def test_a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing(engine):
    from llava_next_sdk.errors import ContextLengthExceededError

    huge = "word " * 400_000  # 2 MB: far more characters than the 4096-token context can hold
    with pytest.raises(ContextLengthExceededError, match="characters") as info:
        engine.prepare(ask(huge), [photo()], GREEDY)
    assert info.value.status == 400 and "4096" in info.value.message


# --- OpenMP workers ---------------------------------------------------------------------------------
def _in_fresh_thread(job):
    """Run *job* in a new thread with a two-thread OpenMP team (one worker besides itself); its result."""
    out: dict = {}

    def run():
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            out["result"] = job()
        except BaseException as exc:  # re-raised in the test's thread
            out["error"] = exc
        finally:
            torch.set_num_threads(threads)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(120)
    if "error" in out:
        raise out["error"]
    return out["result"]


def _workers_of(action) -> tuple[set[str], set[str]]:
    """(the OS threads a parallel op of this thread started, those of them still alive after *action*)."""
    import os

    def threads() -> set[str]:
        return set(os.listdir("/proc/self/task"))

    before = threads()
    torch.ones(1 << 22).mul_(3)  # far above torch's grain size: runs on this thread's OpenMP team
    # new OS threads that Python did not start (a Python thread another test's leftovers start meanwhile is none)
    workers = threads() - before - {str(t.native_id) for t in threading.enumerate()}
    action()
    # a released worker leaves the runtime's barrier, then exits: it may still be listed for a moment
    deadline = time.monotonic() + 2.0
    while workers & threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    return workers, workers & threads()


def test_threads_that_start_or_prepare_let_their_idle_openmp_workers_go(tiny_checkpoint):
    """The thread that starts the engine and each thread that prepares a request keep no idle OpenMP workers:
    the engine thread's are then the only ones, and spin between ops instead of sleeping (engine/openmp.py)."""
    from llava_next_plugin.engine.openmp import release_idle_workers

    model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_checkpoint).eval()
    engine = Engine(model, transformers.AutoProcessor.from_pretrained(tiny_checkpoint), compile=False)
    params = SamplingParams(max_tokens=3, temperature=0)
    engine.prepare(ask("Hello?"), [photo(40, 30)], params)  # starts the image processor's resize thread

    workers, alive = _in_fresh_thread(lambda: _workers_of(lambda: release_idle_workers()))
    assert len(workers) == 1 and not alive
    prepared = []
    workers, alive = _in_fresh_thread(
        lambda: _workers_of(lambda: prepared.append(engine.prepare(ask("What is it?"), [photo(40, 30)], params)))
    )
    assert len(workers) == 1 and not alive, "prepare kept its thread's OpenMP workers"
    workers, alive = _in_fresh_thread(lambda: _workers_of(engine.start))
    assert len(workers) == 1 and not alive, "start kept its thread's OpenMP workers"
    try:
        assert engine.submit(prepared[0]).result(timeout=120).completion_tokens == 3
    finally:
        engine.shutdown()


def test_an_idle_engine_thread_lets_its_openmp_workers_go(tiny_checkpoint):
    """When its batch empties, the engine thread lets its OpenMP workers go too, so that an idle engine does not
    make the application's own parallel ops sleep and wake (engine/openmp.py); its next request starts them again."""
    import os

    def threads() -> set[str]:
        return set(os.listdir("/proc/self/task"))

    model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_checkpoint).eval()
    engine = Engine(model, transformers.AutoProcessor.from_pretrained(tiny_checkpoint), compile=False)
    params = SamplingParams(max_tokens=40, temperature=0)
    prepared = [engine.prepare(ask(f"Hello {i}?"), [photo(40, 30)], params) for i in range(2)]
    threads_before = torch.get_num_threads()
    torch.set_num_threads(2)  # a worker besides each thread itself, however many cores
    before, python_threads = threads(), set(threading.enumerate())
    engine.start()
    try:
        # this engine's thread (other tests' engines, of the same name, may still be alive)
        (engine_thread,) = [t for t in set(threading.enumerate()) - python_threads if t.name == "llava-next-engine"]
        for request in prepared:  # twice: the second request's parallel ops start a new team
            handle = engine.submit(request)
            seen: set[str] = set()
            while not handle.done:
                seen |= threads() - before
                time.sleep(0.001)
            workers = seen - {str(engine_thread.native_id)}
            assert workers, "no OpenMP worker ran the engine's parallel ops"
            assert handle.result(timeout=60).completion_tokens == 40  # long enough to be seen running
            gone = wait_for(lambda workers=workers: not workers & threads())
            assert gone, "the idle engine thread kept its OpenMP workers"
    finally:
        engine.shutdown()
        torch.set_num_threads(threads_before)


EXIT_SCRIPT = """
import atexit, sys, threading
threads = []
# registered before the engine module is imported, so it runs after the engine's own exit handler (LIFO)
atexit.register(lambda: print("engine threads alive at exit:", [t.is_alive() for t in threads], flush=True))
sys.path.insert(0, sys.argv[2])
from checkpoints import ask
from llava_next_plugin.engine import Engine, SamplingParams
from llava_next_plugin.engine.shared import get_shared_engine
engines = [Engine.from_pretrained(sys.argv[1]).start(), get_shared_engine(sys.argv[1], max_batch_size=2)]
for engine in engines:
    print(engine.generate(ask("Hi", images=0), [], SamplingParams(max_tokens=2, temperature=0)).completion_tokens)
    threads.append(engine._thread)
"""


def test_engine_threads_still_running_at_exit_are_stopped_before_the_interpreter_tears_down(tiny_checkpoint):
    """An engine never shut down (the SDK's shared engines never are) is stopped at exit: its daemon thread, left
    inside native code while the process tore down, aborted it now and then (status -6)."""
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).resolve().parent)
    done = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(tiny_checkpoint), tests], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["[False,", "False]"] and done.stdout.startswith("2\n2\n"), done.stdout
