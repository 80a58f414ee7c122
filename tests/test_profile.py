"""`trtbuild profile` of the real runtime on CPU with the tiny model: the operator table, the shares by
kind of work with their advice, memory peaks, and the Chrome trace with prefill and decode ranges."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from trtbuild.bench.profile import ADVICE, ProfileConfig, _is_operator, _kind, engine_config
from trtbuild.errors import TrtbuildError


def test_profile_a_repository_on_cpu(tiny_repository, tmp_path):
    from trtbuild.cli import main

    out = tmp_path / "prof"
    result = CliRunner().invoke(main, ["profile", str(tiny_repository), "--device", "cpu", "--batch", "8", "--input-tokens", "24",
                                       "--output-tokens", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "profile.json").read_text())
    assert data["config"]["batch"] == 4  # capped at the repository's max_batch_size
    assert data["steps"] == 4 and data["prefill_ms"] > 0 and data["decode_ms_per_step"] > 0
    ops = data["operators"]
    assert ops and all(_is_operator(o["name"]) for o in ops)
    assert [o["self_ms"] for o in ops] == sorted((o["self_ms"] for o in ops), reverse=True)
    assert 0 < sum(o["share"] for o in ops) <= 1 + 1e-9
    assert "aten::mm" in {o["name"] for o in ops if o["kind"] == "GEMM"}
    assert any(o["kind"] == "attention" for o in ops)
    assert set(data["kinds"]) == {"attention", "sampling", "GEMM", "host"}
    assert data["memory"]["peak_rss_mib"] > 50
    for line in data["bottlenecks"]:  # each names its share and the option that addresses it
        assert "%" in line and any(advice in line for advice in ADVICE.values()), line
    assert data["bottlenecks"], data["kinds"]
    assert "| operator | kind | calls | self ms | share |" in (out / "profile.md").read_text()
    trace = json.loads((out / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"prefill", "decode", "model_runner.run"} <= names


def test_profile_sources_and_kinds(tiny_checkpoint, tmp_path):
    config, batch = engine_config(tiny_checkpoint, "cpu", 3, 40)
    assert (config.model, config.max_batch_size, batch) == (str(tiny_checkpoint), 3, 3)
    with pytest.raises(TrtbuildError, match="neither a checkpoint"):
        engine_config(tmp_path, "cpu", 1, 8)
    assert _kind("aten::index", ["trtbuild_runtime/attention.py(75): gather_pages"]) == "attention"
    assert _kind("aten::addmm") == "GEMM" and _kind("aten::topk") == "sampling" and _kind("aten::add") is None
    assert not _is_operator("trtbuild_runtime/engine.py(90): step") and not _is_operator("decode")
    with pytest.raises(TrtbuildError, match="must be >= 1"):
        from trtbuild.bench.profile import profile

        profile(ProfileConfig(tiny_checkpoint, "cpu", 0))


def test_an_unreadable_frame_name_is_retried_then_refused(tiny_checkpoint, monkeypatch):
    """torch's Python tracer now and then records a frame name of garbage bytes: a new pass, then a clear error."""
    from trtbuild.bench import profile as module

    calls = []

    def unreadable(*args):
        calls.append(args)
        raise UnicodeDecodeError("utf-8", b"\x90", 0, 1, "invalid start byte")

    monkeypatch.setattr(module, "_profiled_steps", unreadable)
    with pytest.raises(TrtbuildError, match=f"unreadable frame name {module.PROFILE_ATTEMPTS} times"):
        module.profile(ProfileConfig(tiny_checkpoint, "cpu", 1, input_tokens=8, output_tokens=2))
    assert len(calls) == module.PROFILE_ATTEMPTS
