"""The GPU suite script runs every stage end to end; on this CPU machine with the tiny preset."""

import json

import pytest

pytestmark = pytest.mark.server


def test_gpu_suite_runs_every_stage_on_cpu(tiny_checkpoint, tmp_path):
    from bench import gpu_suite

    report = gpu_suite.main(["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--tokenizer", str(tiny_checkpoint),
                             "--input-len", "12", "--output-len", "8", "--static-batches", "1,2", "--concurrency", "1,3",
                             "--triton-concurrency", "2", "--agreement-prompts", "4",
                             "--stages", "hf_static,engine,agreement,profile,triton", "--out", str(tmp_path)])
    assert all(stage["ok"] for stage in report["stages"].values()), report["stages"]
    paths = {r["path"] for r in report["rows"]}
    assert {"HF generate, static batch, eager", "trtbuild_runtime direct", "Triton ensemble, gRPC streaming",
            "Triton llm_bls, gRPC streaming"} <= paths
    for row in report["rows"]:
        assert row["output_tokens_per_s"] > 0 and 0 < row["bound_fraction"]
        if row["ttft_p50_ms"] is not None:
            assert 0 < row["ttft_p50_ms"] <= row["latency_p50_ms"]
    assert report["agreement"]["token_agreement"] == 1.0  # float32 on CPU: the engine is generate, token for token
    assert report["agreement"]["teacher_forced_agreement"] == 1.0
    assert report["profile"]["3"]["step_ms"] > 0 if "3" in report["profile"] else report["profile"][3]["step_ms"] > 0
    saved = json.loads((tmp_path / "suite.json").read_text())
    assert saved["rows"] == report["rows"] and saved["goals"] == report["goals"]
    assert (tmp_path / "suite.png").stat().st_size > 10_000


def test_engine8b_stage_runs_alone_on_cpu(tmp_path):
    """`--stages engine8b` needs no tokenizer: a tiny model of the Llama-3.1 shape family, every mode's rows and bytes."""
    from bench import gpu_suite

    report = gpu_suite.main(["--stages", "engine8b", "--engine8b-shape", "tiny", "--device", "cpu", "--dtype", "float32",
                             "--engine8b-concurrency", "1,3", "--engine8b-agreement", "2", "--input-len", "12",
                             "--output-len", "6", "--engine8b-modes", "bf16,fp8,int4_awq,int4_gptq", "--engine8b-profile", "bf16",
                             "--engine8b-int4-concurrency", "1",
                             "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "engine8b.json").read_text())
    assert [(r["mode"], r["concurrency"]) for r in saved["rows"]] == [("bf16", 1), ("bf16", 3), ("fp8", 1), ("fp8", 3),
                                                                       ("int4_awq", 1), ("int4_gptq", 1)]
    assert saved["modes"]["int4_awq"]["weight_bytes"] == saved["modes"]["int4_gptq"]["weight_bytes"]
    for row in saved["rows"]:
        assert row["output_tokens_per_s"] > 0 and row["preemptions"] == 0
        assert 0 < row["bandwidth_bound_fraction"] and 0 < row["compute_bound_fraction"]
    assert saved["modes"]["fp8"]["weight_bytes"] < saved["modes"]["bf16"]["weight_bytes"]
    assert report["agreement"]["teacher_forced_agreement"] == 1.0  # float32 on CPU
    assert "1" in saved["modes"]["bf16"]["profile"]
