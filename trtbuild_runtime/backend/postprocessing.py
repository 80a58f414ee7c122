"""Detokenize output_ids into text_output.

OUTPUT is one string per (batch, beam), flattened: shape [batch * beams], as NVIDIA's
postprocessing returns it, so the ensemble's text_output reaches a client as a 1-D array whose
element 0 is bytes (NVIDIA's clients read `output[0].decode()`).
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from trtbuild_runtime.backend.tokenizer import load_tokenizer
from trtbuild_runtime.backend.tensors import optional, parameters, tensor


class TritonPythonModel:
    def initialize(self, args):
        _, params = parameters(args)
        self.tokenizer = load_tokenizer(params["tokenizer_dir"])
        self.skip_special_tokens = params.get("skip_special_tokens", "true").lower() == "true"

    def execute(self, requests):
        responses = []
        for request in requests:
            tokens = optional(request, "TOKENS_BATCH")  # [batch, beams, tokens]
            lengths = optional(request, "SEQUENCE_LENGTH")  # [batch, beams]
            texts = [self._decode(tokens[b, k, : lengths[b, k]]) for b in range(tokens.shape[0]) for k in range(tokens.shape[1])]
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor("OUTPUT", np.array(texts, dtype=np.object_))]))
        return responses

    def _decode(self, ids):
        text = self.tokenizer.decode(ids.tolist(), skip_special_tokens=self.skip_special_tokens)
        return text.encode("utf-8")
