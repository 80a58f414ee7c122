"""Helpers shared by trtbuild's Python-backend models (copied next to each model.py)."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

# Triton 2.51's Python backend reads numpy>=2 output buffers wrongly: go through DLPack there.
_NUMPY2 = int(np.__version__.split(".")[0]) >= 2


# preprocessing's REQUEST_OUTPUT_LEN when the client sent no max_tokens: the LLM step refuses it.
# (Triton 2.51 drops an error of an ensemble's first step when the ensemble is decoupled: the
# client would get an empty stream, so the step whose errors do arrive reports it.)
MISSING_OUTPUT_LEN = -1


def parameters(args):
    config = json.loads(args["model_config"])
    return config, {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def tensor(name, array):
    array = np.ascontiguousarray(array)
    if _NUMPY2 and array.dtype != np.object_:
        import torch.utils.dlpack

        return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(torch.from_numpy(array)))
    return pb_utils.Tensor(name, array)


def optional(request, name, default=None):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return default if t is None else t.as_numpy()


def scalar(request, name, default=None):
    value = optional(request, name)
    return default if value is None or value.size == 0 else value.reshape(-1)[0].item()


def strings(array):
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in np.asarray(array).reshape(-1)]


def error_response(message, code=None):
    try:
        err = pb_utils.TritonError(message, code if code is not None else pb_utils.TritonError.INVALID_ARG)
    except (AttributeError, TypeError):
        err = pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


def words_list(words):
    """Decode NVIDIA's [1, 2, N] words layout (ids, end offsets) into token sequences."""
    if words is None or words.size == 0:
        return []
    words = words.reshape(-1, 2, words.shape[-1])[0]
    ids, offsets = words[0].tolist(), [o for o in words[1].tolist() if o >= 0]
    out, start = [], 0
    for end in offsets:
        if end > start:
            out.append(ids[start:end])
        start = end
    return out


def stop_index(tokens, stop_words, start=0):
    """Where the first stop sequence beginning at or after `start` begins, or None."""
    for i in range(max(0, start), len(tokens)):
        for word in stop_words:
            if tokens[i : i + len(word)] == word:
                return i
    return None
