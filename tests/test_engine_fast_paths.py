"""The engine's CPU fast paths give what the plain paths give: the LM head computed vocabulary-major (the same
greedy tokens as ``model.generate``, the weight used as it is at each step) and the detokenizer's table of token pieces
(the same text deltas as decoding, for sentencepiece, byte-level and metaspace tokenizers)."""

from __future__ import annotations

import random

import pytest
import torch
from checkpoints import ask, build_tokenizer, photo, reference_greedy
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llava_next_plugin.engine import Engine, SamplingParams
from llava_next_plugin.engine.detokenizer import PieceTable, TextStream
from llava_next_plugin.engine.head import by_vocab, first_max_by_vocab, logits_by_vocab
from llava_next_plugin.engine.sampler import first_max

GREEDY = SamplingParams(max_tokens=6, temperature=0)
REQUESTS = [("What is this?", photo(80, 50)), ("And this one?", photo(40, 64)), ("Colours?", photo(64, 64))]


def batched(engine: Engine) -> list[list[int]]:
    """The token ids of :data:`REQUESTS` submitted together (decode steps of several rows)."""
    handles = [engine.submit(engine.prepare(ask(text), [image], GREEDY)) for text, image in REQUESTS]
    return [h.result(timeout=120).token_ids for h in handles]


def expected(engine: Engine, model) -> list[list[int]]:
    return [reference_greedy(model, engine.prepare(ask(text), [image], GREEDY), 6) for text, image in REQUESTS]


def test_batched_steps_compute_the_head_by_vocab_and_give_model_generate_tokens(reference):
    model, processor = reference
    engine = Engine(model, processor, max_batch_size=4).start()
    try:
        assert engine.runner._by_vocab(3, True)  # steps of several rows compute the head vocabulary-major
        assert batched(engine) == expected(engine, model)
    finally:
        engine.shutdown(drain=False)


def test_the_head_by_vocab_is_the_transpose_of_the_linear_and_its_maxima_are_the_first_ones():
    head = torch.nn.Linear(64, 300)
    with torch.inference_mode():
        for rows in (2, 3, 16):
            hidden = torch.randn(rows, 64)
            torch.testing.assert_close(logits_by_vocab(head, hidden).t(), head(hidden))
            head.bias = None
            torch.testing.assert_close(logits_by_vocab(head, hidden), head.weight @ hidden.T)
            head.bias = torch.nn.Parameter(torch.randn(300))
        scores = torch.zeros(300, 4)
        scores[[5, 200]] = 1.0  # a tie in every column: the first index wins, as argmax
        scores[[3, 9], 2] = 2.0
        scores[[250, 100], 3] = float("nan")  # a NaN is the maximum, as in first_max
        top, index = first_max_by_vocab(scores)
        want_top, want_index = first_max(scores.t().contiguous())
        assert index.tolist() == want_index.tolist() == [5, 5, 3, 100]
        assert top[:3].tolist() == want_top[:3].tolist() == [1.0, 1.0, 2.0] and top[3].isnan() and want_top[3].isnan()


def test_an_lm_head_weight_changed_in_place_through_data_or_replaced_is_used_as_it_is(tiny_checkpoint):
    """No copy of the head is kept: every change of its weight, even through ``.data`` (which torch does not
    count), is in the next step."""
    import transformers

    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    processor = transformers.AutoProcessor.from_pretrained(tiny_checkpoint)
    engine = Engine(model, processor, max_batch_size=4).start()
    head = model.get_output_embeddings()
    try:
        before = batched(engine)
        assert before == expected(engine, model)
        saved = head.weight.detach().clone()
        with torch.no_grad():  # in place: every logit 0, so the first token (id 0) wins every step
            head.weight.zero_()
        assert batched(engine) == [[0] * 6] * 3 == expected(engine, model)
        head.weight = torch.nn.Parameter(saved)  # another tensor: the first weights again
        assert batched(engine) == before
        head.weight.data.mul_(0)  # through .data: torch's version counter does not move
        assert head.weight._version == 0
        assert batched(engine) == [[0] * 6] * 3
    finally:
        engine.shutdown(drain=False)


