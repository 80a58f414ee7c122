"""The runtime's optimizations end to end: a repository built with FP8 weights, an FP8 KV cache,
prefix caching and prompt-lookup speculation, behind the real tritonserver.

The numerics of each optimization are tested on the runtime directly (tests/test_runtime.py,
tests/test_quantization.py); here: the build spec reaches the engine, requests are served on every
path, and the engine's counters reach Triton's metrics endpoint.
"""

from __future__ import annotations

import dataclasses
import json
import re
import urllib.request

import pytest

from trtbuild.errors import TrtbuildError
from trtbuild.spec import KVCacheSpec
from trtbuild.clients.generate import generate

SYSTEM = "You are a careful assistant. Answer in one short sentence, and repeat the question first. " * 3


def test_options_that_need_the_trtbuild_engine_are_refused_elsewhere(tiny_spec):
    with pytest.raises(TrtbuildError, match="need trtbuild_runtime"):
        dataclasses.replace(tiny_spec, llm_engine="transformers", speculative_decoding_mode="ngram").engine_choice
    with pytest.raises(TrtbuildError, match="--kv-cache-dtype int8 is not available"):
        dataclasses.replace(tiny_spec, kv_cache=KVCacheSpec(dtype="int8"))
    with pytest.raises(TrtbuildError, match="--max-draft-len"):
        dataclasses.replace(tiny_spec, speculative_decoding_mode="ngram", max_draft_len=0)
    fp8 = dataclasses.replace(tiny_spec, quantization="fp8")
    assert fp8.engine_choice.engine == "trtbuild"  # FP8 runs on trtbuild_runtime now, not transformers' modules


@pytest.fixture(scope="module")
def optimized_server(tiny_spec, tmp_path_factory):
    from trtbuild.runtimes import generate as generate_repository
    from trtbuild.deploy.server import TritonServer

    spec = dataclasses.replace(tiny_spec, quantization="fp8", speculative_decoding_mode="ngram", max_draft_len=3,
                               kv_cache=KVCacheSpec(page_size=16, dtype="fp8", enable_reuse=True))
    repo = generate_repository(spec, tmp_path_factory.mktemp("optimized") / "repo")
    server = TritonServer(repo, log_path=tmp_path_factory.mktemp("log") / "tritonserver.log")
    server.start()
    server.repo = repo
    yield server
    server.stop()


@pytest.mark.server
def test_the_build_spec_reaches_the_engine(optimized_server):
    manifest = json.loads((optimized_server.repo / "trtbuild.json").read_text())["spec"]
    assert manifest["quantization"] == "fp8" and manifest["kv_cache"]["dtype"] == "fp8"
    assert manifest["speculative_decoding_mode"] == "ngram" and manifest["max_draft_len"] == 3
    config = (optimized_server.repo / "llm" / "config.pbtxt").read_text()
    for key, value in (("kv_cache_dtype", "fp8"), ("speculative_decoding_mode", "ngram"), ("max_draft_len", "3"),
                       ("enable_kv_cache_reuse", "true"), ("quantization", "fp8")):
        assert re.search(rf'key: "{key}"\s*value: {{\s*string_value: "{value}"', config), key
    log = optimized_server.log_path.read_text(errors="replace")
    assert "float8_e4m3fn" in log and "quantization fp8" in log and "speculative ngram" in log


@pytest.mark.server
@pytest.mark.parametrize("model", ["ensemble", "llm_bls", "llm"])
def test_every_path_serves_and_repeats_itself(optimized_server, model):
    """Greedy requests repeated (the second a prefix-cache hit, both speculated) give the same text."""
    prompt = SYSTEM + f"What does {model} mean?"
    first = generate(optimized_server.grpc_url, prompt, 20, model=model)
    again = generate(optimized_server.grpc_url, prompt, 20, model=model, stream=True)
    assert first.text and first.text == again.text


@pytest.mark.server
def test_engine_counters_reach_the_metrics_endpoint(optimized_server):
    for i in range(3):
        generate(optimized_server.grpc_url, SYSTEM + f"Question {i}?", 12, model="llm")
    text = urllib.request.urlopen(optimized_server.metrics_url, timeout=10).read().decode()
    hit = re.search(r'^trtbuild_prefix_cache_hit_ratio\{model="llm"\} ([0-9.e+-]+)$', text, re.M)
    assert hit and float(hit.group(1)) > 0.3, text[-2000:]  # the shared system prompt came from the cache
    for name in ("trtbuild_speculative_acceptance_ratio", "trtbuild_speculative_tokens_per_step", "trtbuild_kv_cache_free_blocks"):
        assert re.search(rf'^{name}\{{model="llm"\}} [0-9.e+-]+$', text, re.M), name
