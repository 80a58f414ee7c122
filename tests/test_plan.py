"""Capacity planning on a synthetic sweep whose answers are worked out by hand in each test."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from trtbuild.cli import main
from trtbuild.errors import TrtbuildError
from trtbuild.deploy.plan import Objectives, capacity, make_plan, sweep_from_bench

# concurrency, requests/s, ttft p95, ttft p99, itl p95 (ms); 128 output tokens per request everywhere
SWEEP = (
    (1, 2.0, 50.0, 70.0, 10.0),
    (2, 3.8, 60.0, 120.0, 12.0),
    (4, 7.0, 100.0, 250.0, 16.0),
    (8, 11.0, 300.0, 600.0, 30.0),
    (16, 12.0, 900.0, 1500.0, 60.0),
)


def bench(rows=SWEEP, errors: dict[int, float] | None = None, kind: str = "concurrency") -> dict:
    """The `trtbuild bench` JSON layout: runs[].load and runs[].metrics with percentile dicts."""
    runs = []
    for c, rps, ttft95, ttft99, itl95 in rows:
        runs.append({
            "key": f"c{c}", "label": f"concurrency {c}",
            "load": {"concurrency": c if kind == "concurrency" else None,
                     "request_rate": c if kind == "request_rate" else None, "arrival": "poisson", "max_concurrency": None},
            "metrics": {"completed": 100, "failed": 0, "requests_per_s": rps, "output_tokens_per_s": rps * 128,
                        "error_rate": (errors or {}).get(c, 0.0),
                        "ttft_ms": {"p50": ttft95 / 2, "p95": ttft95, "p99": ttft99},
                        "itl_ms": {"p50": itl95 / 2, "p95": itl95, "p99": itl95 * 1.5},
                        "latency_ms": {"p95": ttft95 + 127 * itl95}},
        })
    return {"tool": "trtbuild bench", "target": {"model": "ensemble"}, "runs": runs}


def test_interpolates_between_the_last_passing_and_first_failing_run():
    # c4 passes (ttft 100, itl 16), c8 fails both: ttft t = (200-100)/(300-100) = 0.5,
    # itl t = (25-16)/(30-16) = 0.64; the smaller wins: 7 + 0.5 * (11 - 7) = 9 req/s at concurrency 6.
    cap = capacity(sweep_from_bench(bench()), Objectives({"ttft_ms": 200, "itl_ms": 25}))
    assert cap.requests_per_s == pytest.approx(9.0)
    assert cap.load == pytest.approx(6.0)
    assert cap.limited_by == "ttft_ms" and cap.bounded
    assert cap.between == ("concurrency 4", "concurrency 8")
    assert cap.output_tokens_per_request == pytest.approx(128)


def test_plan_replicas_cost_and_hpa():
    # 40 req/s, 20 % headroom: 9 * 0.8 = 7.2 usable per replica -> ceil(40 / 7.2) = ceil(5.56) = 6 replicas,
    # 2 GPUs each = 12 GPUs, at 2.5 USD = 30 USD/h; per 1k requests 30 / (40 * 3600) * 1000 = 0.20833;
    # per 1M tokens 30 / (40 * 128 * 3600) * 1e6 = 1.62760; HPA max for 80 req/s: ceil(80 / 7.2) = 12.
    plan = make_plan(sweep_from_bench(bench()), Objectives({"ttft_ms": 200, "itl_ms": 25}), 40.0, headroom=0.2,
                     gpus_per_replica=2, gpu_hourly_cost=2.5)
    assert (plan.replicas, plan.gpus, plan.hpa_min, plan.hpa_max) == (6, 12, 6, 12)
    assert plan.cost_per_hour == pytest.approx(30.0)
    assert plan.cost_per_1k_requests == pytest.approx(30 / (40 * 3600) * 1000)
    assert plan.cost_per_1m_output_tokens == pytest.approx(30 / (40 * 128 * 3600) * 1e6)
    assert plan.to_json()["utilisation_at_target"] == pytest.approx(40 / 54)


def test_exact_fit_needs_no_extra_replica():
    # 9 req/s capacity, no headroom: 36 req/s is exactly 4 replicas, 36.01 needs 5.
    sweep, slo = sweep_from_bench(bench()), Objectives({"ttft_ms": 200, "itl_ms": 25})
    assert make_plan(sweep, slo, 36.0, headroom=0.0).replicas == 4
    assert make_plan(sweep, slo, 36.01, headroom=0.0).replicas == 5


def test_the_tighter_metric_and_the_percentile_decide():
    # itl 20 only: t = (20-16)/(30-16) = 2/7 -> 7 + 8/7 = 57/7 req/s at concurrency 4 + 8/7 = 36/7
    cap = capacity(sweep_from_bench(bench()), Objectives({"itl_ms": 20}))
    assert cap.requests_per_s == pytest.approx(57 / 7) and cap.load == pytest.approx(36 / 7)
    assert cap.limited_by == "itl_ms"
    # ttft 200 at p99: c2 (120) passes, c4 (250) fails: t = 80/130 -> 3.8 + 8/13 * 3.2
    cap = capacity(sweep_from_bench(bench()), Objectives({"ttft_ms": 200}, percentile=99))
    assert cap.requests_per_s == pytest.approx(3.8 + 8 / 13 * 3.2)


def test_error_rate_counts_as_a_miss():
    # latency passes everywhere; c8 fails 5 % of requests: t = (0.01 - 0) / (0.05 - 0) = 0.2 -> 7 + 0.8 = 7.8
    cap = capacity(sweep_from_bench(bench(errors={8: 0.05})), Objectives({"ttft_ms": 1000, "itl_ms": 100}))
    assert cap.requests_per_s == pytest.approx(7.8) and cap.limited_by == "error_rate"


def test_a_run_that_completed_nothing_fails_and_capacity_never_drops_below_a_passing_run():
    data = bench()
    data["runs"].append({"key": "c32", "label": "concurrency 32", "load": {"concurrency": 32},
                         "metrics": {"completed": 0, "failed": 50, "requests_per_s": 0.0, "output_tokens_per_s": 0.0,
                                     "error_rate": 1.0, "ttft_ms": None, "itl_ms": None, "latency_ms": None}})
    # c16 passes (ttft 900, itl 60), c32 fails on errors: t = 0.01 -> 12 + 0.01 * (0 - 12) < 12, floored at 12
    cap = capacity(sweep_from_bench(data), Objectives({"ttft_ms": 1000, "itl_ms": 100}))
    assert cap.requests_per_s == pytest.approx(12.0) and cap.load == pytest.approx(16.16)


def test_a_sweep_that_never_reaches_the_slo_gives_a_lower_bound():
    cap = capacity(sweep_from_bench(bench()), Objectives({"ttft_ms": 5000, "itl_ms": 100}))
    assert cap.requests_per_s == 12.0 and not cap.bounded and cap.limited_by is None


def test_errors_say_what_to_do():
    with pytest.raises(TrtbuildError, match="lightest load .*ttft_ms 50 > 40"):
        capacity(sweep_from_bench(bench()), Objectives({"ttft_ms": 40}))
    no_itl = bench()
    for run in no_itl["runs"]:
        run["metrics"]["itl_ms"] = None
    with pytest.raises(TrtbuildError, match="no itl_ms p95.*streamed"):
        capacity(sweep_from_bench(no_itl), Objectives({"itl_ms": 25}))
    mixed = bench()
    mixed["runs"] += bench(kind="request_rate")["runs"][:1]
    with pytest.raises(TrtbuildError, match="mixes concurrency and request-rate"):
        sweep_from_bench(mixed)
    with pytest.raises(TrtbuildError, match="unknown key"):
        Objectives({"tpot_ms": 3})
    with pytest.raises(TrtbuildError, match="--headroom"):
        make_plan(sweep_from_bench(bench()), Objectives({"ttft_ms": 200}), 10, headroom=1.0)


def test_reads_what_the_benchmark_writes():
    from test_monitoring import bench_result

    data = bench_result()
    sweep = sweep_from_bench(data)
    assert sweep.load_kind == "concurrency" and [p.load for p in sweep.points] == [1, 4]
    for point, run in zip(sweep.points, data["runs"]):
        assert point.requests_per_s == run["metrics"]["requests_per_s"] > 0
        assert point.value("ttft_ms", 95) == run["metrics"]["ttft_ms"]["p95"]
        assert point.value("itl_ms", 99) == run["metrics"]["itl_ms"]["p99"]


def test_cli(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench()))
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(main, ["plan", str(path), "--rps", "40", "--slo", "ttft_ms=200,itl_ms=25",
                                       "--gpu-hourly-cost", "2.5", "--gpus-per-replica", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    plan = json.loads(out.read_text())
    assert (plan["replicas"], plan["gpus"], plan["hpa_max"]) == (6, 12, 12)
    assert plan["capacity"]["requests_per_s"] == pytest.approx(9.0)
    bad = CliRunner().invoke(main, ["plan", str(path), "--rps", "40", "--slo", "ttft=200"])
    assert bad.exit_code == 2 and "--slo" in bad.output
