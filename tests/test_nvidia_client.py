"""Our ensemble and BLS answer a client written the way NVIDIA's end_to_end_grpc_client.py is.

That client (tensorrtllm_backend, inflight_batcher_llm/client) uses the synchronous gRPC client's
stream API for every request, sends every input as a [1, 1] array, never asks for an empty final
response, reads `text_output` as a 1-D array (`output[0].decode()`), `batch_index` and
`sequence_index` as [0][0] when present, and appends streamed chunks. This test is our own client
with those habits, not a copy of theirs.
"""

import queue

import numpy as np
import pytest

from trtbuild.demo import reference_greedy

pytestmark = pytest.mark.server

PROMPT = "The quick brown fox"
TOKENS = 20


def nvidia_style_request(url, model, prompt, max_tokens, streaming, return_log_probs=False):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    arrays = {
        "text_input": np.array([[prompt]]).astype(object),
        "max_tokens": np.ones((1, 1), np.int32) * max_tokens,
        "stream": np.array([[streaming]], dtype=bool),
        "beam_width": np.array([[1]], np.int32),
        "temperature": np.array([[1.0]], np.float32),
        "top_k": np.array([[1]], np.int32),
        "return_log_probs": np.array([[return_log_probs]], dtype=bool),
    }
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, array.shape, np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("text_output", "batch_index", "sequence_index")]
    if return_log_probs:
        outputs += [grpcclient.InferRequestedOutput("cum_log_probs"), grpcclient.InferRequestedOutput("output_log_probs")]
    results = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer(model, inputs, outputs=outputs, request_id="1")
    client.stop_stream()  # returns once the stream is closed: every response has arrived
    client.close()
    text, responses = "", []
    while not results.empty():
        result, error = results.get()
        assert error is None, error
        output = result.as_numpy("text_output")
        if output is None:
            continue
        assert output.ndim == 1 and isinstance(output[0], bytes), output
        batch_index = result.as_numpy("batch_index")
        assert (0 if batch_index is None else batch_index[0][0]) == 0
        sequence_index = result.as_numpy("sequence_index")
        assert (0 if sequence_index is None else sequence_index[0][0]) == 0
        if streaming:
            text += output[0].decode("utf-8")
        else:
            text = output[0].decode("utf-8")
        responses.append(result)
    return text, responses


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return reference_greedy(tiny_checkpoint, [PROMPT], TOKENS)[0]


@pytest.mark.parametrize("model", ["ensemble", "llm_bls"])
@pytest.mark.parametrize("streaming", [False, True])
def test_nvidia_style_client_reads_every_answer(tiny_server, reference, model, streaming):
    text, responses = nvidia_style_request(tiny_server.grpc_url, model, PROMPT, TOKENS, streaming)
    assert text == reference
    assert len(responses) > (3 if streaming else 0)


@pytest.mark.parametrize("model", ["ensemble", "llm_bls"])
def test_log_probs_have_nvidia_shapes(tiny_server, model):
    _, responses = nvidia_style_request(tiny_server.grpc_url, model, PROMPT, 8, False, return_log_probs=True)
    (result,) = responses
    cum, per_token = result.as_numpy("cum_log_probs"), result.as_numpy("output_log_probs")
    assert cum.shape == (1, 1)  # [batch, beam]
    assert per_token.ndim == 3 and per_token.shape[:2] == (1, 1)  # [batch, beam, tokens]
    assert np.isclose(cum[0][0], per_token[0][0][-8:].sum(), atol=1e-4)
