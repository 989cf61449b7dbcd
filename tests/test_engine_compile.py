"""The compiled decode step (torch.compile, inductor's CPU codegen): one graph per batch-size bucket, made at
warm-up, no graph break, no recompile when requests join and leave within the warmed buckets or contexts grow,
and the same greedy tokens as the eager engine."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from checkpoints import ask, photo
from llava_next_sdk.errors import ServerError
from torch._dynamo.utils import counters

from llava_next_plugin.engine import Engine, SamplingParams
from llava_next_plugin.engine.step import length_bucket


@torch.library.custom_op("llava_next_tests::fails_when_run", mutates_args=())
def fails_when_run(x: torch.Tensor) -> torch.Tensor:
    """Traced into a graph like any op (its shape below), it raises when the graph runs."""
    raise RuntimeError("a kernel of the compiled step failed")


@fails_when_run.register_fake
def _fails_when_run_shape(x):
    return torch.empty_like(x)


@torch.library.custom_op("llava_next_tests::runs_out_of_memory", mutates_args=())
def runs_out_of_memory(x: torch.Tensor) -> torch.Tensor:
    """Traced like any op, it raises an out-of-memory when the graph runs."""
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@runs_out_of_memory.register_fake
def _runs_out_of_memory_shape(x):
    return torch.empty_like(x)


@pytest.fixture(scope="module")
def eager(ours):
    """An eager engine over the tiny model: the tokens a compiled engine must give."""
    engine = Engine(*ours, max_batch_size=2, compile=False).start()
    yield engine
    engine.shutdown(drain=False)


class EndsInWhenTraced(torch.nn.Module):
    """A projection that, traced by dynamo, ends in *op* (a graph then raises when it runs); run eagerly, the
    projection alone."""

    def __init__(self, linear: torch.nn.Module, op) -> None:
        super().__init__()
        self.linear, self.op = linear, op

    def forward(self, x):
        y = self.linear(x)
        return self.op(y) if torch.compiler.is_compiling() else y


def model_failing_when_compiled(path, op):
    """The tiny model, its first layer's query projection ending in *op* when traced (see EndsInWhenTraced)."""
    model = transformers.AutoModelForImageTextToText.from_pretrained(path).eval()
    attention = model.model.language_model.layers[0].self_attn
    attention.q_proj = EndsInWhenTraced(attention.q_proj, op)
    return model


@pytest.fixture(scope="module")
def ours(tiny_checkpoint):
    """Our model (the Auto classes give ours once the plugin is imported) and its processor."""
    model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_checkpoint).eval()
    return model, transformers.AutoProcessor.from_pretrained(tiny_checkpoint)


def test_compiled_decode_step_warms_up_once_per_bucket_and_never_recompiles_on_joins_and_leaves(ours, caplog):
    torch._dynamo.reset()
    counters.clear()
    compiled = Engine(*ours, max_batch_size=2, compile=True)
    eager = Engine(*ours, max_batch_size=2, compile=False).start()
    try:
        assert compiled.runner.compiled and not eager.runner.compiled
        with caplog.at_level(logging.INFO, logger="llava_next_plugin.engine"):
            assert compiled.warm_up() > 0
        # on the engine thread, started for it: CUDA graphs are recorded per thread, and that thread replays them
        (record,) = [r for r in caplog.records if "warm-up" in r.getMessage()]
        assert record.threadName == "llava-next-engine"
        graphs = counters["stats"]["unique_graphs"]
        assert graphs == 2  # buckets of 1 and 2 rows
        compiled.start()
        long = SamplingParams(max_tokens=20, temperature=0)
        short = SamplingParams(max_tokens=4, temperature=0)
        first = compiled.submit(compiled.prepare(ask("A long answer"), [photo(64, 64)], long))
        stream = iter(first)
        next(stream)  # decoding alone in slot 0 (bucket 1)
        second = compiled.submit(compiled.prepare(ask("Short"), [photo(40, 90)], short))  # joins: bucket 2
        results = [second.result(timeout=300), first.result(timeout=300)]  # leaves: back to fewer rows
        third = compiled.generate(ask("Again"), [photo(50, 50)], short)
        long_prompt = ask("word " * 700)  # a context of 700+ tokens: the same graph (dynamic in the length)
        fourth = compiled.generate(long_prompt, [photo(50, 50)], short)
        assert fourth.prompt_tokens > 700
        assert counters["stats"]["unique_graphs"] == graphs
        assert dict(counters["graph_break"]) == {}
        assert compiled.runner._by_vocab(2, True)  # the 2-row graph computed the LM head vocabulary-major (head.py)
        assert [r.token_ids for r in results] == [
            eager.generate(ask("Short"), [photo(40, 90)], short).token_ids,
            eager.generate(ask("A long answer"), [photo(64, 64)], long).token_ids,
        ]
        assert third.token_ids == eager.generate(ask("Again"), [photo(50, 50)], short).token_ids
        assert fourth.token_ids == eager.generate(long_prompt, [photo(50, 50)], short).token_ids
    finally:
        compiled.shutdown(drain=False)
        eager.shutdown(drain=False)


