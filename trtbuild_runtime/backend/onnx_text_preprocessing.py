"""Tokenize text_input for an ONNX encoder.

Each request is padded to its longest text rounded up to `pad_to_multiple_of` tokens: Triton batches
only requests whose tensors have the same shape, so coarser lengths let more requests share a batch
at the price of some padding.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from trtbuild_runtime.backend.tensors import error_response, optional, parameters, strings, tensor


class TritonPythonModel:
    def initialize(self, args):
        from tokenizers import Tokenizer

        _, params = parameters(args)
        path = Path(params["tokenizer_dir"])
        if not path.is_absolute():
            path = Path(args["model_repository"]) / path
        self.max_len = int(params["max_seq_len"])
        self.multiple = int(params["pad_to_multiple_of"])
        self.outputs = json.loads(params["outputs"])
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_len)
        config = path / "tokenizer_config.json"
        pad = json.loads(config.read_text()).get("pad_token") if config.is_file() else None
        pad = pad.get("content") if isinstance(pad, dict) else pad
        self.pad_id = (self.tokenizer.token_to_id(pad) if pad else None) or 0

    def execute(self, requests):
        return [self._one(r) for r in requests]

    def _one(self, request):
        texts = strings(optional(request, "text_input"))
        if any(not t for t in texts):
            return error_response("text_input is empty")
        encodings = self.tokenizer.encode_batch(texts)
        width = max(len(e.ids) for e in encodings)
        width = min(-(-width // self.multiple) * self.multiple, self.max_len)
        arrays = {
            "input_ids": np.full((len(texts), width), self.pad_id, np.int64),
            "attention_mask": np.zeros((len(texts), width), np.int64),
            "token_type_ids": np.zeros((len(texts), width), np.int64),
        }
        for row, e in enumerate(encodings):
            n = len(e.ids)
            arrays["input_ids"][row, :n] = e.ids
            arrays["attention_mask"][row, :n] = 1
            arrays["token_type_ids"][row, :n] = e.type_ids
        return pb_utils.InferenceResponse(output_tensors=[tensor(name, arrays[name]) for name in self.outputs])
