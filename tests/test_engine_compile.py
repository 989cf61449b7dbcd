"""The compiled decode step (torch.compile, inductor's CPU codegen): one graph per batch-size bucket, made at
warm-up, no graph break, no recompile when requests join and leave within the warmed buckets, and the same
greedy tokens as the eager engine."""

from __future__ import annotations

import pytest
import torch
import transformers
from checkpoints import ask, photo
from torch._dynamo.utils import counters

from llava_next_plugin.engine import Engine, SamplingParams


@pytest.fixture(scope="module")
def ours(tiny_checkpoint):
    """Our model (the Auto classes give ours once the plugin is imported) and its processor."""
    model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_checkpoint).eval()
    return model, transformers.AutoProcessor.from_pretrained(tiny_checkpoint)


def test_compiled_decode_step_warms_up_once_per_bucket_and_never_recompiles_on_joins_and_leaves(ours):
    torch._dynamo.reset()
    counters.clear()
    compiled = Engine(*ours, max_batch_size=2, compile=True)
    eager = Engine(*ours, max_batch_size=2, compile=False).start()
    try:
        assert compiled.runner.compiled and not eager.runner.compiled
        assert compiled.warm_up() > 0
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
        assert counters["stats"]["unique_graphs"] == graphs
        assert dict(counters["graph_break"]) == {}
        assert [r.token_ids for r in results] == [
            eager.generate(ask("Short"), [photo(40, 90)], short).token_ids,
            eager.generate(ask("A long answer"), [photo(64, 64)], long).token_ids,
        ]
        assert third.token_ids == eager.generate(ask("Again"), [photo(50, 50)], short).token_ids
    finally:
        compiled.shutdown(drain=False)
        eager.shutdown(drain=False)


def test_compiling_is_off_by_default_on_cpu(ours):
    engine = Engine(*ours, max_batch_size=1)
    assert not engine.runner.compiled