@pytest.mark.parametrize("where", ["a decoder layer", "the LM head"])
def test_a_hook_set_on_the_model_after_compiling_is_run_by_the_compiled_engine(ours, where):
    """The engine asks for hooks at each step and then runs the modules' own forwards (a step compiled without a
    hook would not run one set later); once the hook is gone it is back to the compiled plain step."""
    engine = Engine(*ours, max_batch_size=1, compile=True).start()
    try:
        engine.warm_up()
        params = SamplingParams(max_tokens=4, temperature=0)
        before = engine.generate(ask("Hooks"), [photo(48, 48)], params)
        calls = []
        runner = engine.runner
        module = runner.language_model.layers[0] if where == "a decoder layer" else runner.lm_head
        handle = module.register_forward_hook(lambda module, args, output: calls.append(1))
        try:
            hooked = engine.generate(ask("Hooks"), [photo(48, 48)], params)
        finally:
            handle.remove()
        assert len(calls) >= 4 and hooked.token_ids == before.token_ids  # the prefill and each decode step
        calls.clear()
        assert engine.generate(ask("Hooks"), [photo(48, 48)], params).token_ids == before.token_ids and not calls
    finally:
        engine.shutdown(drain=False)


def test_a_step_dynamo_cannot_compile_is_decoded_eagerly_instead_of_failing(tiny_checkpoint, ours, eager, caplog):
    """A compile that fails (here a layer whose forward breaks the graph, which ``fullgraph`` refuses; in a long
    run, dynamo's recompile limit) leaves the engine decoding eagerly, with a warning: every request ends."""

    class Breaks(torch.nn.Module):  # the same projection, with a graph break in its forward
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def forward(self, x):
            torch._dynamo.graph_break()
            return self.linear(x)

    model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_checkpoint).eval()
    attention = model.model.language_model.layers[0].self_attn
    attention.q_proj = Breaks(attention.q_proj)
    engine = Engine(model, ours[1], max_batch_size=2, compile=True).start()
    try:
        params = SamplingParams(max_tokens=6, temperature=0)
        with caplog.at_level(logging.WARNING, logger="llava_next_plugin.engine"):
            result = engine.generate(ask("One"), [photo(48, 48)], params)
            again = engine.generate(ask("Two"), [photo(64, 40)], params)
        assert caplog.text.count("decoding eagerly from now on") == 1
        assert result.token_ids == eager.generate(ask("One"), [photo(48, 48)], params).token_ids
        assert again.token_ids == eager.generate(ask("Two"), [photo(64, 40)], params).token_ids
    finally:
        engine.shutdown(drain=False)


def test_a_compiled_step_that_fails_when_it_runs_is_given_up_for_the_eager_one(tiny_checkpoint, ours, eager, caplog):
    """A compiled step that compiles but raises when it runs (a CUDA graph that cannot be recorded, a generated
    kernel that fails), while the same step runs eagerly: that step's tokens come from the eager step, and every
    later one too, with one warning saying why; no request fails."""
    model = model_failing_when_compiled(tiny_checkpoint, fails_when_run)
    engine = Engine(model, ours[1], max_batch_size=2, compile=True).start()
    try:
        params = SamplingParams(max_tokens=6, temperature=0)
        with caplog.at_level(logging.WARNING, logger="llava_next_plugin.engine"):
            handles = [engine.submit(engine.prepare(ask(t), [photo(48, 40)], params)) for t in ("One", "Two")]
            results = [h.result(timeout=120) for h in handles]
            again = engine.generate(ask("Three"), [photo(64, 40)], params)
        assert caplog.text.count("decoding eagerly from now on") == 1
        failure = engine.runner.compile_failure
        assert not engine.runner.compiled and failure.startswith("it raised RuntimeError('a kernel of the compiled")
        for result, text in zip(results, ("One", "Two"), strict=True):
            assert result.token_ids == eager.generate(ask(text), [photo(48, 40)], params).token_ids
        assert again.token_ids == eager.generate(ask("Three"), [photo(64, 40)], params).token_ids
    finally:
        engine.shutdown(drain=False)


