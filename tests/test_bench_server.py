"""`trtbuild bench` against real local Triton servers: the tiny Llama repository (ensemble and BLS),
two small echo models that speak the llmapi interface and the ensemble interface with server-side
token counts, and a server stopped in the middle of a run."""

from __future__ import annotations

import json
import textwrap
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from trtbuild.errors import TrtbuildError
from trtbuild.bench.run import BenchConfig, run_benchmark
from trtbuild.bench.loadgen import LoadPoint
from trtbuild.clients.prompts import LengthDistribution, load_tokenizer
from trtbuild.bench.report import write

pytestmark = pytest.mark.server

MAX_TOKENS = 6


def small(url: str, **overrides) -> BenchConfig:
    base = dict(url=url, loads=(LoadPoint(concurrency=2),), requests=4, warmup=1,
                input_tokens=LengthDistribution(16), output_tokens=LengthDistribution(MAX_TOKENS))
    return BenchConfig(**{**base, **overrides})


def check_records(result, *, streamed: bool) -> None:
    for run in result.runs:
        assert run.metrics.failed == 0, run.metrics.errors
        for r in run.records:
            assert r.ok and r.error is None
            assert r.send <= r.arrivals[0] <= r.arrivals[-1] <= r.end
            assert 0 <= r.ttft <= r.latency
            assert r.requested_output_tokens == MAX_TOKENS
            assert r.input_tokens == 16 or r.input_tokens is None
            if streamed:
                assert r.itl is not None and r.itl >= 0
            else:
                assert len(r.arrivals) == 1


def check_token_counts(result, tokenizer) -> None:
    """Forced lengths: server counts must equal max_tokens; the tokenizer's counts are what the
    returned text re-tokenizes to, and every difference from max_tokens is reported in a note."""
    differ = 0
    for run in result.runs:
        for r in run.records:
            if r.token_source == "server":
                assert r.output_tokens == MAX_TOKENS
            else:
                assert r.token_source == "tokenizer"
                assert r.output_tokens == len(tokenizer(r.text, add_special_tokens=False)["input_ids"]) > 0
                differ += r.output_tokens != MAX_TOKENS
    noted = [n for n in result.notes if "re-tokenized to a different length" in n]
    assert bool(noted) == bool(differ)
    if differ:
        assert noted[0].startswith(f"{differ} completed request")


def test_grpc_streaming_ensemble(tiny_server, tiny_checkpoint):
    result = run_benchmark(small(tiny_server.grpc_url, model="ensemble", stream=True))
    run = result.runs[0]
    assert (run.metrics.completed, len(run.records), len(result.warmup)) == (4, 4, 1)
    assert run.server["success_count"] == run.metrics.completed  # Triton's own counter agrees
    assert run.server["fail_count"] == 0
    check_records(result, streamed=True)
    check_token_counts(result, load_tokenizer(tiny_checkpoint))
    assert run.metrics.ttft_ms.p50 <= run.metrics.latency_ms.p50
    assert result.tokenizer == str(tiny_checkpoint)  # found through the preprocessing model's tokenizer_dir


