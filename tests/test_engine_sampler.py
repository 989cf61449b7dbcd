"""The engine's on-device sampler: greedy rows are argmax, one bad row is flagged alone, and a seeded row draws
the same token whatever shares its batch."""

import pytest
import torch

from llava_next_plugin.engine.request import SamplingParams
from llava_next_plugin.engine.sampler import greedy, row_params, sample


def _logits(rows: int = 4, vocab: int = 50) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))


def test_greedy_is_argmax_and_flags_only_the_rows_without_a_finite_maximum():
    logits = _logits()
    logits[1, 7] = float("nan")  # a NaN anywhere spoils the row
    logits[2] = float("-inf")  # nothing to choose from
    logits[3, :10] = float("-inf")  # masked tokens (as a logits processor would) are fine
    tokens, ok = greedy(logits)
    assert ok.tolist() == [True, False, False, True]
    assert tokens[0] == logits[0].argmax() and tokens[3] == logits[3].argmax()


@pytest.mark.parametrize("vocab", [32064, 32000, 128256, 152064, 32003, 50])
def test_greedy_finds_the_first_maximum_for_vocabularies_that_split_into_blocks_and_for_those_that_do_not(vocab):
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(vocab))
    top = float(logits.max()) + 1
    logits[1, [vocab - 1, 3, vocab // 2]] = top  # ties in different blocks: the first wins
    logits[2, [5, 6]] = top  # ties inside one block
    logits[3, -1] = top  # the very last token
    logits[4, vocab // 3] = float("nan")
    logits[5] = float("-inf")
    tokens, ok = greedy(logits)
    assert tokens[:4].tolist() == logits[:4].argmax(dim=-1).tolist() == [tokens[0].item(), 3, 5, vocab - 1]
    assert ok.tolist() == [True, True, True, True, False, False]
    assert tokens[5] == 0  # a row of -inf: its first token (it is flagged anyway)


def test_sample_gives_greedy_rows_their_argmax_and_flags_a_row_with_an_infinite_maximum():
    logits = _logits()
    logits[2, 3] = float("inf")
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=1)] * 2
    tensors = row_params(params, [0] * 4, [1] * 4, "cpu")
    tokens, ok = sample(logits, *tensors, top_p_rows=[])
    assert ok.tolist() == [True, True, False, True]
    assert tokens[0] == logits[0].argmax()


def test_a_seeded_row_draws_the_same_token_alone_and_in_any_batch():
    logits = _logits(rows=6)
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=s) for s in range(6)]
    tensors = row_params(params, [5] * 6, [p.seed for p in params], "cpu")
    batched, _ = sample(logits, *tensors)
    for row in range(6):
        alone = row_params([params[row]], [5], [params[row].seed], "cpu")
        token, _ = sample(logits[row : row + 1], *alone, top_p_rows=[0])
        assert token.item() == batched[row].item()
