"""The contract of Triton's OpenAI-compatible frontend (server repository, python/openai), checked with
a client that sends exactly what its TensorRT-LLM request format sends: text_input, stream,
max_tokens, return_num_input_tokens and return_num_output_tokens always, every tensor [1, 1]
(stop_words [1, N]), the sampling inputs only when set. It reads text_output (one string a
response, deltas when streaming), usage from num_input_tokens (first response) and the sum of
num_output_tokens, and wants one response (or one and an empty final) when not streaming."""

from __future__ import annotations

import queue

import numpy as np
import pytest

pytestmark = pytest.mark.server
ENTRY_POINTS = ["llm", "ensemble", "llm_bls"]


def frontend_request(prompt: str, stream: bool, max_tokens: int = 12, **sampling) -> dict[str, tuple[np.ndarray, str]]:
    inputs = {
        "text_input": (np.array([[prompt.encode()]], dtype=np.object_), "BYTES"),
        "stream": (np.array([[stream]], dtype=np.bool_), "BOOL"),
        "max_tokens": (np.array([[max_tokens]], dtype=np.int32), "INT32"),
        "return_num_input_tokens": (np.array([[True]], dtype=np.bool_), "BOOL"),
        "return_num_output_tokens": (np.array([[True]], dtype=np.bool_), "BOOL"),
    }
    for name in ("temperature", "top_p", "frequency_penalty", "presence_penalty"):
        if sampling.get(name) is not None:
            inputs[name] = (np.array([[sampling[name]]], dtype=np.float32), "FP32")
    if sampling.get("seed") is not None:
        inputs["seed"] = (np.array([[sampling["seed"]]], dtype=np.uint64), "UINT64")
    if sampling.get("stop"):
        inputs["stop_words"] = (np.array([[w.encode() for w in sampling["stop"]]], dtype=np.object_), "BYTES")
    if sampling.get("perf"):
        inputs["return_perf_metrics"] = (np.array([[True]], dtype=np.bool_), "BOOL")
    return inputs


def send(url: str, model: str, inputs) -> list[tuple[dict[str, np.ndarray], bool]]:
    """Every response as (outputs, final), the way the frontend's async_infer iterates them."""
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    tensors = []
    for name, (array, dtype) in inputs.items():
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    responses = []
    try:
        client.async_stream_infer(model, tensors, enable_empty_final_response=True)
        while True:
            result, error = results.get(timeout=120)
            if error is not None:
                raise error
            response = result.get_response()
            final = response.parameters["triton_final_response"].bool_param
            responses.append(({o.name: result.as_numpy(o.name) for o in response.outputs}, final))
            if final:
                return responses
    finally:
        client.stop_stream()
        client.close()


def text_of(outputs) -> str:
    text = outputs["text_output"]
    assert text.size == 1  # the frontend refuses any other volume
    return text.reshape(-1)[0].decode()


def count(outputs, name) -> int:
    assert outputs[name].dtype == np.int32  # INT32 or UINT32, element 0, or usage is None
    return int(outputs[name].reshape(-1)[0])


@pytest.mark.parametrize("model", ENTRY_POINTS)
def test_completion_and_usage_as_the_frontend_reads_them(tiny_server, tiny_spec, model):
    from transformers import AutoTokenizer

    prompt = "The capital of France is"
    whole = send(tiny_server.grpc_url, model, frontend_request(prompt, stream=False))
    assert 1 <= len(whole) <= 2 and whole[-1][1]  # one response, or one and an empty final
    first = whole[0][0]
    text, prompt_tokens, completion_tokens = text_of(first), count(first, "num_input_tokens"), count(first, "num_output_tokens")
    assert prompt_tokens == len(AutoTokenizer.from_pretrained(tiny_spec.checkpoint)(prompt)["input_ids"])
    assert 1 <= completion_tokens <= 12 and text

    streamed = send(tiny_server.grpc_url, model, frontend_request(prompt, stream=True))
    with_text = [outputs for outputs, _ in streamed if "text_output" in outputs]
    assert len(with_text) >= 2
    assert "".join(text_of(o) for o in with_text) == text  # deltas
    assert count(with_text[0], "num_input_tokens") == prompt_tokens
    assert sum(count(o, "num_output_tokens") for o in with_text) == completion_tokens  # streaming usage = usage


def test_sampling_inputs_the_frontend_sends(tiny_server):
    inputs = frontend_request("Once upon a time", stream=False, temperature=0.8, top_p=0.9, seed=7,
                              frequency_penalty=0.0, presence_penalty=0.0, stop=["\n\n"])
    (outputs, final), = send(tiny_server.grpc_url, "llm", inputs)
    assert final and count(outputs, "num_output_tokens") >= 1
    again, = send(tiny_server.grpc_url, "llm", inputs)
    assert text_of(again[0]) == text_of(outputs)  # the seed fixes the sample


def test_a_penalty_the_engine_cannot_honour_is_refused_by_name(tiny_server):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as refused:
        send(tiny_server.grpc_url, "llm", frontend_request("Hi", stream=False, frequency_penalty=0.5))
    assert "frequency_penalty=0.5 cannot be honoured" in str(refused.value)


def test_perf_metrics_that_the_engine_fills(tiny_server):
    (outputs, _), = send(tiny_server.grpc_url, "ensemble", frontend_request("Hello", stream=False, perf=True))
    arrival, first, last = (int(outputs[n].reshape(-1)[0]) for n in ("arrival_time_ns", "first_token_time_ns", "last_token_time_ns"))
    assert 0 < arrival <= first <= last
    assert int(outputs["kv_cache_reused_blocks"].reshape(-1)[0]) == 0  # prefix reuse is off in this build


def test_a_perf_metric_the_engine_cannot_fill_is_refused_by_name(tiny_server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(tiny_server.grpc_url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put(error))
    try:
        tensors = []
        for name, (array, dtype) in frontend_request("Hello", stream=False, perf=True).items():
            tensor = grpcclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        client.async_stream_infer("llm", tensors, outputs=[grpcclient.InferRequestedOutput("acceptance_rate")])
        error = results.get(timeout=60)
    finally:
        client.stop_stream()
        client.close()
    assert isinstance(error, InferenceServerException) and "acceptance_rate" in str(error)