def test_a_compiled_step_that_runs_out_of_memory_runs_eagerly_and_compiling_stays_on(
    tiny_checkpoint, ours, eager, caplog
):
    """An out-of-memory in the compiled step (recording a CUDA graph for a new length, in a pool the KV slots left
    short) is transient: that step runs eagerly, and the next steps try the compiled one again."""
    model = model_failing_when_compiled(tiny_checkpoint, runs_out_of_memory)
    engine = Engine(model, ours[1], max_batch_size=2, compile=True).start()
    try:
        params = SamplingParams(max_tokens=5, temperature=0)
        with caplog.at_level(logging.WARNING, logger="llava_next_plugin.engine"):
            result = engine.generate(ask("One"), [photo(48, 40)], params)
        assert result.token_ids == eager.generate(ask("One"), [photo(48, 40)], params).token_ids
        # each of its 4 decode steps ran out of memory compiled and ran eagerly; compiling was kept
        assert caplog.text.count("ran out of memory: this step runs eagerly") == 4
        assert engine.runner.compiled and engine.runner.compile_failure is None
    finally:
        engine.shutdown(drain=False)


def test_compiling_is_off_by_default_on_cpu(ours):
    engine = Engine(*ours, max_batch_size=1)
    assert not engine.runner.compiled


def test_the_compiled_step_attends_over_the_kv_heads_as_they_are_with_transformers_arithmetic():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from llava_next_plugin.engine.step import slot_attention

    module = torch.nn.Module()
    module.num_key_value_groups = 2  # 4 query heads over 2 key/value heads
    module.is_causal = True
    gen = torch.Generator().manual_seed(0)
    key, value = torch.randn(3, 2, 10, 8, generator=gen), torch.randn(3, 2, 10, 8, generator=gen)
    mask = torch.zeros(3, 1, 1, 10)
    mask[0, ..., 6:] = torch.finfo(torch.float32).min  # rows see different lengths of their slots
    one = torch.randn(3, 4, 1, 8, generator=gen)
    ours, _ = slot_attention(module, one, key, value, mask, scaling=0.3)
    theirs, _ = sdpa_attention_forward(module, one, key, value, mask, scaling=0.3)  # eager: transformers packs too
    assert ours.shape == (3, 1, 4, 8)
    assert torch.equal(ours, theirs)
    chunk = torch.randn(3, 4, 5, 8, generator=gen)  # prefill chunks are transformers' own path
    causal = torch.zeros(3, 1, 5, 10)
    assert torch.equal(
        slot_attention(module, chunk, key, value, causal)[0],
        sdpa_attention_forward(module, chunk, key, value, causal)[0],
    )


def test_a_compiled_engine_runs_the_plain_decoder_and_leaves_the_models_attention_as_it_was(ours):
    engine = Engine(*ours, max_batch_size=1, compile=True)
    assert engine.runner.decoder is not None
    assert engine.runner.language_model.config._attn_implementation == "sdpa"


def test_a_compiled_engine_over_a_backbone_the_plain_decoder_does_not_know_runs_the_slot_attention(
    tiny_checkpoint_factory,
):
    folder = tiny_checkpoint_factory(text="phi3")  # fused qkv and gate-up projections: transformers' forward
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    engine = Engine(model, processor, max_batch_size=1, compile=True).start()
    eager = Engine(model, processor, max_batch_size=1, compile=False).start()
    try:
        assert engine.runner.decoder is None
        assert engine.runner.language_model.config._attn_implementation == "llava_next_slots"
        graphs = counters["stats"]["unique_graphs"]
        params = SamplingParams(max_tokens=4, temperature=0)
        result = engine.generate(ask("Phi"), [photo(48, 48)], params)
        assert counters["stats"]["unique_graphs"] > graphs  # its decode steps ran compiled, not eagerly
        assert result.token_ids == eager.generate(ask("Phi"), [photo(48, 48)], params).token_ids
    finally:
        engine.shutdown(drain=False)
        eager.shutdown(drain=False)