def test_http_bls_open_loop_and_cli_outputs(tiny_server, tmp_path):
    from trtbuild.cli import main

    out = tmp_path / "bench"
    args = ["bench", "run", "--protocol", "http", "--url", tiny_server.http_url, "--model", "llm_bls",
            "--request-rate", "20", "--arrival", "constant", "--max-concurrency", "2", "--concurrency", "1",
            "--requests", "3", "--warmup", "1", "--input-tokens-mean", "16", "--output-tokens-mean", str(MAX_TOKENS),
            "--slo", "ttft_ms=60000", "--gpu-hourly-cost", "2", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"results.json", "results.csv", "requests.jsonl", "throughput_latency.png",
                                               "latency.png", "ttft.png", "itl.png"}
    data = json.loads((out / "results.json").read_text())
    assert [r["key"] for r in data["runs"]] == ["c1", "r20-constant"]
    for run in data["runs"]:
        m = run["metrics"]
        assert (m["completed"], m["failed"]) == (3, 0)
        assert m["good_requests"] == 3 and m["cost"]["usd_per_1k_requests"] > 0
        assert len(run["samples"]["ttft_ms"]) == 3
        assert run["server"]["success_count"] == 3
    lines = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert sum(line["warmup"] for line in lines) == 1 and len(lines) == 7
    assert all(0 <= line["ttft_ms"] <= line["latency_ms"] for line in lines)
    assert len((out / "results.csv").read_text().splitlines()) == 3
    assert data["target"]["interface"] == "ensemble" and data["environment"]["server"]["version"]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unstreamed_ensemble(tiny_server, protocol):
    url = tiny_server.grpc_url if protocol == "grpc" else tiny_server.http_url
    result = run_benchmark(small(url, protocol=protocol, model="ensemble", stream=False))
    assert result.runs[0].metrics.completed == 4
    assert result.runs[0].metrics.ttft_ms is None
    check_records(result, streamed=False)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_tensor_model(tiny_server, protocol):
    """The preprocessing model is a plain tensor model: random inputs from its metadata."""
    url = tiny_server.grpc_url if protocol == "grpc" else tiny_server.http_url
    result = run_benchmark(small(url, protocol=protocol, model="preprocessing", requests=6))
    run = result.runs[0]
    assert result.interface.kind == "tensor" and not result.streaming
    assert (run.metrics.completed, run.metrics.failed) == (6, 0)
    assert run.metrics.output_tokens_per_s == 0 and run.metrics.latency_ms.min >= 0
    assert run.server["success_count"] == 6


def test_model_not_found(tiny_server):
    with pytest.raises(TrtbuildError, match="model 'nope' is not available") as e:
        run_benchmark(small(tiny_server.grpc_url, model="nope"))
    assert "llm_bls" in str(e.value)  # the hint lists what the server has


def test_server_stopped_mid_run_keeps_partial_results(tiny_repository, tmp_path):
    from trtbuild.deploy.server import TritonServer

    server = TritonServer(tiny_repository, log_path=tmp_path / "server.log").start()
    some_done = threading.Event()

    def progress(point, done, failed, elapsed):
        if done >= 2:
            some_done.set()

    # a short grace period: after SIGINT tritonserver rejects new requests at once, then waits for its models
    stopper = threading.Thread(target=lambda: some_done.wait(120) and server.stop(timeout=5), daemon=True)
    stopper.start()
    try:
        config = small(server.grpc_url, model="ensemble", requests=40, warmup=0,
                       output_tokens=LengthDistribution(16), loads=(LoadPoint(concurrency=2), LoadPoint(concurrency=4)))
        result = run_benchmark(config, progress=progress)
    finally:
        stopper.join(60)
        server.stop(timeout=5)
    run = result.runs[0]
    assert run.metrics.completed >= 2
    assert run.metrics.failed >= 1 and run.metrics.errors
    assert len(run.records) == run.metrics.completed + run.metrics.failed
    assert all(r.error for r in run.records if not r.ok)
    assert run.aborted == "the server stopped answering"
    assert len(result.runs) == 1 and any("stopped answering; skipped" in n for n in result.notes), result.notes
    write(result, tmp_path / "out", plots=False)
    lines = [json.loads(line) for line in (tmp_path / "out" / "requests.jsonl").read_text().splitlines()]
    assert sum(line["ok"] for line in lines) == run.metrics.completed
    assert any(line["error"] for line in lines)


ECHO_MODEL = '''
import json
import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    """Answers max_tokens words " the"; streamed: one word per response, then an empty final one."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.llmapi = any(i["name"] == "sampling_param_max_tokens" for i in config["input"])
        self.shape = (1, 1) if config["max_batch_size"] > 0 else (1,)

    def _value(self, request, name, default):
        t = pb_utils.get_input_tensor_by_name(request, name)
        return default if t is None else t.as_numpy().reshape(-1)[0]

    def _response(self, words):
        outputs = [pb_utils.Tensor("text_output", np.array([(" the" * words).encode()], dtype=np.object_).reshape(self.shape))]
        if not self.llmapi:
            outputs.append(pb_utils.Tensor("num_output_tokens", np.array([words], np.int32).reshape(self.shape)))
        return pb_utils.InferenceResponse(output_tensors=outputs)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            n = int(self._value(request, "sampling_param_max_tokens" if self.llmapi else "max_tokens", 1))
            if bool(self._value(request, "streaming" if self.llmapi else "stream", False)):
                for _ in range(n):
                    sender.send(self._response(1))
                sender.send(flags=FINAL)
            else:
                sender.send(self._response(n), flags=FINAL)
        return None
'''

