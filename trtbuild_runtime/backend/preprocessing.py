"""Tokenize text_input, stop_words and bad_words for the LLM step (NVIDIA's tensor layout)."""

import numpy as np
import triton_python_backend_utils as pb_utils

from trtbuild_runtime.backend.tokenizer import load_tokenizer
from trtbuild_runtime.backend.tensors import MISSING_OUTPUT_LEN, error_response, optional, parameters, strings, tensor


class TritonPythonModel:
    def initialize(self, args):
        _, params = parameters(args)
        self.tokenizer = load_tokenizer(params["tokenizer_dir"])
        self.add_special_tokens = params.get("add_special_tokens", "true").lower() == "true"
        self.max_input_len = int(params["max_input_len"])
        self.pad_id = self.tokenizer.pad_token_id
        self.end_id = self.tokenizer.eos_token_id

    def execute(self, requests):
        return [self._one(r) for r in requests]

    def _one(self, request):
        queries = [q for q in strings(optional(request, "QUERY"))]
        batch = len(queries)
        ids = [self.tokenizer.encode(q, add_special_tokens=self.add_special_tokens) for q in queries]
        too_long = [len(x) for x in ids if len(x) > self.max_input_len]
        if too_long:
            return error_response(
                f"prompt has {too_long[0]} tokens, more than max_input_len={self.max_input_len} this build allows"
            )
        if any(len(x) == 0 for x in ids):
            return error_response("text_input is empty")
        pad_id = _column(optional(request, "PAD_ID"), batch, self.pad_id)
        end_id = _column(optional(request, "END_ID"), batch, self.end_id)
        width = max(len(x) for x in ids)
        input_ids = np.stack([np.pad(np.array(x, np.int32), (0, width - len(x)), constant_values=p) for x, p in zip(ids, pad_id[:, 0])])
        lengths = np.array([[len(x)] for x in ids], np.int32)
        output_len = optional(request, "REQUEST_OUTPUT_LEN", np.full((batch, 1), MISSING_OUTPUT_LEN))
        output_len = np.asarray(output_len, np.int32).reshape(batch, 1)
        return pb_utils.InferenceResponse(
            output_tensors=[
                tensor("INPUT_ID", input_ids),
                tensor("REQUEST_INPUT_LEN", lengths),
                tensor("BAD_WORDS_IDS", self._words(optional(request, "BAD_WORDS_DICT"), batch)),
                tensor("STOP_WORDS_IDS", self._words(optional(request, "STOP_WORDS_DICT"), batch)),
                tensor("REQUEST_OUTPUT_LEN", output_len),
                tensor("OUT_END_ID", end_id),
                tensor("OUT_PAD_ID", pad_id),
            ]
        )

    def _words(self, words, batch):
        """[batch, 2, N]: row 0 the concatenated token ids, row 1 each word's end offset (-1 padded).

        A word inside text usually follows a space, which BPE tokenizers fold into the word's first
        token, so each word is matched both as written and with a leading space.
        """
        rows = []
        for b in range(batch):
            item = [] if words is None else [w for w in strings(words.reshape(batch, -1)[b]) if w]
            flat, offsets = [], []
            for word in item:
                for variant in _variants(word):
                    flat += self.tokenizer.encode(variant, add_special_tokens=False)
                    offsets.append(len(flat))
            rows.append((flat, offsets))
        width = max(1, max(len(f) for f, _ in rows))
        out = np.zeros((batch, 2, width), np.int32)
        out[:, 1, :] = -1
        for b, (flat, offsets) in enumerate(rows):
            out[b, 0, : len(flat)] = flat
            out[b, 1, : len(offsets)] = offsets
        return out


def _variants(word):
    return (word,) if word[:1].isspace() else (word, " " + word)


def _column(value, batch, default):
    if value is None:
        return np.full((batch, 1), default, np.int32)
    return np.asarray(value, np.int32).reshape(batch, 1)
