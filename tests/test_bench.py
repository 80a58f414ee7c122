"""Benchmark logic without a server: metric arithmetic, SLOs, arrival processes, load bounds,
prompt construction, request building and `bench compare`."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from trtbuild.errors import TrtbuildError
from trtbuild.bench.compare import compare, load_result
from trtbuild.bench.loadgen import LoadPoint, arrival_offsets, closed_loop, open_loop
from trtbuild.bench.metrics import SLO, RequestRecord, Stats, summarize
from trtbuild.clients.prompts import LengthDistribution, Prompt, load_jsonl, load_tokenizer, synthetic_prompts
from trtbuild.clients.target import detect_kind, interface_from, llm_arrays, llm_json, random_tensor_inputs
from trtbuild.clients.transport import HttpTransport


def rec(index, send, arrivals, out_tokens, in_tokens=10, error=None, warmup=False, end=None):
    return RequestRecord(index=index, send=send, arrivals=list(arrivals), output_tokens=out_tokens, input_tokens=in_tokens,
                         error=error, warmup=warmup, end=end)


# --------------------------------------------------------------------------- per-request metrics
def test_request_metrics_from_timestamps():
    r = rec(0, 10.0, [10.1, 10.15, 10.2, 10.3], out_tokens=5)
    assert r.ttft == pytest.approx(0.1)
    assert r.latency == pytest.approx(0.3)
    assert r.itl == pytest.approx((0.3 - 0.1) / 4)  # 50 ms: tokens, not responses, divide the decode time


def test_itl_undefined_for_one_token_and_no_response():
    assert rec(0, 0.0, [0.5], out_tokens=1).itl is None
    empty = rec(0, 0.0, [], out_tokens=None, error="boom")
    assert empty.ttft is None and empty.latency is None and not empty.ok


def test_stats_match_numpy_definitions():
    s = Stats.of([100.0, 200.0, 300.0, 400.0])
    # linear interpolation between order statistics at rank q*(n-1)
    assert (s.p50, s.p90, s.p95, s.p99) == pytest.approx((250.0, 370.0, 385.0, 397.0))
    assert s.mean == 250.0
    assert s.stddev == pytest.approx(math.sqrt((150**2 + 50**2 + 50**2 + 150**2) / 4))  # population stddev
    assert (s.min, s.max, s.count) == (100.0, 400.0, 4)
    assert Stats.of([]) is None


def test_run_aggregates_from_known_timestamps():
    records = [
        rec(-1, 0.0, [5.0], out_tokens=50, warmup=True),  # warm-up: excluded from everything
        rec(0, 1.0, [1.1, 1.5], out_tokens=5, in_tokens=10),  # ttft 100, latency 500, itl 100
        rec(1, 1.2, [1.4, 2.2], out_tokens=11, in_tokens=20),  # ttft 200, latency 1000, itl 80
        rec(2, 1.5, [1.8, 2.1, 2.7], out_tokens=4, in_tokens=30),  # ttft 300, latency 1200, itl 300
        rec(3, 2.0, [], out_tokens=None, error="HTTP 500: boom", end=3.0),  # failed; ends the run at 3.0
    ]
    m = summarize(records, streaming=True)
    assert (m.completed, m.failed) == (3, 1)
    assert m.duration_s == pytest.approx(2.0)  # first send 1.0 -> last end 3.0
    assert m.requests_per_s == pytest.approx(3 / 2.0)
    assert m.output_tokens_per_s == pytest.approx(20 / 2.0)
    assert m.input_tokens_per_s == pytest.approx(60 / 2.0)
    assert m.error_rate == pytest.approx(0.25)
    assert m.ttft_ms.mean == pytest.approx(200.0)
    assert m.latency_ms.p50 == pytest.approx(1000.0)
    assert m.itl_ms.mean == pytest.approx((100.0 + 80.0 + 300.0) / 3)
    assert m.output_tokens.mean == pytest.approx(20 / 3)
    assert m.errors == {"HTTP 500: boom": 1}
    assert m.goodput_per_s is None and m.cost is None


def test_non_streamed_runs_report_no_ttft_or_itl():
    m = summarize([rec(0, 0.0, [0.4], out_tokens=8)], streaming=False)
    assert m.ttft_ms is None and m.itl_ms is None
    assert m.latency_ms.p50 == pytest.approx(400.0)


def test_cost_per_requests_and_tokens():
    m = summarize([rec(0, 0.0, [0.5, 1.0], out_tokens=100), rec(1, 0.0, [0.5, 1.0], out_tokens=100)],
                  streaming=True, gpu_hourly_usd=3.6)
    # 2 req/s, 200 tok/s at 0.001 USD/s
    assert m.cost.usd_per_1k_requests == pytest.approx(0.5)
    assert m.cost.usd_per_1m_output_tokens == pytest.approx(5.0)


# --------------------------------------------------------------------------- SLO and goodput
def test_slo_parse_and_goodput():
    slo = SLO.parse("ttft_ms=150, latency_ms=1000")
    assert slo == SLO(ttft_ms=150.0, latency_ms=1000.0)
    records = [
        rec(0, 0.0, [0.1, 0.9], out_tokens=9),  # ttft 100, latency 900: good
        rec(1, 0.0, [0.2, 0.5], out_tokens=9),  # ttft 200: misses TTFT
        rec(2, 0.0, [0.1, 1.5], out_tokens=9),  # latency 1500: misses latency
        rec(3, 0.0, [0.15, 1.0], out_tokens=9),  # exactly on both limits: good
        rec(4, 0.0, [], out_tokens=None, error="x", end=2.0),  # failed: never good
    ]
    m = summarize(records, streaming=True, slo=slo)
    assert m.good_requests == 2
    assert m.goodput_per_s == pytest.approx(2 / 2.0)


def test_slo_itl_limit():
    slo = SLO.parse("itl_ms=50")
    assert slo.met(rec(0, 0.0, [0.1, 0.5], out_tokens=9))  # itl 50
    assert not slo.met(rec(0, 0.0, [0.1, 0.6], out_tokens=9))  # itl 62.5
    assert slo.met(rec(0, 0.0, [0.1], out_tokens=1))  # one token: no inter-token gap to miss


@pytest.mark.parametrize("text", ["ttft=5", "ttft_ms", "ttft_ms=abc", "latency_ms=-1"])
def test_slo_rejects_bad_text(text):
    with pytest.raises(TrtbuildError):
        SLO.parse(text)


# --------------------------------------------------------------------------- arrivals and load bounds
def test_poisson_arrivals_are_exponential():
    rate = 50.0
    offsets = arrival_offsets(20001, rate, "poisson", seed=7)
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.03)  # exponential: coefficient of variation 1
    assert stats.kstest(gaps, "expon", args=(0, 1 / rate)).pvalue > 0.01
    assert np.array_equal(offsets, arrival_offsets(20001, rate, "poisson", seed=7))  # seeded
    assert not np.array_equal(offsets, arrival_offsets(20001, rate, "poisson", seed=8))


def test_constant_arrivals():
    assert np.allclose(arrival_offsets(5, 4.0, "constant"), [0.0, 0.25, 0.5, 0.75, 1.0])


class FakeSend:
    """A stand-in request: sleeps, succeeds or fails, and tracks how many are in flight."""

    def __init__(self, seconds=0.002, fail_from=None):
        self.seconds, self.fail_from = seconds, fail_from
        self.in_flight = self.peak = 0
        self.indices = []

    async def __call__(self, index):
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.indices.append(index)
        r = RequestRecord(index=index, send=0.0)
        await asyncio.sleep(self.seconds)
        self.in_flight -= 1
        if self.fail_from is not None and index >= self.fail_from:
            r.error = "down"
        else:
            r.arrivals.append(1.0)
        return r


def test_closed_loop_keeps_concurrency_and_count():
    send = FakeSend()
    result = asyncio.run(closed_loop(send, 4, requests=30, first_index=5))
    assert len(result.records) == 30 and send.peak == 4
    assert sorted(send.indices) == list(range(5, 35))
    assert result.aborted is None


def test_open_loop_respects_max_concurrency():
    send = FakeSend(seconds=0.05)
    result = asyncio.run(open_loop(send, 2000.0, arrival="constant", max_concurrency=3, requests=20))
    assert len(result.records) == 20 and send.peak == 3
    assert all(r.scheduled is not None for r in result.records)


def test_duration_bound_stops_sending():
    send = FakeSend(seconds=0.01)
    result = asyncio.run(closed_loop(send, 2, duration=0.1))
    assert 0 < len(result.records) < 1000


def test_max_errors_stops_the_run_and_keeps_records():
    send = FakeSend(fail_from=10)
    result = asyncio.run(closed_loop(send, 1, requests=100, max_errors=3))
    assert result.aborted == "stopped after 3 failed requests"
    assert len(result.records) == 13
    assert sum(r.ok for r in result.records) == 10


def test_load_point_validation():
    with pytest.raises(ValueError):
        LoadPoint()
    with pytest.raises(ValueError):
        LoadPoint(concurrency=1, request_rate=2.0)
    assert LoadPoint(request_rate=2.5, arrival="constant").key == "r2.5-constant"


# --------------------------------------------------------------------------- prompts
def test_synthetic_prompts_have_exact_token_counts(tiny_checkpoint):
    tokenizer = load_tokenizer(tiny_checkpoint)
    prompts = synthetic_prompts(tokenizer, 20, LengthDistribution(40), LengthDistribution(12), seed=3)
    counts = [len(tokenizer(p.text, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert counts == [p.input_tokens for p in prompts] == [40] * 20
    assert {p.output_tokens for p in prompts} == {12}
    assert len({p.text for p in prompts}) == 20
    varied = synthetic_prompts(tokenizer, 200, LengthDistribution(64, 16), LengthDistribution(32, 8), seed=3)
    lengths = np.array([p.input_tokens for p in varied])
    assert 56 < lengths.mean() < 72 and 10 < lengths.std() < 22
    assert min(p.output_tokens for p in varied) >= 1


def test_jsonl_prompts(tmp_path, tiny_checkpoint):
    tokenizer = load_tokenizer(tiny_checkpoint)
    f = tmp_path / "p.jsonl"
    f.write_text('{"text": "hello world", "output_tokens": 7}\n\n{"prompt": "the sea"}\n')
    prompts = load_jsonl(f, tokenizer, LengthDistribution(5))
    assert [(p.text, p.output_tokens) for p in prompts] == [("hello world", 7), ("the sea", 5)]
    assert prompts[0].input_tokens == len(tokenizer("hello world", add_special_tokens=False)["input_ids"])
    f.write_text('{"question": "no text key"}\n')
    with pytest.raises(TrtbuildError, match="p.jsonl:1"):
        load_jsonl(f, tokenizer, LengthDistribution(5))


# --------------------------------------------------------------------------- request building
ENSEMBLE_META = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [-1, 1]},
                            {"name": "max_tokens", "datatype": "INT32", "shape": [-1, 1]},
                            {"name": "min_tokens", "datatype": "INT32", "shape": [-1, 1]},
                            {"name": "stream", "datatype": "BOOL", "shape": [-1, 1]}],
                 "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [-1, -1]}]}
LLMAPI_META = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [-1]},
                          {"name": "streaming", "datatype": "BOOL", "shape": [1]},
                          {"name": "sampling_param_max_tokens", "datatype": "INT32", "shape": [1]}],
               "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}]}


def test_interface_detection_and_llm_inputs():
    ensemble = interface_from("ensemble", ENSEMBLE_META, {"max_batch_size": 4, "model_transaction_policy": {"decoupled": True}})
    assert (ensemble.kind, ensemble.decoupled, ensemble.inputs["max_tokens"]) == ("ensemble", True, ("INT32", (1,)))
    arrays = llm_arrays(ensemble, Prompt("hi", 1, 9), stream=True, force_output_len=True)
    assert {k: (v.shape, v.reshape(-1)[0]) for k, v in arrays.items()} == {
        "text_input": ((1, 1), b"hi"), "max_tokens": ((1, 1), 9), "min_tokens": ((1, 1), 9), "stream": ((1, 1), True)}

    llmapi = interface_from("tensorrt_llm", LLMAPI_META, {"max_batch_size": 0})
    assert llmapi.kind == "llmapi" and not llmapi.decoupled
    arrays = llm_arrays(llmapi, Prompt("hi", 1, 9), stream=False, force_output_len=True)
    assert {k: v.shape for k, v in arrays.items()} == {"text_input": (1,), "sampling_param_max_tokens": (1,), "streaming": (1,)}
    assert json.loads(llm_json(llmapi, Prompt("hi", 1, 9), False, True)) == {
        "text_input": "hi", "sampling_param_max_tokens": 9, "streaming": False}
    assert detect_kind({"input_ids": 1}) == "tensor"
    with pytest.raises(TrtbuildError, match="no text_input"):
        interface_from("m", {"inputs": [], "outputs": []}, {}, "ensemble")


def test_random_tensor_inputs():
    meta = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                       {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]},
                       {"name": "pixel", "datatype": "FP16", "shape": [-1, 3]},
                       {"name": "names", "datatype": "BYTES", "shape": [-1, 2]}], "outputs": []}
    iface = interface_from("m", meta, {"max_batch_size": 8})
    arrays = random_tensor_inputs(iface, {"input_ids": (2, 5)})
    assert arrays["input_ids"].shape == (2, 5) and arrays["input_ids"].dtype == np.int64
    assert arrays["input_ids"].min() >= 0 and arrays["input_ids"].max() < 100
    assert arrays["attention_mask"].shape == (1, 16) and (arrays["attention_mask"] == 1).all()
    assert arrays["pixel"].dtype == np.float16 and arrays["pixel"].shape == (1, 3)
    assert arrays["names"].dtype == object and arrays["names"].shape == (1, 2)
    with pytest.raises(TrtbuildError, match="unknown input"):
        random_tensor_inputs(iface, {"nope": (1,)})


def test_http_stream_decoding_uses_server_counts_and_errors():
    meta = {"inputs": ENSEMBLE_META["inputs"] + [{"name": "return_num_output_tokens", "datatype": "BOOL", "shape": [-1, 1]}],
            "outputs": ENSEMBLE_META["outputs"] + [{"name": "num_output_tokens", "datatype": "INT32", "shape": [-1, 1]}]}
    iface = interface_from("ensemble", meta, {"max_batch_size": 4})
    assert iface.count_outputs == ("num_output_tokens",)
    assert json.loads(llm_json(iface, Prompt("x", 1, 4), True, True))["return_num_output_tokens"] is True
    r = RequestRecord(index=0, send=1.0)
    r.raw = [(1.1, b'data: {"text_output": "a", "num_output_tokens": 1}\n\n'),
             (1.2, b'data: {"text_output": "", "num_output_tokens": 0}\n\ndata: {"text_output": " b'),
             (1.3, b'c", "num_output_tokens": 3}\n\n')]  # an event split across two chunks arrives with the second
    counts = HttpTransport.decode(iface, r)
    assert counts == {"num_output_tokens": 4} and r.text == "a bc" and r.arrivals == [1.1, 1.3]
    bad = RequestRecord(index=1, send=1.0)
    bad.raw = [(1.1, b'data: {"text_output": "a"}\n\n'), (1.2, b'data: {"error": "model crashed"}\n\n')]
    HttpTransport.decode(iface, bad)
    assert bad.error == "model crashed" and not bad.ok


# --------------------------------------------------------------------------- compare
def result_file(tmp_path, name, tokens_per_s, latencies, ttfts):
    run = {"key": "c4", "label": "concurrency 4",
           "metrics": {"output_tokens_per_s": tokens_per_s, "requests_per_s": tokens_per_s / 100, "goodput_per_s": None,
                       "ttft_ms": {"p50": float(np.median(ttfts)), "p99": float(np.percentile(ttfts, 99))},
                       "itl_ms": None, "latency_ms": {"p50": float(np.median(latencies)), "p99": float(np.percentile(latencies, 99))}},
           "samples": {"latency_ms": list(latencies), "ttft_ms": list(ttfts)}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"runs": [run]}))
    return path


def test_compare_faster_and_speedups(tmp_path):
    rng = np.random.default_rng(0)
    base = result_file(tmp_path, "base", 1000.0, rng.normal(100, 5, 60), rng.normal(20, 2, 60))
    new = result_file(tmp_path, "new", 1250.0, rng.normal(80, 5, 60), rng.normal(15, 2, 60))
    c = compare(load_result(base), load_result(new))
    point = c.points[0]
    assert point.chosen.speedup == pytest.approx(1.25)
    assert point.chosen.regression == pytest.approx(-0.25)
    assert point.verdict == "faster" and point.test.p_value < 1e-6
    latency_p50 = next(ch for ch in point.changes if ch.metric == "latency_p50")
    assert latency_p50.speedup == pytest.approx(latency_p50.base / latency_p50.new)
    assert not c.regressed


def test_compare_regression_exit_code(tmp_path):
    from trtbuild.cli import main

    rng = np.random.default_rng(1)
    base = result_file(tmp_path, "base", 1000.0, rng.normal(100, 5, 60), rng.normal(20, 2, 60))
    slower = result_file(tmp_path, "slower", 700.0, rng.normal(130, 5, 60), rng.normal(25, 2, 60))
    runner = CliRunner()
    result = runner.invoke(main, ["bench", "compare", str(base), str(slower), "--max-regression", "0.2"])
    assert result.exit_code == 1, result.output
    assert "concurrency 4: NEW is slower than BASE" in result.output
    # the same drop is tolerated under a looser threshold
    assert runner.invoke(main, ["bench", "compare", str(base), str(slower), "--max-regression", "0.35"]).exit_code == 0
    # and on a metric that did not regress past the threshold: 20 -> 25 ms TTFT p50 is +25 %
    loose = runner.invoke(main, ["bench", "compare", str(base), str(slower), "--metric", "ttft_p50", "--max-regression", "0.3"])
    assert loose.exit_code == 0, loose.output


def test_compare_no_significant_difference(tmp_path):
    rng = np.random.default_rng(2)
    samples = rng.normal(100, 5, 40)
    base = result_file(tmp_path, "base", 1000.0, samples, samples / 5)
    same = result_file(tmp_path, "same", 1010.0, samples[::-1].copy(), samples[::-1] / 5)
    c = compare(load_result(base), load_result(same))
    assert c.points[0].verdict == "no significant difference"
    assert c.points[0].test.p_value == pytest.approx(1.0)
    assert "no significant difference between NEW and BASE" in c.verdict_lines()[0]


def test_compare_rejects_unrelated_files(tmp_path):
    other = tmp_path / "x.json"
    other.write_text('{"hello": 1}')
    with pytest.raises(TrtbuildError, match="not a `trtbuild bench run` result"):
        load_result(other)
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"runs": [{"key": "c1", "metrics": {}}]}))
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"runs": [{"key": "c2", "metrics": {}}]}))
    with pytest.raises(TrtbuildError, match="share no load point"):
        compare(load_result(a), load_result(b))
    with pytest.raises(TrtbuildError, match="unknown"):
        compare(load_result(a), load_result(a), metric="speed")