ECHO_CONFIGS = {
    "echo_llmapi": '''
        backend: "python"
        max_batch_size: 0
        model_transaction_policy { decoupled: true }
        input [
          { name: "text_input", data_type: TYPE_STRING, dims: [ -1 ] },
          { name: "streaming", data_type: TYPE_BOOL, dims: [ 1 ], optional: true },
          { name: "sampling_param_max_tokens", data_type: TYPE_INT32, dims: [ 1 ], optional: true },
          { name: "sampling_param_min_tokens", data_type: TYPE_INT32, dims: [ 1 ], optional: true }
        ]
        output [ { name: "text_output", data_type: TYPE_STRING, dims: [ -1 ] } ]
        instance_group [ { count: 1, kind: KIND_CPU } ]
    ''',
    "echo_counted": '''
        backend: "python"
        max_batch_size: 4
        model_transaction_policy { decoupled: true }
        input [
          { name: "text_input", data_type: TYPE_STRING, dims: [ 1 ] },
          { name: "max_tokens", data_type: TYPE_INT32, dims: [ 1 ] },
          { name: "min_tokens", data_type: TYPE_INT32, dims: [ 1 ], optional: true },
          { name: "stream", data_type: TYPE_BOOL, dims: [ 1 ], optional: true },
          { name: "return_num_output_tokens", data_type: TYPE_BOOL, dims: [ 1 ], optional: true }
        ]
        output [
          { name: "text_output", data_type: TYPE_STRING, dims: [ -1 ] },
          { name: "num_output_tokens", data_type: TYPE_INT32, dims: [ 1 ] }
        ]
        instance_group [ { count: 1, kind: KIND_CPU } ]
    ''',
}


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory):
    from trtbuild.deploy.server import TritonServer

    repo = tmp_path_factory.mktemp("echo") / "repo"
    for name, config in ECHO_CONFIGS.items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(textwrap.dedent(config))
        (repo / name / "1" / "model.py").write_text(ECHO_MODEL)
    server = TritonServer(repo, log_path=Path(repo.parent) / "server.log").start()
    yield server
    server.stop()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("stream", [True, False])
def test_llmapi_interface(echo_server, tiny_checkpoint, protocol, stream):
    url = echo_server.grpc_url if protocol == "grpc" else echo_server.http_url
    result = run_benchmark(small(url, protocol=protocol, model="echo_llmapi", stream=stream, tokenizer=tiny_checkpoint))
    assert result.interface.kind == "llmapi" and result.interface.max_batch_size == 0
    check_records(result, streamed=stream)
    for r in result.runs[0].records:
        assert r.text == " the" * MAX_TOKENS
        assert (r.output_tokens, r.token_source) == (MAX_TOKENS, "tokenizer")
        assert len(r.arrivals) == (MAX_TOKENS if stream else 1)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_server_reported_token_counts(echo_server, tiny_checkpoint, protocol):
    url = echo_server.grpc_url if protocol == "grpc" else echo_server.http_url
    result = run_benchmark(small(url, protocol=protocol, model="echo_counted", stream=True, tokenizer=tiny_checkpoint))
    assert result.interface.count_outputs == ("num_output_tokens",)
    check_records(result, streamed=True)
    assert {(r.output_tokens, r.token_source) for r in result.runs[0].records} == {(MAX_TOKENS, "server")}
    m = result.runs[0].metrics
    assert m.output_tokens_per_s == pytest.approx(4 * MAX_TOKENS / m.duration_s)
