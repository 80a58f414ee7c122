"""End to end on the real local tritonserver: the generated repository serves what transformers computes."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from trtbuild.demo import reference_greedy, server_counts
from trtbuild.clients.generate import GenerationError, generate

pytestmark = pytest.mark.server

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    prompts = [PROMPT, "Once upon a time", "Hello"]
    return dict(zip(prompts, reference_greedy(tiny_checkpoint, prompts, 24)))


def _url(server, protocol):
    return server.grpc_url if protocol == "grpc" else server.http_url


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("model", ["ensemble", "llm_bls", "llm"])  # llm: text in, text out, one model
def test_greedy_generation_equals_transformers(tiny_server, reference, protocol, model):
    result = generate(_url(tiny_server, protocol), PROMPT, 24, protocol=protocol, model=model)
    assert result.text == reference[PROMPT]
    assert len(result.chunks) == 1


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("model", ["ensemble", "llm_bls", "llm"])
def test_streaming_concatenates_to_the_same_text(tiny_server, reference, protocol, model):
    result = generate(_url(tiny_server, protocol), PROMPT, 24, protocol=protocol, model=model, stream=True)
    assert len(result.chunks) > 3
    assert "".join(result.chunks) == reference[PROMPT]
    assert result.ttft <= result.latency


def test_concurrent_requests_of_different_lengths_batch_in_flight(tiny_server, reference):
    jobs = [("Once upon a time", 24), ("Hello", 6), (PROMPT, 16)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: generate(tiny_server.grpc_url, job[0], job[1], stream=True), jobs))
    for (prompt, max_tokens), result in zip(jobs, results):
        # greedy answers are prefixes of the 24-token reference
        assert reference[prompt].startswith(result.text), (prompt, result.text)
        assert result.text
    assert results[1].latency < results[0].latency


def test_min_tokens_forces_the_output_length(tiny_server, tiny_checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    result = generate(tiny_server.grpc_url, "Hello", 20, min_tokens=20, model="llm_bls", stream=True)
    assert len(tokenizer.encode(result.text, add_special_tokens=False)) >= 18


def test_stop_words_end_the_answer_before_the_stop_sequence(tiny_server, reference):
    full = reference[PROMPT]
    stop = full.split()[3]
    result = generate(tiny_server.grpc_url, PROMPT, 24, stop_words=[stop])
    assert stop not in result.text
    assert full.startswith(result.text) and len(result.text) < len(full)


def test_sampling_runs_and_differs_from_greedy(tiny_server, reference):
    texts = {generate(tiny_server.grpc_url, PROMPT, 24, temperature=1.5, top_k=0, top_p=1.0).text for _ in range(3)}
    assert texts - {reference[PROMPT]}


@pytest.mark.parametrize(
    "params, message",
    [
        ({"beam_width": 2}, "beam_width=2 cannot be honoured"),
        ({"repetition_penalty": 1.2}, "repetition_penalty"),
        ({"num_return_sequences": 2}, "num_return_sequences"),
        ({"temperature": -1.0}, "temperature must be >= 0"),  # alone, on an otherwise greedy request
        ({"top_k": -1}, "runtime_top_k must be >= 0"),
        ({"top_k": 10**6}, "exceeds the vocabulary"),
        ({"end_id": -5}, "end_id -5 is outside the vocabulary"),
        ({"min_tokens": -1}, "min_tokens must be >= 0"),
    ],
)
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_values_the_runtime_cannot_honour_are_rejected(tiny_server, params, message, protocol):
    with pytest.raises(GenerationError, match=message):
        generate(_url(tiny_server, protocol), PROMPT, 8, protocol=protocol, **params)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("model", ["ensemble", "llm_bls", "llm"])
@pytest.mark.parametrize("stream", [True, False])
def test_a_missing_max_tokens_is_an_error_on_every_path(tiny_server, protocol, model, stream):
    """Not an empty success: Triton drops the errors of a decoupled ensemble's first step."""
    with pytest.raises(GenerationError, match="max_tokens"):
        generate(_url(tiny_server, protocol), PROMPT, None, protocol=protocol, model=model, stream=stream)


def test_seeded_sampling_is_reproducible(tiny_server):
    texts = {generate(tiny_server.grpc_url, PROMPT, 16, temperature=1.0, top_k=20, seed=7).text for _ in range(2)}
    assert len(texts) == 1
    assert generate(tiny_server.grpc_url, PROMPT, 16, temperature=1.0, top_k=20, seed=8).text not in texts


def test_too_many_tokens_is_a_clear_error(tiny_server):
    with pytest.raises(GenerationError, match="exceeds this build's limits"):
        generate(tiny_server.grpc_url, PROMPT, 1000)


def test_server_metrics_count_the_requests(tiny_server):
    before = server_counts(tiny_server.metrics(), "ensemble").get("nv_inference_request_success", 0)
    for _ in range(2):
        generate(tiny_server.http_url, PROMPT, 4, protocol="http")
    after = server_counts(tiny_server.metrics(), "ensemble")["nv_inference_request_success"]
    assert after == before + 2
