"""Streaming with token coalescing on and off, on every served path, and 300 streams at once.

Coalescing changes how many responses a stream gets, never the concatenated text: each path's
streamed text equals its non-streamed text, which equals transformers' greedy output.
"""

from concurrent.futures import ThreadPoolExecutor

import pytest

from trtbuild.demo import reference_greedy
from trtbuild.clients.generate import generate

pytestmark = pytest.mark.server

PROMPTS = ["The quick brown fox", "Once upon a time", "Grüße aus Köln, 東京"]
TOKENS = 24
PATHS = ["ensemble", "llm_bls", "llm"]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return dict(zip(PROMPTS, reference_greedy(tiny_checkpoint, PROMPTS, TOKENS)))


@pytest.fixture(scope="module", params=["off", "on"])
def server(request, tiny_spec, tmp_path_factory):
    import dataclasses

    from trtbuild.runtimes import generate as generate_repository
    from trtbuild.deploy.server import TritonServer

    streaming = {"off": dict(stream_max_tokens=1), "on": dict(stream_interval_ms=40.0)}[request.param]
    spec = dataclasses.replace(tiny_spec, max_batch_size=8, **streaming)
    repo = generate_repository(spec, tmp_path_factory.mktemp(f"coalesce-{request.param}") / "repo")
    srv = TritonServer(repo, log_path=tmp_path_factory.mktemp("log") / "tritonserver.log")
    srv.start()
    srv.coalescing = request.param
    yield srv
    srv.stop()


@pytest.mark.parametrize("model", PATHS)
def test_streamed_text_equals_the_whole_text(server, reference, model):
    for prompt in PROMPTS:
        whole = generate(server.grpc_url, prompt, TOKENS, model=model)
        streamed = generate(server.grpc_url, prompt, TOKENS, model=model, stream=True)
        assert whole.text == reference[prompt]
        assert "".join(streamed.chunks) == whole.text
        if server.coalescing == "on":
            assert len(streamed.chunks) < TOKENS  # 24 tokens at CPU speed span several 40 ms intervals
        else:
            assert len(streamed.chunks) >= TOKENS - 2  # one token per response (a split character may wait)


def test_300_concurrent_streams_all_complete_with_the_right_text(tiny_server, reference):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(300)]
    models = [PATHS[i % len(PATHS)] for i in range(300)]

    def one(i):
        return generate(tiny_server.grpc_url, prompts[i], TOKENS, model=models[i], stream=True).text

    with ThreadPoolExecutor(max_workers=300) as pool:
        texts = list(pool.map(one, range(300)))
    wrong = [(models[i], prompts[i], t) for i, t in enumerate(texts) if t != reference[prompts[i]]]
    assert not wrong, wrong[:3]
