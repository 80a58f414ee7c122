"""`trtbuild ab` on two real local servers: the tiny repository, and the same build made slower on
purpose (fault_injection_step_delay_ms: a sleep after every engine step, so the slowdown does not
depend on how busy the machine's cores are). The verdict must come out right both ways round, a
failing candidate is rolled back on its error rate, and the split of the stream follows the seed.
The statistics and the verdict rules are also checked on synthetic samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from trtbuild.bench.ab import (Arm, SampleTests, Thresholds, assignment, bootstrap_ratio, decide, mann_whitney)
from trtbuild.bench.compare import welch
from trtbuild.bench.metrics import RequestRecord, summarize
from trtbuild.errors import TrtbuildError

from conftest import SLOW_MAX_INPUT_LEN as SLOW_MAX_INPUT, SLOW_STEP_DELAY_MS as DELAY_MS


def _entry(server) -> str:
    """The ensemble entry point, as the repository's trtbuild.json names it."""
    manifest = json.loads((server.repository / "trtbuild.json").read_text())
    return manifest["entrypoints"]["ensemble"]


def _ab(a, b, tmp_path, *extra: str):
    from trtbuild.cli import main

    out = tmp_path / "ab.json"
    args = ["ab", "--a", f"{a.grpc_url}/{_entry(a)}", "--b", f"{b.grpc_url}/{_entry(b)}", "--requests", "48",
            "--concurrency", "4", "--input-tokens-mean", "16", "--output-tokens-mean", "8", "--agreement-prompts", "3",
            "--json", str(out), *extra]
    result = CliRunner().invoke(main, args)
    assert out.exists(), result.output
    return result, json.loads(out.read_text())


@pytest.mark.server
def test_ab_rolls_back_a_slower_candidate_and_rolls_out_a_faster_one(tiny_server, slow_server, tmp_path):
    result, data = _ab(tiny_server, slow_server, tmp_path, "--split", "0.25", "--seed", "7")
    assert data["verdict"]["decision"] == "ROLLBACK", result.output
    assert result.exit_code == 1
    assert "B is significantly slower" in result.output and "verdict: ROLLBACK" in result.output
    # the stream split is the seeded one, and every request went to the arm it was drawn for
    to_b = assignment(48, 0.25, 7)
    assert data["b"]["request_indices"] == np.flatnonzero(to_b).tolist()
    assert sorted(data["a"]["request_indices"] + data["b"]["request_indices"]) == list(range(48))
    b = data["b"]["metrics"]
    assert b["completed"] == int(to_b.sum()) and b["failed"] == 0
    assert b["latency_ms"]["p50"] > data["a"]["metrics"]["latency_ms"]["p50"] + 4 * DELAY_MS  # >= 8 steps x the delay
    tests = data["tests"]["latency_ms"]
    assert tests["mann_whitney"]["p_value"] < 0.05 and tests["welch"]["p_value"] < 0.05
    assert tests["p99_ratio"]["low"] > 1  # B's p99 is larger, with confidence
    # the same weights: greedy answers agree token for token
    assert data["agreement"]["token_agreement"] == 1.0 and data["agreement"]["prompts"] == 3

    result, data = _ab(slow_server, tiny_server, tmp_path, "--split", "0.5", "--min-speedup", "1.5")
    assert data["verdict"]["decision"] == "ROLLOUT", result.output
    assert result.exit_code == 0
    assert data["verdict"]["speedup"] >= 1.5


@pytest.mark.server
def test_ab_rolls_back_a_candidate_that_fails(tiny_server, slow_server, tmp_path):
    """Prompts longer than B's max_input_len fail there: the error rate decides, whatever the speed."""
    from trtbuild.cli import main

    out = tmp_path / "ab.json"
    result = CliRunner().invoke(main, [
        "ab", "--a", f"{tiny_server.grpc_url}/{_entry(tiny_server)}", "--b", f"{slow_server.grpc_url}/{_entry(slow_server)}",
        "--split", "0.5", "--requests", "16", "--input-tokens-mean", str(SLOW_MAX_INPUT + 20), "--output-tokens-mean", "4",
        "--agreement-prompts", "0", "--json", str(out)])
    data = json.loads(out.read_text())
    assert result.exit_code == 1, result.output
    assert data["verdict"]["decision"] == "ROLLBACK"
    assert data["b"]["metrics"]["error_rate"] == 1.0 and data["a"]["metrics"]["error_rate"] == 0.0
    assert any("error rate 100.0%" in r for r in data["verdict"]["reasons"])


@pytest.mark.server
def test_ab_names_the_models_when_the_server_has_several(tiny_server):
    from trtbuild.cli import main

    result = CliRunner().invoke(main, ["ab", "--a", tiny_server.grpc_url, "--b", tiny_server.grpc_url, "--requests", "4"])
    assert result.exit_code == 2
    manifest = json.loads((tiny_server.repository / "trtbuild.json").read_text())
    for name in manifest["entrypoints"].values():
        assert name in result.output


