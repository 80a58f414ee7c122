"""Text generation against a Triton LLM repository (ensemble, BLS or llmapi interface).

gRPC goes through the bidirectional stream (decoupled models refuse unary ModelInfer); HTTP goes
through Triton's `/generate` and `/generate_stream` (server-sent events) endpoints, since KServe
`/infer` refuses decoupled models too.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import time
import uuid
from typing import Any, Iterator

import numpy as np
import requests

# ensemble input -> numpy dtype (Triton type) for the optional sampling inputs
INPUT_DTYPES: dict[str, Any] = {
    "max_tokens": np.int32,
    "end_id": np.int32,
    "pad_id": np.int32,
    "top_k": np.int32,
    "top_p": np.float32,
    "temperature": np.float32,
    "length_penalty": np.float32,
    "repetition_penalty": np.float32,
    "min_tokens": np.int32,
    "presence_penalty": np.float32,
    "frequency_penalty": np.float32,
    "seed": np.uint64,
    "return_log_probs": np.bool_,
    "return_context_logits": np.bool_,
    "return_generation_logits": np.bool_,
    "beam_width": np.int32,
    "stream": np.bool_,
    "exclude_input_in_output": np.bool_,
    "num_return_sequences": np.int32,
    "return_num_input_tokens": np.bool_,
    "return_num_output_tokens": np.bool_,
}
TRITON_DTYPES = {np.int32: "INT32", np.float32: "FP32", np.uint64: "UINT64", np.bool_: "BOOL"}


class GenerationError(RuntimeError):
    """The server answered with an error."""


class ServerUnavailable(GenerationError):
    """Nothing answers at the URL."""


@dataclasses.dataclass
class GenerationResult:
    text: str
    chunks: list[str]
    send_time: float
    chunk_times: list[float]
    output_log_probs: list[float] = dataclasses.field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.send_time if self.chunk_times else float("nan")

    @property
    def latency(self) -> float:
        return self.chunk_times[-1] - self.send_time if self.chunk_times else float("nan")


def request_inputs(prompt: str, max_tokens: int, stream: bool, **params: Any) -> dict[str, np.ndarray]:
    """The ensemble inputs as numpy arrays with a batch dimension of 1."""
    inputs: dict[str, np.ndarray] = {"text_input": np.array([[prompt.encode("utf-8")]], dtype=np.object_)}
    for name, value in {"max_tokens": max_tokens, "stream": stream, **params}.items():
        if value is None:
            continue
        if name in ("stop_words", "bad_words"):
            words = [value] if isinstance(value, str) else list(value)
            inputs[name] = np.array([[w.encode() for w in words]], dtype=np.object_)
        elif name in INPUT_DTYPES:
            inputs[name] = np.array([[value]], dtype=INPUT_DTYPES[name])
        else:
            raise ValueError(f"unknown generation parameter '{name}'")
    return inputs


def _text(value: Any) -> str:
    value = np.asarray(value).reshape(-1)[0] if not isinstance(value, (str, bytes)) else value
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class GrpcGenerator:
    """gRPC streaming client; the empty final response marks the end of every request."""

    def __init__(self, url: str, model: str = "ensemble"):
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.model = model

    def stream(self, prompt: str, max_tokens: int, stream: bool = True, **params: Any) -> Iterator[tuple[float, str, dict]]:
        """Yield (arrival time, text chunk, other outputs) for each response."""
        results: queue.Queue = queue.Queue()
        inputs = []
        for name, array in request_inputs(prompt, max_tokens, stream, **params).items():
            dtype = "BYTES" if array.dtype == np.object_ else TRITON_DTYPES[array.dtype.type]
            t = self._grpc.InferInput(name, list(array.shape), dtype)
            t.set_data_from_numpy(array)
            inputs.append(t)
        self.client.start_stream(callback=lambda result, error: results.put((time.perf_counter(), result, error)))
        try:
            try:
                self.client.async_stream_infer(
                    self.model, inputs, request_id=uuid.uuid4().hex, enable_empty_final_response=True
                )
            except self._grpc.InferenceServerException as e:  # the stream died before the request went out
                results.put((time.perf_counter(), None, e))
            while True:
                arrived, result, error = results.get(timeout=600)
                if error is not None:
                    raise _grpc_error(error)
                response = result.get_response()
                final = response.parameters.get("triton_final_response")
                if response.outputs:
                    outputs = {o.name: result.as_numpy(o.name) for o in response.outputs}
                    text = outputs.pop("text_output", None)
                    yield arrived, ("" if text is None else _text(text)), outputs
                if final is not None and final.bool_param:
                    return
        finally:
            self.client.stop_stream()

    def close(self) -> None:
        self.client.close()


def _grpc_error(error: Exception) -> GenerationError:
    status = getattr(error, "status", lambda: None)()
    unavailable = status == "StatusCode.UNAVAILABLE" or "no longer in valid state" in str(error)
    return (ServerUnavailable if unavailable else GenerationError)(str(error))


class HttpGenerator:
    """HTTP client for Triton's generate extension."""

    def __init__(self, url: str, model: str = "ensemble"):
        self.base = url if url.startswith("http") else f"http://{url}"
        self.model = model
        self.session = requests.Session()

    def stream(self, prompt: str, max_tokens: int, stream: bool = True, **params: Any) -> Iterator[tuple[float, str, dict]]:
        body: dict[str, Any] = {"text_input": prompt, "stream": stream}
        body.update({k: v for k, v in {"max_tokens": max_tokens, **params}.items() if v is not None})
        endpoint = "generate_stream" if stream else "generate"
        try:
            r = self.session.post(f"{self.base}/v2/models/{self.model}/{endpoint}", json=body, stream=stream, timeout=600)
        except requests.ConnectionError as e:
            raise ServerUnavailable(str(e)) from None
        with r:
            if not stream:
                data = r.json()
                arrived = time.perf_counter()
                if r.status_code != 200 or "error" in data:
                    raise GenerationError(data.get("error", r.text))
                yield arrived, str(data.get("text_output", "")), data
                return
            if r.status_code != 200:
                raise GenerationError(r.text)
            for line in r.iter_lines():
                if not line.startswith(b"data:"):
                    continue
                arrived = time.perf_counter()
                data = json.loads(line[5:])
                if "error" in data:
                    raise GenerationError(data["error"])
                yield arrived, str(data.get("text_output", "")), data

    def close(self) -> None:
        self.session.close()


def make_generator(url: str, protocol: str = "grpc", model: str = "ensemble") -> GrpcGenerator | HttpGenerator:
    if protocol == "grpc":
        return GrpcGenerator(url, model)
    if protocol == "http":
        return HttpGenerator(url, model)
    raise ValueError(f"protocol must be grpc or http, got {protocol!r}")


def generate(url: str, prompt: str, max_tokens: int = 64, *, protocol: str = "grpc", model: str = "ensemble",
             stream: bool = False, **params: Any) -> GenerationResult:
    """One request; returns the whole text with per-chunk arrival times."""
    client = make_generator(url, protocol, model)
    try:
        sent = time.perf_counter()
        chunks, times, logprobs = [], [], []
        for arrived, text, outputs in client.stream(prompt, max_tokens, stream, **params):
            chunks.append(text)
            times.append(arrived)
            if "output_log_probs" in outputs:
                logprobs.extend(np.asarray(outputs["output_log_probs"], dtype=np.float64).reshape(-1).tolist())
        return GenerationResult("".join(chunks), chunks, sent, times, logprobs)
    finally:
        client.close()
