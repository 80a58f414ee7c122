"""The GPU suite script runs every stage end to end; on this CPU machine with the tiny preset."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytestmark = pytest.mark.server


def test_gpu_suite_runs_every_stage_on_cpu(tiny_checkpoint, tmp_path):
    from bench import gpu_suite

    report = gpu_suite.main(["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--tokenizer", str(tiny_checkpoint),
                             "--input-len", "12", "--output-len", "8", "--static-batches", "1,2", "--concurrency", "1,3",
                             "--fp8-concurrency", "3", "--out", str(tmp_path)])
    assert all(stage["ok"] for stage in report["stages"].values()), report["stages"]
    paths = {r["path"] for r in report["rows"]}
    assert any(p.startswith("(a)") for p in paths) and any(p.startswith("(b)") for p in paths)
    assert any("ensemble" in p for p in paths) and any("llm_bls" in p for p in paths) and any(p.startswith("(d)") for p in paths)
    for row in report["rows"]:
        assert row["output_tokens_per_s"] > 0
        if row["ttft_p50_ms"] is not None:
            assert 0 < row["ttft_p50_ms"] <= row["latency_p50_ms"]
    assert 0 <= report["fp8_logits_delta_vs_bf16"]["top1_agreement"] <= 1
    assert json.loads((tmp_path / "suite.json").read_text())["rows"] == report["rows"]
    assert (tmp_path / "suite.csv").read_text().count("\n") == len(report["rows"]) + 1
    assert (tmp_path / "suite.png").stat().st_size > 10_000
