"""The detokenizer's table of token pieces gives the same text deltas as decoding, for sentencepiece, byte-level and
metaspace tokenizers."""

from __future__ import annotations

import random

import pytest
from checkpoints import build_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llava_next_plugin.engine.detokenizer import PieceTable, TextStream

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


def test_a_decoder_that_treats_the_last_token_apart_always_decodes():
    """``BPEDecoder`` turns a word-end suffix into a space except on the last token: a token's text depends on
    whether another follows, so no table is used and streams decode."""
    tokenizer = trained(
        pre_tokenizers.Whitespace(), decoders.BPEDecoder(suffix="</w>"), models.BPE(end_of_word_suffix="</w>")
    )
    table = PieceTable(tokenizer)
    assert not table.enabled
    ids = tokenizer.encode("The cat sat on the mat.", add_special_tokens=False)
    stream = TextStream(tokenizer, (), table)
    assert "".join([stream.add(i) for i in ids] + [stream.flush()]) == tokenizer.decode(ids)
