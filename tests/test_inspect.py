"""`trtbuild inspect`: parameters, weight and KV-cache bytes, the largest batch that fits, the plan."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from trtbuild.cli import main
from trtbuild.errors import TrtbuildError
from trtbuild.build.inspection import GIB, PRECISION_ROWS, inspect_path, kv_bytes_per_sequence
from test_engine import write_engine_dir, write_trtllm_checkpoint

LLAMA2_7B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "torch_dtype": "float16",
}
LLAMA3_8B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
}


def config_only(tmp_path, config, name="model"):
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


def cost(report, precision):
    return next(c for c in report.costs if c.precision == precision)


def test_tiny_checkpoint_counts_come_from_the_weights(tiny_checkpoint):
    from safetensors.torch import load_file

    tensors = load_file(str(tiny_checkpoint / "model.safetensors"))
    report = inspect_path(tiny_checkpoint, seq_len=256)
    assert report.parameters_source == "safetensors"
    assert report.parameters == sum(t.numel() for t in tensors.values())
    assert report.on_disk_bytes == (tiny_checkpoint / "model.safetensors").stat().st_size
    assert cost(report, "fp32").total_bytes == 4 * report.parameters  # the checkpoint is fp32
    assert cost(report, "fp16").total_bytes == 2 * report.parameters
    linear = sum(t.numel() for n, t in tensors.items() if t.dim() == 2 and ".layers." in n)
    assert cost(report, "int4_wo").linear_bytes == linear // 2
    assert report.precision == "fp32" and report.kind == "hf"
    assert report.plan and report.plan[0].startswith("trtbuild.build.quantize") and report.plan_error is None


def test_llama2_7b_from_its_config_alone(tmp_path):
    report = inspect_path(config_only(tmp_path, LLAMA2_7B), seq_len=4096, gpu_mem_gib=80)
    assert report.parameters_source == "config"
    assert report.parameters == pytest.approx(6.74e9, rel=0.01)
    assert report.kv_bytes_per_token == 2 * 32 * 32 * 128 * 2 == 512 * 1024  # 0.5 MiB per token in fp16
    assert report.kv_bytes_per_sequence == 4096 * 512 * 1024
    totals = {c.precision: c.total_bytes for c in report.costs}
    assert totals["fp16"] == 2 * report.parameters
    assert totals["int4_awq"] < totals["int8_wo"] < totals["fp16"] < totals["fp32"]
    assert cost(report, "int4_awq").scale_bytes > cost(report, "int4_wo").scale_bytes > 0
    assert report.plan_error and "has no weights yet" in report.plan_error


@pytest.mark.parametrize("precision", PRECISION_ROWS)
@pytest.mark.parametrize("gpu_mem_gib, seq_len", [(80, 4096), (24, 2048), (141, 8192)])
def test_largest_batch_is_the_largest_that_fits(tmp_path, precision, gpu_mem_gib, seq_len):
    report = inspect_path(config_only(tmp_path, LLAMA3_8B), seq_len=seq_len, gpu_mem_gib=gpu_mem_gib, plan=False)
    c = cost(report, precision)
    per_seq = kv_bytes_per_sequence(c.kv_bytes_per_token, seq_len, report.tokens_per_block)
    budget = report.kv_fraction * (gpu_mem_gib * GIB - c.per_gpu_bytes - report.reserve_bytes)
    assert c.max_batch * per_seq <= max(budget, 0) < (c.max_batch + 1) * per_seq


def test_gqa_kv_cache_and_tensor_parallelism(tmp_path):
    path = config_only(tmp_path, LLAMA3_8B)
    one = inspect_path(path, seq_len=100, plan=False)
    assert one.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 128 * 1024  # Llama-3-8B: 128 KiB per token
    assert one.kv_bytes_per_sequence == one.kv_bytes_per_token * 128  # 100 tokens occupy four blocks of 32
    two = inspect_path(path, seq_len=100, tp_size=2, plan=False)
    assert two.kv_bytes_per_token * 2 == one.kv_bytes_per_token
    assert cost(two, "fp16").per_gpu_bytes < cost(one, "fp16").per_gpu_bytes
    assert two.max_batch > one.max_batch
    fp8 = inspect_path(path, seq_len=100, kv_dtype="fp8", plan=False)
    assert fp8.kv_bytes_per_token * 2 == one.kv_bytes_per_token and fp8.kv_bytes == 1


def test_weights_larger_than_the_gpu_leave_no_batch(tmp_path):
    report = inspect_path(config_only(tmp_path, LLAMA2_7B), gpu_mem_gib=8, seq_len=2048, plan=False)
    assert cost(report, "fp16").max_batch == 0 and cost(report, "int4_awq").max_batch > 0


def test_exported_checkpoint_reports_its_own_precision_and_kv_cache(tiny_checkpoint, tmp_path):
    ckpt = write_trtllm_checkpoint(tmp_path / "ckpt", tiny_checkpoint, quant_algo="FP8", kv_cache_quant_algo="FP8")
    report = inspect_path(ckpt, seq_len=64)
    assert (report.kind, report.precision, report.kv_dtype, report.kv_bytes) == ("trtllm", "fp8", "fp8", 1)
    assert report.parameters_source == "config"
    assert not any(step.startswith("trtbuild.build.quantize") for step in report.plan)  # already exported: build only
    assert any("trtllm-build" in step for step in report.plan)


def test_engine_directory(tiny_checkpoint, tmp_path):
    engine = write_engine_dir(tmp_path / "engine", tiny_checkpoint, max_seq_len=192, tokens_per_block=64, tp=2)
    report = inspect_path(engine)
    assert (report.kind, report.seq_len, report.tokens_per_block, report.tp_size) == ("engine", 192, 64, 2)
    assert report.plan[-2].startswith(f"trtbuild repo {engine} --runtime tensorrtllm")


def test_a_build_that_would_be_refused_says_why(tiny_checkpoint):
    report = inspect_path(tiny_checkpoint, tp_size=3)
    assert report.plan == () and "--tp-size 3 does not divide num_attention_heads 4" in report.plan_error


def test_bad_arguments(tiny_checkpoint):
    with pytest.raises(TrtbuildError, match="--kv-dtype fp4"):
        inspect_path(tiny_checkpoint, kv_dtype="fp4")
    with pytest.raises(TrtbuildError, match="--kv-fraction in"):
        inspect_path(tiny_checkpoint, kv_fraction=1.5)


def test_cli_table_and_json(tiny_checkpoint, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", str(tiny_checkpoint), "--gpu-mem-gib", "24", "--seq-len", "512", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["gpu_mem_bytes"] == 24 * GIB and data["seq_len"] == 512
    assert [c["precision"] for c in data["costs"]] == list(PRECISION_ROWS)
    assert math.isclose(data["kv_bytes_per_sequence"], data["kv_bytes_per_token"] * 512)
    result = runner.invoke(main, ["inspect", str(tiny_checkpoint)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "max batch" in result.output and "plan:" in result.output and "int4_awq" in result.output