def test_warming_up_a_shut_down_engine_says_so(ours):
    engine = Engine(*ours, max_batch_size=1, compile=False)
    assert engine.warm_up() >= 0  # eager: one step per bucket, on the engine thread it starts
    engine.shutdown()
    with pytest.raises(ServerError, match="cannot warm up"):
        engine.warm_up()


def test_cuda_graph_length_buckets_read_at_most_a_quarter_more_columns_than_needed():
    sizes = [length_bucket(n, 10_000) for n in (1, 512, 513, 641, 1000, 1025, 2489, 4096, 4097)]
    assert sizes == [512, 512, 640, 768, 1024, 1280, 2560, 4096, 5120]
    assert length_bucket(9000, 8193) == 8193  # capped at the slots' length
    for n in range(513, 40_000, 97):
        assert n <= length_bucket(n, 1 << 20) <= 1.25 * n


def test_a_graph_compiled_again_after_warm_up_is_dynamic_too(ours):
    """Dimensions are marked dynamic only for calls that compile a graph; when the LM head stops being computed
    vocabulary-major (its class changed in place, as a quantizer or a probe may do), the step compiles again
    (both graphs guard on the head's class), dynamic again: other row counts and longer contexts then reuse its
    graphs, and tokens stay the eager engine's."""
    torch._dynamo.reset()
    counters.clear()
    engine = Engine(*ours, max_batch_size=4, compile=True)
    eager = Engine(*ours, max_batch_size=4, compile=False).start()
    try:
        engine.warm_up()
        graphs = counters["stats"]["unique_graphs"]
        runner = engine.runner
        runner.lm_head.__class__ = type("Probed", (torch.nn.Linear,), {})  # its own forward from now on
        assert not runner._by_vocab(2, True)
        for context in (10, 200, 700):  # steps of 1, 2 and 4 rows at these contexts, on the engine's thread
            engine.warm_up(context)
        settled = counters["stats"]["unique_graphs"]
        assert graphs < settled <= graphs + 4  # compiled again, a graph or two per kind
        for context in (1000, 1500, 1900):
            engine.warm_up(context)
        assert counters["stats"]["unique_graphs"] == settled  # one static graph per length would keep adding
        assert runner._decode_forward is not runner._decode_run  # still compiled (no fall back to eager)
        assert dict(counters["graph_break"]) == {}
        params = SamplingParams(max_tokens=5, temperature=0)
        requests = [(ask("word " * (10 + 30 * i)), [photo(40 + 8 * i, 40)]) for i in range(3)]

        def together(on: Engine) -> list[list[int]]:
            handles = [on.submit(on.prepare(m, i, params)) for m, i in requests]
            return [h.result(timeout=300).token_ids for h in handles]

        assert together(engine) == together(eager)
        assert counters["stats"]["unique_graphs"] == settled
    finally:
        engine.runner.lm_head.__class__ = torch.nn.Linear
        engine.shutdown(drain=False)
        eager.shutdown(drain=False)


def test_after_dynamo_is_reset_under_a_running_engine_its_graphs_are_made_dynamic_again(ours):
    """A graph made for a kind that had one (here: dynamo's caches reset under the engine) was compiled without
    dynamic marks; the engine notices the new graph and marks its next calls, so growing contexts settle on
    dynamic graphs instead of compiling one static graph per length."""
    engine = Engine(*ours, max_batch_size=4, compile=True)
    try:
        engine.warm_up()
        torch._dynamo.reset()
        counters.clear()
        made = []
        for context in (200, 700, 1000, 1500, 1900):  # steps of 1, 2 and 4 rows at each
            engine.warm_up(context)
            made.append(counters["stats"]["unique_graphs"])
        assert made[-1] == made[-2] == made[-3] <= 4  # settled; one static graph per length would keep adding
        assert engine.runner._decode_forward is not engine.runner._decode_run
    finally:
        engine.shutdown(drain=False)