# ---------------------------------------------------------------------------------------------
# Statistics and verdicts on synthetic samples
# ---------------------------------------------------------------------------------------------
def test_assignment_is_seeded_and_follows_the_split():
    a = assignment(10_000, 0.1, 3)
    assert np.array_equal(a, assignment(10_000, 0.1, 3))
    assert not np.array_equal(a, assignment(10_000, 0.1, 4))
    assert abs(a.mean() - 0.1) < 0.01


def test_mann_whitney_and_bootstrap():
    rng = np.random.default_rng(0)
    a = list(rng.lognormal(3.0, 0.3, 200))
    same = mann_whitney("latency_ms", a, list(rng.lognormal(3.0, 0.3, 200)))
    slower = mann_whitney("latency_ms", a, [x * 1.5 for x in rng.lognormal(3.0, 0.3, 200)])
    assert same.p_value > 0.01 and slower.p_value < 1e-6
    assert mann_whitney("x", [1.0, 1.0], [1.0, 1.0]).p_value == 1.0
    assert mann_whitney("x", [1.0], [2.0, 3.0]).p_value is None
    b = [x * 2 for x in a]
    interval = bootstrap_ratio(a, b, resamples=500, seed=1)
    assert interval.ratio == pytest.approx(2.0) and 1.5 < interval.low < 2.0 < interval.high < 2.5  # arms resampled apart
    noisy = bootstrap_ratio(a, list(rng.lognormal(3.0, 0.3, 200)), resamples=500)
    assert noisy.low < noisy.ratio < noisy.high
    assert bootstrap_ratio(a, b, resamples=500, seed=1) == interval  # seeded


def _records(latencies_ms, fail=0):
    out = []
    for i, ms in enumerate(latencies_ms):
        out.append(RequestRecord(index=i, send=0.0, arrivals=[ms / 2e3, ms / 1e3], end=ms / 1e3, output_tokens=4))
    out += [RequestRecord(index=len(out) + k, send=0.0, error="boom") for k in range(fail)]
    return out


def _decide(a_ms, b_ms, thresholds=Thresholds(), fail=0, agreement=None):
    ra, rb = _records(a_ms), _records(b_ms, fail)
    ma, mb = summarize(ra, streaming=True), summarize(rb, streaming=True)
    x, y = [r.latency * 1e3 for r in ra if r.ok], [r.latency * 1e3 for r in rb if r.ok]
    tests = {"latency_ms": SampleTests("latency_ms", len(x), len(y), welch("latency_ms", x, y),
                                       mann_whitney("latency_ms", x, y), bootstrap_ratio(x, y, resamples=200))}
    return decide(ma, mb, tests, "latency_p50", thresholds, agreement)


def test_verdicts():
    rng = np.random.default_rng(1)
    base = list(rng.normal(100, 5, 60))
    faster = [x * 0.7 for x in rng.normal(100, 5, 60)]
    slower = [x * 1.3 for x in rng.normal(100, 5, 60)]
    same = list(rng.normal(100, 5, 60))
    assert _decide(base, faster).decision == "ROLLOUT"
    assert _decide(base, faster).exit_code == 0
    assert _decide(base, slower).decision == "ROLLBACK"
    assert _decide(base, slower).exit_code == 1
    assert _decide(base, faster, Thresholds(min_speedup=2.0)).decision == "HOLD"  # faster, but not by enough
    held = _decide(base, base[:3])
    assert held.decision == "HOLD" and held.exit_code == 3  # too few requests to tell
    assert _decide(base, same, Thresholds(alpha=0.001)).decision == "HOLD"
    assert _decide(base, slower, Thresholds(min_speedup=0.5)).decision == "ROLLOUT"  # slower, and that is allowed
    assert _decide(base, faster, fail=2).decision == "ROLLBACK"  # 2 of 62 failed > 1%
    assert _decide(base, faster, Thresholds(max_error_rate=0.05), fail=2).decision == "ROLLOUT"
    rolled = _decide(base, faster, Thresholds(min_agreement=0.9), agreement=0.5)
    assert rolled.decision == "ROLLBACK" and "agreement" in rolled.reasons[0]


def test_arm_and_threshold_errors():
    assert Arm.parse("http://127.0.0.1:8001/ensemble/", "--a") == Arm("127.0.0.1:8001", "ensemble")
    assert Arm.parse("127.0.0.1:8001", "--a").model is None
    with pytest.raises(TrtbuildError, match="--b 'ensemble'"):
        Arm.parse("ensemble", "--b")
    with pytest.raises(TrtbuildError, match="--alpha"):
        Thresholds(alpha=1.5)