def test_only_a_float32_linear_head_on_the_cpu_with_several_rows_is_computed_by_vocab():
    assert by_vocab(torch.nn.Linear(64, 300, bias=False), 2)
    assert not by_vocab(torch.nn.Linear(64, 300, bias=False), 1)  # one row: F.linear, the same product
    assert not by_vocab(torch.nn.Linear(64, 300, bias=False).bfloat16(), 4)
    assert not by_vocab(torch.nn.Embedding(300, 64), 4)

    class Wrapped(torch.nn.Linear):  # e.g. a quantizer's or an adapter's: its own forward runs
        pass

    assert not by_vocab(Wrapped(64, 300), 4)


# --- the detokenizer's pieces
CORPUS = ["Café 東京 — 🐈‍⬛ naïve, façade ; 😀 ! The cat sat on the mat.", "Hello world, über straße ✓ 日本語です"] * 40


def trained(pre_tokenizer, decoder, model=None) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(model or models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoder
    alphabet = pre_tokenizers.ByteLevel.alphabet() if isinstance(pre_tokenizer, pre_tokenizers.ByteLevel) else []
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|end|>", "<image>"], initial_alphabet=alphabet)
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|end|>", additional_special_tokens=["<image>"]
    )


TOKENIZERS = {
    "sentencepiece (mistral)": lambda tmp: build_tokenizer(tmp),
    "byte-level BPE": lambda tmp: trained(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()),
    "metaspace BPE": lambda tmp: trained(pre_tokenizers.Metaspace(), decoders.Metaspace()),
}


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_streams_using_token_pieces_give_the_deltas_of_streams_that_decode(kind, tmp_path):
    tokenizer = TOKENIZERS[kind](tmp_path)
    pieces, decoding = PieceTable(tokenizer), PieceTable(tokenizer)
    decoding.enabled = False  # every token decoded with its neighbours, as before the table
    assert pieces.enabled
    vocab = len(tokenizer)
    text_ids = tokenizer.encode(CORPUS[0] + " " + CORPUS[1], add_special_tokens=False)
    special = sorted(tokenizer.added_tokens_decoder)
    rng = random.Random(0)
    for _ in range(800):
        ids = [
            rng.choice([rng.randrange(vocab), rng.choice(text_ids), rng.choice(special), rng.randrange(3, 300)])
            for _ in range(rng.randrange(1, 30))
        ]
        fast, slow = TextStream(tokenizer, ["sat o"], pieces), TextStream(tokenizer, ["sat o"], decoding)
        assert [fast.add(i) for i in ids] + [fast.flush()] == [slow.add(i) for i in ids] + [slow.flush()], ids
    assert sum(pieces.get(i) is not None for i in range(vocab)) > vocab // 3  # most tokens skip the decode
    stream = TextStream(tokenizer, (), pieces)
    assert "".join([stream.add(i) for i in text_ids] + [stream.flush()]) == tokenizer.decode(text_ids)


@pytest.mark.parametrize(
    "decoder",
    [
        # a word-end suffix turned into a space except on the last token: a token's text depends on what follows
        decoders.BPEDecoder(suffix="</w>"),
        # a replacement after Fuse acts on text across tokens ("ab" of two tokens)
        decoders.Sequence([decoders.Fuse(), decoders.Replace("ab", "X")]),
    ],
    ids=["BPEDecoder", "Replace after Fuse"],
)
def test_a_decoder_whose_pieces_depend_on_their_neighbours_gets_no_table(decoder):
    tokenizer = trained(pre_tokenizers.Whitespace(), decoder, models.BPE(end_of_word_suffix="</w>"))
    table = PieceTable(tokenizer)
    assert not table.enabled
    ids = tokenizer.encode("The cat sat on the mat, abab.", add_special_tokens=False)
    assert not any(table.get(i) for i in ids)  # every token decodes, with its neighbours
    if isinstance(decoder, decoders.BPEDecoder):  # whose final text the stream's flush gets whole
        stream = TextStream(tokenizer, (), table)
        assert "".join([stream.add(i) for i in ids] + [stream.flush()]) == tokenizer.decode(ids)
