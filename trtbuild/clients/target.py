"""What a served model looks like to the benchmark, and how one request to it is built.

Kinds, recognised from the model's metadata:
- `ensemble`: NVIDIA's ensemble interface (text_input, max_tokens, stream, min_tokens -> text_output);
  the BLS entry point speaks it too.
- `llmapi`: NVIDIA's LLM-API model (text_input, streaming, sampling_param_max_tokens -> text_output).
- `tensor`: any other model (ONNX, Python...): random inputs of the dtype and shape its metadata gives.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from trtbuild.errors import TrtbuildError
from trtbuild.clients.generate import TRITON_DTYPES, request_inputs
from trtbuild.clients.prompts import Prompt

KINDS = ("auto", "ensemble", "llmapi", "tensor")
# our name -> the llmapi model's input name
LLMAPI_INPUTS = {"max_tokens": "sampling_param_max_tokens", "stream": "streaming", "min_tokens": "sampling_param_min_tokens"}
COUNT_OUTPUTS = {"num_input_tokens": "return_num_input_tokens", "num_output_tokens": "return_num_output_tokens"}
NUMPY_DTYPES = {"BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
                "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
                "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_}
DYNAMIC_DIM = 16  # size given to a variable dimension of a tensor input unless --input-shape says otherwise


@dataclasses.dataclass(frozen=True)
class ModelInterface:
    """What the model's metadata and config say about how to call it."""

    name: str
    kind: str  # ensemble | llmapi | tensor
    inputs: dict[str, tuple[str, tuple[int, ...]]]  # name -> (datatype, dims without the batch dimension)
    outputs: dict[str, tuple[str, tuple[int, ...]]]
    max_batch_size: int
    decoupled: bool
    config: dict[str, Any]
    count_outputs: tuple[str, ...] = ()  # token counts the server can return (NVIDIA's return_num_*_tokens switches)

    @property
    def is_llm(self) -> bool:
        return self.kind != "tensor"

    def input_name(self, ours: str) -> str:
        return LLMAPI_INPUTS.get(ours, ours) if self.kind == "llmapi" else ours

    def has_input(self, ours: str) -> bool:
        return self.input_name(ours) in self.inputs


def detect_kind(inputs: dict[str, Any]) -> str:
    if "text_input" in inputs and "max_tokens" in inputs:
        return "ensemble"
    if "text_input" in inputs and "sampling_param_max_tokens" in inputs:
        return "llmapi"
    return "tensor"


def interface_from(name: str, metadata: dict[str, Any], config: dict[str, Any], requested: str = "auto") -> ModelInterface:
    max_batch = int(config.get("max_batch_size") or 0)

    def tensors(items):
        out = {}
        for t in items:
            shape = tuple(int(d) for d in t.get("shape", []))
            out[t["name"]] = (t["datatype"], shape[1:] if max_batch > 0 else shape)
        return out

    inputs, outputs = tensors(metadata.get("inputs", [])), tensors(metadata.get("outputs", []))
    kind = detect_kind(inputs) if requested == "auto" else requested
    if kind == "ensemble" and not {"text_input", "max_tokens"} <= inputs.keys():
        raise TrtbuildError(f"model '{name}' has no text_input/max_tokens inputs", hint="use --interface llmapi or tensor")
    if kind == "llmapi" and not {"text_input", "sampling_param_max_tokens"} <= inputs.keys():
        raise TrtbuildError(f"model '{name}' has no text_input/sampling_param_max_tokens inputs", hint="use --interface ensemble or tensor")
    decoupled = bool((config.get("model_transaction_policy") or {}).get("decoupled", False))
    counts = tuple(o for o, switch in COUNT_OUTPUTS.items() if o in outputs and switch in inputs) if kind != "tensor" else ()
    return ModelInterface(name, kind, inputs, outputs, max_batch, decoupled, config, counts)


# ---------------------------------------------------------------------------------------------
# Requests, built before the timed loop
# ---------------------------------------------------------------------------------------------
def llm_arrays(iface: ModelInterface, prompt: Prompt, stream: bool, force_output_len: bool) -> dict[str, np.ndarray]:
    """The LLM inputs for one prompt, named and shaped as the model declares them."""
    params: dict[str, Any] = {}
    if force_output_len and iface.has_input("min_tokens"):
        params["min_tokens"] = prompt.output_tokens
    for output in iface.count_outputs:
        params[COUNT_OUTPUTS[output]] = True
    arrays = request_inputs(prompt.text, prompt.output_tokens, stream, **params)
    if not iface.has_input("stream"):
        arrays.pop("stream")
    shaped = {}
    for ours, array in arrays.items():
        name = iface.input_name(ours)
        dims = iface.inputs[name][1]
        shaped[name] = array.reshape((1, 1) if iface.max_batch_size > 0 else (1,) * max(len(dims), 1))
    return shaped


def llm_json(iface: ModelInterface, prompt: Prompt, stream: bool, force_output_len: bool, request_id: str = "") -> bytes:
    """The body of a /generate or /generate_stream request."""
    body: dict[str, Any] = {"text_input": prompt.text, iface.input_name("max_tokens"): prompt.output_tokens}
    if request_id:
        body["id"] = request_id
    if iface.has_input("stream"):
        body[iface.input_name("stream")] = stream
    if force_output_len and iface.has_input("min_tokens"):
        body[iface.input_name("min_tokens")] = prompt.output_tokens
    for output in iface.count_outputs:
        body[COUNT_OUTPUTS[output]] = True
    return json.dumps(body).encode()


def random_tensor_inputs(iface: ModelInterface, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """Random data of each input's dtype and shape; integer inputs named like masks get ones,
    token type ids zeros, other integers values in [0, 100) so that they index any embedding."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, (datatype, dims) in iface.inputs.items():
        if name in shapes:
            shape = shapes[name]
        else:
            shape = tuple(DYNAMIC_DIM if d < 0 else d for d in dims)
            if iface.max_batch_size > 0:
                shape = (1, *shape)
        if any(d < 0 for d in shape):
            raise TrtbuildError(f"--input-shape {name}: dimensions must be >= 0, got {shape}")
        dtype = NUMPY_DTYPES.get(datatype)
        if dtype is None:
            raise TrtbuildError(f"input '{name}' has datatype {datatype}, which the benchmark cannot generate")
        if datatype == "BYTES":
            arrays[name] = np.array([f"x{v}".encode() for v in rng.integers(0, 1000, int(np.prod(shape)))], dtype=np.object_).reshape(shape)
        elif datatype == "BOOL":
            arrays[name] = rng.integers(0, 2, shape).astype(np.bool_)
        elif np.issubdtype(dtype, np.integer):
            if "mask" in name:
                arrays[name] = np.ones(shape, dtype)
            elif "type_ids" in name:
                arrays[name] = np.zeros(shape, dtype)
            else:
                arrays[name] = rng.integers(0, 100, shape).astype(dtype)
        else:
            arrays[name] = rng.standard_normal(shape).astype(dtype)
    unknown = set(shapes) - set(iface.inputs)
    if unknown:
        raise TrtbuildError(f"--input-shape names unknown input(s) {sorted(unknown)}", hint=f"inputs: {', '.join(iface.inputs)}")
    return arrays


def triton_dtype(array: np.ndarray) -> str:
    if array.dtype == np.object_:
        return "BYTES"
    for name, dtype in NUMPY_DTYPES.items():
        if array.dtype == dtype:
            return name
    return TRITON_DTYPES[array.dtype.type]
