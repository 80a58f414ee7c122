"""Turn an encoder's outputs into what clients want.

feature-extraction: pool last_hidden_state over the attention mask (mean, cls or max, as the
sentence-transformers config says) and L2-normalise when it has a Normalize module.
text-classification: softmax over the logits; the label of the argmax and its probability.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from trtbuild_runtime.backend.tensors import optional, parameters, tensor


class TritonPythonModel:
    def initialize(self, args):
        _, params = parameters(args)
        self.task = params["task"]
        self.pooling = params.get("pooling", "mean")
        self.normalize = params.get("normalize", "false") == "true"
        self.id2label = {int(k): v for k, v in json.loads(params.get("id2label", "{}")).items()}

    def execute(self, requests):
        return [self._embed(r) if self.task == "feature-extraction" else self._classify(r) for r in requests]

    def _embed(self, request):
        hidden = optional(request, "last_hidden_state").astype(np.float32)
        mask = optional(request, "attention_mask").astype(np.float32)[:, :, None]
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "max":
            pooled = np.where(mask > 0, hidden, -np.inf).max(axis=1)
        else:
            pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        if self.normalize:
            pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pb_utils.InferenceResponse(output_tensors=[tensor("embedding", pooled.astype(np.float32))])

    def _classify(self, request):
        logits = optional(request, "logits").astype(np.float64)
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        best = probs.argmax(axis=-1)
        labels = np.array([[self.id2label.get(int(i), f"LABEL_{int(i)}").encode("utf-8")] for i in best], dtype=np.object_)
        scores = probs[np.arange(len(best)), best].astype(np.float32).reshape(-1, 1)
        return pb_utils.InferenceResponse(output_tensors=[tensor("label", labels), tensor("score", scores)])
