"""A tokenizer for the text models that needs only the `tokenizers` library.

Importing transformers pulls in its generation stack and, through it, scipy and scikit-learn; in an
environment pinned to numpy<2 (see BuildSpec.text_env) those imports fail. tokenizer.json holds the
whole pipeline, and tokenizer_config.json names the special tokens, so nothing else is needed.
"""

import json
from pathlib import Path


class Tokenizer:
    def __init__(self, path):
        from tokenizers import Tokenizer as _Tokenizer

        path = Path(path)
        self._tok = _Tokenizer.from_file(str(path / "tokenizer.json"))
        self._tok.no_padding()  # padding and truncation are the caller's business, as in transformers
        self._tok.no_truncation()
        config_path = path / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.eos_token_id = self._id(config.get("eos_token"))
        self.bos_token_id = self._id(config.get("bos_token"))
        self.pad_token_id = self._id(config.get("pad_token"))
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_id
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
            token = _content(config.get(key))
            if token:
                special.add(token)
        self.special_ids = {i for i in (self._tok.token_to_id(t) for t in special) if i is not None}

    def _id(self, token):
        token = _content(token)
        return None if token is None else self._tok.token_to_id(token)

    def __len__(self):
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text, add_special_tokens=True):
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens=True):
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self._tok.decode(list(ids), skip_special_tokens=False)


class IncrementalDecoder:
    """Text deltas of a growing token sequence whose concatenation is the text of the whole sequence.

    Each step decodes only a window: the tokens since the last point where the text was complete,
    plus the ones before it that set its context (a leading space that a decoder strips at the
    start of a text, a character whose bytes span tokens). That makes streaming linear in the
    output instead of quadratic, and exact: a delta is emitted only when the window's text no
    longer ends in a partial character (U+FFFD); `finish` flushes whatever is left.
    """

    def __init__(self, tokenizer, skip_special_tokens=True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens = []
        self.prefix = 0  # window start
        self.read = 0  # tokens whose text has been emitted

    def _text(self, start, end=None):
        return self.tokenizer.decode(self.tokens[start:end], skip_special_tokens=self.skip_special_tokens)

    def push(self, ids) -> str:
        self.tokens.extend(int(i) for i in ids)
        emitted = self._text(self.prefix, self.read)
        text = self._text(self.prefix)
        if len(text) <= len(emitted) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.tokens)
        return text[len(emitted):]

    def finish(self) -> str:
        emitted = self._text(self.prefix, self.read)
        text = self._text(self.prefix)
        self.prefix = self.read = len(self.tokens)
        return text[len(emitted):]


def _content(token):
    return token.get("content") if isinstance(token, dict) else token


def load_tokenizer(path):
    """tokenizer.json where there is one; otherwise transformers (e.g. a sentencepiece-only tokenizer)."""
    if (Path(path) / "tokenizer.json").is_file():
        return Tokenizer(path)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
