"""Health that tells the truth: an engine wedged on purpose fails its requests and new ones at once,
the generated probe (a one-token generate) fails while /v2/health/ready still answers 200, and
`trtbuild serve` exits non-zero naming the cause. A cancelled stream frees its KV blocks."""

from __future__ import annotations

import dataclasses
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from trtbuild.clients.generate import GenerationError, generate
from trtbuild.deploy.probe import generate_probe
from trtbuild.runtimes import generate as generate_repository

pytestmark = pytest.mark.server
WEDGE = "XYZZY-WEDGE"
STALL_S = 2.0


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probe(model: str, http: int) -> int:
    command = list(generate_probe(model, http, timeout_s=5))
    command[0] = sys.executable
    command[3] = command[3].replace("localhost:", "127.0.0.1:")
    return subprocess.run(command, capture_output=True, timeout=30).returncode


def _ready(http: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=5) as r:
        return r.status


def _wedgeable(tiny_spec, tmp_path, engine):
    spec = dataclasses.replace(tiny_spec, llm_engine=engine, engine_stall_timeout_s=STALL_S,
                               extra={"fault_injection_stall_prompt": WEDGE})
    return generate_repository(spec, tmp_path / "repo")


def _warm(url: str, alive) -> None:
    deadline = time.monotonic() + 180
    while True:
        try:
            generate(url, "warm up", 2, model="llm")
            return
        except GenerationError:
            assert time.monotonic() < deadline and alive()
            time.sleep(1)


@pytest.mark.parametrize("engine", ["trtbuild", "transformers"])
def test_a_wedged_engine_fails_fast_and_the_probe_fails_while_ready_says_200(tiny_spec, tmp_path, engine):
    from trtbuild.deploy.server import TritonServer

    server = TritonServer(_wedgeable(tiny_spec, tmp_path, engine), log_path=tmp_path / "tritonserver.log").start()
    http = int(server.http_url.rsplit(":", 1)[1])
    try:
        assert _probe("llm", http) == 0
        started = time.monotonic()
        with pytest.raises(GenerationError, match=r"not healthy \(no progress for"):
            generate(server.grpc_url, f"please {WEDGE} now", 16, model="ensemble", stream=True)
        assert time.monotonic() - started < STALL_S + 5  # failed by the watchdog, not by a client timeout
        started = time.monotonic()
        with pytest.raises(GenerationError, match="the LLM engine is not healthy"):
            generate(server.grpc_url, "anyone there?", 4, model="llm_bls")
        assert time.monotonic() - started < 2  # at once
        assert _probe("llm", http) != 0
        assert _ready(http) == 200  # what a probe on readiness would have trusted
        assert server.unhealthy_engines()["llm"].startswith("no progress for")  # the gauge and the logged reason
    finally:
        server.stop()


def test_serve_exits_non_zero_naming_the_cause(tiny_spec, tmp_path):
    repo = _wedgeable(tiny_spec, tmp_path, "trtbuild")
    http, grpc, metrics = _port(), _port(), _port()
    serve = subprocess.Popen([sys.executable, "-m", "trtbuild", "serve", str(repo), "--http-port", str(http),
                              "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _warm(f"127.0.0.1:{grpc}", lambda: serve.poll() is None)
        with pytest.raises(GenerationError):
            generate(f"127.0.0.1:{grpc}", f"please {WEDGE} now", 16, model="llm")
        serve.wait(timeout=30)
        output = serve.stdout.read()
        assert serve.returncode == 2, output
        assert re.search(r"LLM engine of model 'llm' is unhealthy \(no progress for [\d.]+ s", output), output
    finally:
        if serve.poll() is None:
            serve.terminate()
            serve.wait(timeout=60)


def test_a_cancelled_stream_frees_its_kv_blocks(tiny_server):
    """The client goes away after the first response; the engine drops the sequence at once."""
    import tritonclient.grpc as grpcclient

    def free_blocks() -> float:
        match = re.search(r'trtbuild_kv_cache_free_blocks\{model="llm"\} (\S+)', tiny_server.metrics())
        return float(match.group(1))

    idle = free_blocks()
    first = []
    client = grpcclient.InferenceServerClient(tiny_server.grpc_url)
    client.start_stream(callback=lambda result, error: first.append(error or result))
    from trtbuild.clients.generate import request_inputs

    inputs = []
    for name, array in request_inputs("Tell me a long story about a lighthouse keeper.", 60, True, min_tokens=60).items():
        tensor = grpcclient.InferInput(name, list(array.shape), "BYTES" if array.dtype == object else {
            "int32": "INT32", "bool": "BOOL"}[array.dtype.name])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    client.async_stream_infer("llm", inputs, request_id="to-cancel")
    deadline = time.monotonic() + 30
    while not first and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first and free_blocks() <= idle
    client.stop_stream(cancel_requests=True)
    client.close()
    deadline = time.monotonic() + 5
    while free_blocks() < idle and time.monotonic() < deadline:
        time.sleep(0.05)
    assert free_blocks() == idle
    assert generate(tiny_server.grpc_url, "still serving?", 4, model="llm").text  # the rest keeps working
