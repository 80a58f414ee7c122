"""The served catalogue of bad input: every entry point (ensemble, llm_bls, the text model llm), over
gRPC streaming and HTTP, refuses each bad request with an error status naming the input and what is
accepted, and keeps serving the next request."""

from __future__ import annotations

import json
import queue

import numpy as np
import pytest
import requests

from trtbuild.clients.generate import GenerationError, generate

pytestmark = pytest.mark.server
PROMPT = "The capital of France is"
MODELS = ["ensemble", "llm_bls", "llm"]

# (case, inputs beyond text_input and max_tokens 8, the words the error must contain)
CASES = [
    ("max_tokens 0", {"max_tokens": 0}, "max_tokens must be at least 1"),
    ("max_tokens -1", {"max_tokens": -1}, "max_tokens must be at least 1"),
    ("max_tokens above the build", {"max_tokens": 5000}, "exceeds this build's limits"),
    ("prompt above max_input_len", {"text_input": "word " * 300}, "more than max_input_len=128"),
    ("top_p 1.5", {"top_p": 1.5}, "top_p must be in [0, 1]"),
    ("temperature -1", {"temperature": -1.0}, "temperature must be >= 0"),
    ("top_k -1", {"top_k": -1}, "top_k must be >= 0"),
    ("min_tokens -1", {"min_tokens": -1}, "min_tokens must be >= 0"),
    ("end_id outside the vocabulary", {"end_id": 10_000_000}, "end_id 10000000 is outside the vocabulary"),
    ("beam search", {"beam_width": 2}, "beam_width=2 cannot be honoured"),
    ("several sequences", {"num_return_sequences": 3}, "num_return_sequences=3 cannot be honoured"),
    ("repetition penalty", {"repetition_penalty": 1.3}, "not supported by trtbuild_runtime"),
    ("bad words", {"bad_words": ["Paris"]}, "bad_words cannot be honoured by trtbuild_runtime"),
    ("no max_tokens", {"max_tokens": None}, "max_tokens is required"),
    ("no text_input", {"text_input": None}, "text_input is required"),
]


def http_body(inputs: dict, stream: bool) -> dict:
    return {k: v for k, v in {"text_input": PROMPT, "max_tokens": 8, **inputs, "stream": stream}.items() if v is not None}


def grpc_send(url: str, model: str, arrays: dict[str, np.ndarray]) -> str | None:
    """The error of a one-request gRPC stream, None if it completed."""
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    tensors = []
    for name, array in arrays.items():
        dtype = "BYTES" if array.dtype == np.object_ else {"int32": "INT32", "bool": "BOOL", "float32": "FP32"}[array.dtype.name]
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(model, tensors, enable_empty_final_response=True)
        while True:
            result, error = results.get(timeout=60)
            if error is not None:
                return str(error)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return None
    finally:
        client.stop_stream()
        client.close()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case, inputs, reason", CASES, ids=[c[0] for c in CASES])
def test_grpc_streaming_refuses_by_name(tiny_server, model, case, inputs, reason):
    from trtbuild.clients.generate import request_inputs

    values = {"max_tokens": 8, **inputs}
    text = values.pop("text_input", PROMPT)
    arrays = request_inputs(text or "", values.pop("max_tokens"), True, **values)
    if text is None:
        del arrays["text_input"]
    if "max_tokens" in inputs and inputs["max_tokens"] is None:
        arrays.pop("max_tokens", None)
    error = grpc_send(tiny_server.grpc_url, model, arrays)
    assert error is not None and reason in error, error
    assert generate(tiny_server.grpc_url, PROMPT, 4, model=model).text  # still serving


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case, inputs, reason", CASES, ids=[c[0] for c in CASES])
def test_http_refuses_by_name_with_a_client_error(tiny_server, model, stream, case, inputs, reason):
    endpoint = "generate_stream" if stream else "generate"
    r = requests.post(f"http://{tiny_server.http_url}/v2/models/{model}/{endpoint}", json=http_body(inputs, stream), timeout=60)
    text = r.text
    if stream:  # server-sent events: the error arrives as an event
        events = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]
        assert any(reason in e.get("error", "") for e in events), text
    else:
        assert r.status_code == 400 and reason in r.json()["error"], (r.status_code, text)


@pytest.mark.parametrize("model", MODELS)
def test_two_prompts_in_one_request_are_refused(tiny_server, model):
    arrays = {"text_input": np.array([[b"one", b"two"]], dtype=np.object_), "max_tokens": np.array([[4]], np.int32)}
    error = grpc_send(tiny_server.grpc_url, model, arrays)
    assert error is not None and ("text_input must hold one prompt" in error or "text_input" in error), error


@pytest.mark.parametrize("model", MODELS)
def test_an_unknown_input_is_refused_by_name(tiny_server, model):
    arrays = {"text_input": np.array([[PROMPT.encode()]], dtype=np.object_), "max_tokens": np.array([[4]], np.int32),
              "colour": np.array([[1]], np.int32)}
    error = grpc_send(tiny_server.grpc_url, model, arrays)
    assert error is not None and "colour" in error, error


@pytest.mark.parametrize("body, field", [
    ({"text_input": PROMPT, "max_tokens": "ten"}, "max_tokens"),
    ({"text_input": PROMPT, "max_tokens": 8.5}, "max_tokens"),
])
def test_http_json_of_the_wrong_type_is_an_error_and_the_server_keeps_serving(tiny_server, body, field):
    """Triton 2.51 parses the JSON before any model sees it: it answers with an error (HTTP 500,
    'Unable to parse...'), which names the field only as its own parser does; what we can hold is that
    it is an error status, never a success, and that the server keeps serving."""
    r = requests.post(f"http://{tiny_server.http_url}/v2/models/llm/generate", json=body, timeout=60)
    assert r.status_code >= 400 and "error" in r.json(), r.text
    assert generate(tiny_server.http_url, PROMPT, 4, protocol="http", model="llm").text


def test_a_body_that_is_not_json_is_an_error(tiny_server):
    r = requests.post(f"http://{tiny_server.http_url}/v2/models/llm/generate", data=b"{not json", timeout=60)
    assert r.status_code >= 400, r.text


def test_a_refused_request_is_not_generated_from_an_empty_prompt(tiny_server):
    """The ensemble used to turn a missing text_input into an empty prompt through the BLS."""
    with pytest.raises(GenerationError, match="text_input is required"):
        list(_no_text(tiny_server.http_url))


def _no_text(url):
    r = requests.post(f"http://{url}/v2/models/llm_bls/generate", json={"max_tokens": 4}, timeout=60)
    if r.status_code != 200 or "error" in r.json():
        raise GenerationError(r.json().get("error", r.text))
    yield r.json()
