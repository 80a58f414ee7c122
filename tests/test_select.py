"""`trtbuild select` from measured results: two real builds (the tiny repository and its deliberately
slower twin) benchmarked with `trtbuild bench run` and validated online with `trtbuild validate`,
then chosen from by throughput and by p99 under an SLO; and the constraint, Pareto and naming rules
on copies of those results whose accuracy metrics are set by hand."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from trtbuild.bench.metrics import SLO
from trtbuild.bench.select import Constraints, load_build, pareto_front, select


def _entry(server) -> str:
    return json.loads((server.repository / "trtbuild.json").read_text())["entrypoints"]["ensemble"]


@pytest.fixture(scope="module")
def measured(tiny_server, slow_server, tiny_checkpoint, tmp_path_factory):
    """results/{fast,slow}/bench/results.json and validate/report.json, measured on the two servers."""
    from trtbuild.cli import main

    root = tmp_path_factory.mktemp("results")
    for name, server in (("fast", tiny_server), ("slow", slow_server)):
        bench = CliRunner().invoke(main, [
            "bench", "run", "--url", server.grpc_url, "--model", _entry(server), "--concurrency", "1,4", "--requests", "12",
            "--input-tokens-mean", "16", "--output-tokens-mean", "8", "--metrics-url", server.metrics_url,
            "--out", str(root / name / "bench"), "--no-plots"])
        assert bench.exit_code == 0, bench.output
        validate = CliRunner().invoke(main, [
            "validate", str(tiny_checkpoint), "--server", server.grpc_url, "--model", _entry(server), "--max-new-tokens", "8",
            "--no-log-probs", "--out", str(root / name / "validate")])
        assert validate.exit_code == 0, validate.output
    return root


@pytest.mark.server
def test_select_picks_the_faster_build_and_says_why_the_other_lost(measured, tmp_path):
    from trtbuild.cli import main

    out = tmp_path / "select.json"
    result = CliRunner().invoke(main, ["select", str(measured / "fast"), str(measured / "slow"), "--min-token-agreement", "0.95",
                                       "--plot", str(tmp_path / "pareto.png"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["chosen"] == "fast" and "selected: fast" in result.output
    fast, slow = data["builds"]
    assert fast["token_agreement"] == slow["token_agreement"] == 1.0  # the same weights, served greedy
    assert fast["objective"] > slow["objective"] > 0
    assert fast["memory_gib"] is None  # no GPU here: bench noted it could not read GPU memory
    assert "output tokens/s" in slow["why_lost"] and "for fast" in slow["why_lost"]
    assert "slow lost: output tokens/s" in result.output
    # equal accuracy: the faster build dominates, alone on the front
    assert fast["pareto"] and not slow["pareto"]
    assert (tmp_path / "pareto.png").stat().st_size > 10_000

    # p99 at one load point, and an SLO the slow build's p99 cannot meet (8 steps x 25 ms of delay)
    result = CliRunner().invoke(main, ["select", str(measured / "slow"), str(measured / "fast"), "--objective", "p99",
                                       "--load", "c4", "--slo", "latency_ms=180"])
    assert "selected: fast" in result.output, result.output
    assert "slow lost: c4: latency_ms p99" in result.output and "> SLO 180" in result.output

    # --max-memory-gib needs a measured memory: none was, so no build qualifies
    result = CliRunner().invoke(main, ["select", str(measured / "fast"), str(measured / "slow"), "--max-memory-gib", "10"])
    assert result.exit_code == 1 and "memory not measured" in result.output


def _build(measured, tmp_path, name, source, **metrics):
    """A copy of a measured build whose validate metrics are replaced by `metrics`."""
    folder = tmp_path / name
    shutil.copytree(measured / source, folder)
    report_path = folder / "validate" / "report.json"
    report = json.loads(report_path.read_text())
    report["variants"][0]["metrics"].update(metrics)
    report_path.write_text(json.dumps(report))
    return load_build(f"{name}={folder}")


@pytest.mark.server
def test_constraints_pareto_and_reasons(measured, tmp_path):
    fp32 = _build(measured, tmp_path, "fp32", "slow", ppl_delta_rel=0.0, token_agreement=1.0)
    int8 = _build(measured, tmp_path, "int8", "fast", ppl_delta_rel=0.03, token_agreement=0.6)
    int4 = _build(measured, tmp_path, "int4", "fast", ppl_delta_rel=0.4, token_agreement=0.1)
    chosen = select([fp32, int8, int4])
    assert chosen.chosen.build.name == "int8"  # int8 and int4 measured the same speed: the tie goes to the more accurate
    fronts = {c.build.name: c.on_front for c in chosen.candidates}
    assert fronts == {"fp32": True, "int8": True, "int4": False}
    reasons = {c.build.name: c.why_lost for c in chosen.candidates}
    assert "on the Pareto front: more accurate" in reasons["fp32"]

    strict = select([fp32, int8, int4], constraints=Constraints(max_ppl_delta=0.01))
    assert strict.chosen.build.name == "fp32"
    reasons = {c.build.name: c.why_lost for c in strict.candidates}
    assert reasons["int8"] == "ppl delta +3.00% > --max-ppl-delta 1.00%"
    agreement = select([fp32, int8, int4], constraints=Constraints(min_token_agreement=0.5))
    assert agreement.chosen.build.name == "int8"
    assert "token agreement 10.0% < --min-token-agreement 50.0%" in {c.build.name: c.why_lost for c in agreement.candidates}["int4"]
    nothing = select([fp32, int8], constraints=Constraints(slo=SLO(ttft_ms=0.001)))
    assert nothing.chosen is None and all(c.failures for c in nothing.candidates)
    cost = select([fp32, int8], objective="cost", gpu_hourly_cost=2.0)
    assert cost.chosen.build.name == "int8" and 0 < cost.chosen.value < cost.candidates[0].value
    assert select([fp32], objective="cost").candidates[0].failures == ["cost not measured: pass --gpu-hourly-cost (or bench with it)"]


def test_pareto_front():
    assert pareto_front([(10, 0.0), (20, 0.1), (15, 0.2), (20, 0.1)], True) == [True, True, False, True]
    assert pareto_front([(10, 0.0), (20, 0.1)], False) == [True, False]


def test_select_errors(tmp_path):
    from trtbuild.cli import main

    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["select", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "no `trtbuild bench run` results.json" in result.output
    (tmp_path / "x.json").write_text("{}")
    result = CliRunner().invoke(main, ["select", str(tmp_path / "x.json")])
    assert result.exit_code == 2 and "is not a `trtbuild bench run` result" in result.output
    result = CliRunner().invoke(main, ["select", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output
