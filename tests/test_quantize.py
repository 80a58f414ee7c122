"""trtbuild quantize: ModelOpt quantization, TensorRT-LLM / HF export, logits delta and manifest.

The tiny random checkpoint gives meaningless quality numbers, so its runs are checked for structure
(files, config.json, rank files, weight dtypes, manifest) under a relaxed tolerance; the trained
SmolLM2-135M is checked against the real per-precision tolerance in one slow test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import safe_open

from trtbuild.errors import TrtbuildError
from trtbuild.manifest import MANIFEST_NAME, file_hashes, read_manifest, verify_manifest, write_manifest
from trtbuild.build.quantize import (DEFAULT_CALIBRATION, PRECISIONS, QuantizeOptions, Tolerance, complete_trtllm_config,
                              plan, quantize, tolerance_for)
from trtbuild.spec import ModelSpec

# Relaxed: a 2-layer random model still keeps most top-1 predictions under every precision.
RELAXED = Tolerance(max_mean_kl=0.5, min_top1=0.3)
SMALL = dict(calib_size=6, eval_size=4, calib_max_len=48, tolerance=RELAXED)

# TensorRT-LLM QuantAlgo each precision must declare, and the dtype of an exported attention weight.
TRTLLM = {
    "fp16": (None, "float16"),
    "bf16": (None, "bfloat16"),
    "fp8": ("FP8", "float8_e4m3fn"),
    "int8_sq": ("W8A8_SQ_PER_CHANNEL", "int8"),
    "int8_wo": ("W8A16", "float16"),  # trtllm-build quantizes weight-only precisions itself
    "int4_wo": ("W4A16", "float16"),
    "int4_awq": ("W4A16_AWQ", "int8"),  # two int4 values per byte
}
HF = {"fp16": None, "bf16": None, "fp8": "FP8", "int8_sq": "W8A8_SQ_PER_CHANNEL", "int8_wo": "W8A16",
      "int4_wo": "W4A16_AWQ", "int4_awq": "W4A16_AWQ"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hf_config(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "config.json").read_text())


def options(precision: str, **overrides) -> QuantizeOptions:
    # The tiny model's 64-wide GEMMs only take the 64 group size.
    block = 64 if precision == "int4_awq" or (precision == "int4_wo" and overrides.get("format") == "hf") else None
    return QuantizeOptions(precision=precision, **{"block_size": block, **SMALL, **overrides})


def check_manifest(out: Path, result, opts: QuantizeOptions) -> dict:
    manifest = read_manifest(out)
    assert manifest["precision"] == opts.precision and manifest["format"] == opts.format
    assert manifest["kv_cache_dtype"] == opts.kv_cache_dtype
    assert (manifest["quant_algo"], manifest["kv_cache_quant_algo"]) == (result.quant_algo, result.kv_cache_quant_algo)
    assert manifest["tp_size"] == opts.tp_size and manifest["pp_size"] == opts.pp_size
    calibration = manifest["calibration"]
    assert calibration["sha256"] == sha256(DEFAULT_CALIBRATION)
    assert calibration["eval_samples"] == opts.eval_size
    assert calibration["total_samples"] == sum(1 for line in DEFAULT_CALIBRATION.read_text().splitlines() if line.strip())
    assert set(manifest["tools"]) >= {"torch", "transformers", "nvidia-modelopt"}
    assert all(manifest["tools"][k] for k in ("torch", "transformers", "nvidia-modelopt"))
    files = {p.relative_to(out).as_posix(): sha256(p) for p in out.rglob("*") if p.is_file() and p.name != MANIFEST_NAME}
    assert manifest["files"] == files
    verify_manifest(out)
    delta = manifest["delta"]
    for key in ("max_abs_diff", "mean_abs_diff", "top1_agreement", "mean_kl"):
        assert delta[key] == getattr(result.delta, key)
    assert delta["tokens"] > delta["samples"] == opts.eval_size
    assert manifest["tolerance"] == dataclasses.asdict(opts.tolerance)
    assert result.delta.within(opts.tolerance)
    return manifest


def check_tokenizer(out: Path, checkpoint: Path) -> None:
    assert sha256(out / "tokenizer.json") == sha256(checkpoint / "tokenizer.json")
    assert (out / "tokenizer_config.json").is_file()


# ------------------------------------------------------------------------------------ every precision
@pytest.mark.parametrize("precision", PRECISIONS)
def test_trtllm_export_every_precision(precision, tiny_checkpoint, tmp_path):
    out = tmp_path / precision
    opts = options(precision)
    result = quantize(tiny_checkpoint, out, opts)
    quant_algo, weight_dtype = TRTLLM[precision]

    config = json.loads((out / "config.json").read_text())
    source = hf_config(tiny_checkpoint)
    assert config["architecture"] == "LlamaForCausalLM"
    assert config["dtype"] == ("bfloat16" if precision == "bf16" else "float16")
    assert config["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1}
    assert config["quantization"]["quant_algo"] == quant_algo == result.quant_algo
    assert config["quantization"]["kv_cache_quant_algo"] is None
    assert config["quantization"].get("group_size") == (64 if precision == "int4_awq" else None)
    assert config["rotary_base"] == source["rope_parameters"]["rope_theta"]
    assert config["rotary_scaling"] is None
    assert config["num_hidden_layers"] == source["num_hidden_layers"]
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == ["rank0.safetensors"]
    with safe_open(out / "rank0.safetensors", "pt") as f:
        assert str(f.get_slice("transformer.layers.0.attention.qkv.weight").get_dtype()).lower() in (
            weight_dtype, {"float8_e4m3fn": "f8_e4m3", "float16": "f16", "bfloat16": "bf16", "int8": "i8"}[weight_dtype])
    check_tokenizer(out, tiny_checkpoint)
    manifest = check_manifest(out, result, opts)
    assert manifest["weights_quantized_by"] == {"fp16": None, "bf16": None, "int8_wo": "trtllm-build",
                                                "int4_wo": "trtllm-build"}.get(precision, "modelopt")
    if precision == "fp16":
        assert result.delta.mean_kl < 1e-4 and result.delta.top1_agreement > 0.99  # rounding to fp16 only


@pytest.mark.parametrize("precision", PRECISIONS)
def test_hf_export_every_precision(precision, tiny_checkpoint, tmp_path):
    out = tmp_path / precision
    opts = options(precision, format="hf")
    result = quantize(tiny_checkpoint, out, opts)

    config = json.loads((out / "config.json").read_text())
    dtype = "bfloat16" if precision == "bf16" else "float16"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == config["torch_dtype"] == dtype
    assert config["rope_theta"] == hf_config(tiny_checkpoint)["rope_parameters"]["rope_theta"]
    assert (out / "model.safetensors").is_file() and not list(out.glob("rank*.safetensors"))
    hf_quant = out / "hf_quant_config.json"
    if HF[precision] is None:
        assert not hf_quant.exists() and "quantization_config" not in config
    else:
        assert json.loads(hf_quant.read_text())["quantization"]["quant_algo"] == HF[precision] == result.quant_algo
        assert config["quantization_config"]["quant_algo"] == HF[precision]
    check_tokenizer(out, tiny_checkpoint)
    check_manifest(out, result, opts)


def test_hf_export_loads_in_transformers(tiny_checkpoint, tmp_path):
    import torch
    import transformers

    quantize(tiny_checkpoint, tmp_path / "bf16", options("bf16", format="hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 30]])
    with torch.no_grad():
        same = (model(ids).logits.argmax(-1) == reference(ids).logits.argmax(-1)).float().mean()
    assert model.dtype == torch.bfloat16 and same >= 0.8


# ------------------------------------------------------------------------------------ KV cache, ranks
@pytest.mark.parametrize("precision, kv, tp, pp", [
    ("fp8", "fp8", 2, 1),
    ("int8_sq", "int8", 1, 2),
    ("fp16", "int8", 1, 1),
    ("int8_wo", "fp8", 2, 1),
])
def test_kv_cache_and_rank_files(precision, kv, tp, pp, tiny_checkpoint, tmp_path):
    out = tmp_path / "ckpt"
    opts = options(precision, kv_cache_dtype=kv, tp_size=tp, pp_size=pp)
    result = quantize(tiny_checkpoint, out, opts)
    config = json.loads((out / "config.json").read_text())
    assert config["mapping"] == {"world_size": tp * pp, "tp_size": tp, "pp_size": pp}
    assert config["quantization"]["quant_algo"] == TRTLLM[precision][0]
    assert config["quantization"]["kv_cache_quant_algo"] == {"fp8": "FP8", "int8": "INT8"}[kv] == result.kv_cache_quant_algo
    assert config["num_hidden_layers"] == 2
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == [f"rank{r}.safetensors" for r in range(tp * pp)]
    layers = []
    for rank in range(tp * pp):
        with safe_open(out / f"rank{rank}.safetensors", "pt") as f:
            keys = list(f.keys())
        assert any(k.endswith("attention.kv_cache_scaling_factor") for k in keys)
        layers.append({k.split(".")[2] for k in keys if k.startswith("transformer.layers.")})
    assert all(len(ls) == 2 // pp for ls in layers)
    check_manifest(out, result, opts)


def test_fp8_kv_cache_with_hf_export(tiny_checkpoint, tmp_path):
    result = quantize(tiny_checkpoint, tmp_path / "out", options("fp8", kv_cache_dtype="fp8", format="hf"))
    hf_quant = json.loads((tmp_path / "out" / "hf_quant_config.json").read_text())["quantization"]
    assert (hf_quant["quant_algo"], hf_quant["kv_cache_quant_algo"]) == ("FP8", "FP8") == (result.quant_algo,
                                                                                         result.kv_cache_quant_algo)


# ------------------------------------------------------------------------------------ rope
def test_rope_parameters_written_to_trtllm_config(tiny_checkpoint, tmp_path):
    """transformers 5 keeps rope in rope_parameters, which ModelOpt's exporter does not read."""
    source = tmp_path / "scaled"
    shutil.copytree(tiny_checkpoint, source)
    config = hf_config(source)
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}
    (source / "config.json").write_text(json.dumps(config))
    quantize(source, tmp_path / "out", options("fp16"))
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["rotary_base"] == 50000.0
    assert exported["rotary_scaling"]["type"] == "linear" and exported["rotary_scaling"]["factor"] == 2.0


def test_complete_trtllm_config_llama3_scaling(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"position_embedding_type": "rope_gpt_neox", "rotary_base": None,
                                "quantization": {"quant_algo": None}}))
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    model = ModelSpec(model_type="llama", architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096,
                      num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336,
                      max_position_embeddings=131072, dtype="bfloat16", rope_theta=500000.0, rope_scaling=scaling)
    config = complete_trtllm_config(path, model, "W8A16")
    assert config == json.loads(path.read_text())
    assert config["rotary_base"] == 500000.0
    assert config["rotary_scaling"] == {**scaling, "type": "llama3"}
    assert config["quantization"]["quant_algo"] == "W8A16"


# ------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("overrides, message", [
    (dict(precision="int3"), "--precision int3"),
    (dict(kv_cache_dtype="fp4"), "--kv-cache-dtype fp4"),
    (dict(format="onnx"), "--format onnx"),
    (dict(tp_size=0), "--tp-size must be"),
    (dict(pp_size=0), "--pp-size must be"),
    (dict(tp_size=3), "does not divide num_attention_heads 4"),
    (dict(tp_size=4), "does not divide num_key_value_heads 2"),
    (dict(pp_size=3), "does not divide num_hidden_layers 2"),
    (dict(calib_size=0), "--calib-size must be"),
    (dict(calib_max_len=4096), "exceeds max_position_embeddings"),
    (dict(calib_size=500), "need 504"),
    (dict(kv_cache_dtype="int8", format="hf"), "--kv-cache-dtype int8 cannot be exported with --format hf"),
    (dict(format="hf", tp_size=2), "--format hf writes one unsharded checkpoint"),
    (dict(precision="fp16", dtype="bfloat16"), "contradicts"),
    (dict(precision="fp8", block_size=64), "--block-size applies to group-wise INT4"),
    (dict(precision="int4_awq", block_size=96), "--block-size 96 is not one of"),
    (dict(precision="int4_awq", block_size=128), "--block-size 128 does not divide"),
    (dict(precision="int4_awq", block_size=None, tp_size=2), "no INT4 group size"),
    (dict(tolerance=Tolerance(0.1, 1.5)), "out of range"),
])
def test_invalid_options_write_nothing(overrides, message, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    opts = dataclasses.replace(options("fp8"), **overrides)
    with pytest.raises(TrtbuildError, match=message.replace("(", r"\(")):
        quantize(tiny_checkpoint, out, opts)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("", "is empty"),
    ("\n  \n\t\n", "is empty"),
    ("one line\ntwo lines\n", "has 2 samples"),
    (b"\xff\xfe bad", "is not UTF-8"),
])
def test_invalid_calibration_data(content, message, tiny_checkpoint, tmp_path):
    data = tmp_path / "calib.txt"
    if isinstance(content, bytes):
        data.write_bytes(content)
    elif content is not None:
        data.write_text(content)
    out = tmp_path / "out"
    with pytest.raises(TrtbuildError, match=message):
        quantize(tiny_checkpoint, out, options("fp8", calib_data=data))
    assert not out.exists()


def test_refuses_nonempty_out_without_force(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(TrtbuildError, match="pass --force"):
        quantize(tiny_checkpoint, out, options("fp16"))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    quantize(tiny_checkpoint, out, options("fp16"), force=True)
    assert not (out / "keep.txt").exists() and (out / "rank0.safetensors").is_file()


def test_custom_calibration_data_and_tolerance_gate(tiny_checkpoint, tmp_path):
    data = tmp_path / "calib.txt"
    lines = DEFAULT_CALIBRATION.read_text().splitlines()[40:52]
    data.write_text("\n\n".join(lines) + "\n")
    out = tmp_path / "out"
    strict = Tolerance(max_mean_kl=1e-9, min_top1=1.0)
    with pytest.raises(TrtbuildError, match=r"int4_wo .* beyond tolerance .* mean KL .*nothing was written"):
        quantize(tiny_checkpoint, out, options("int4_wo", calib_data=data, tolerance=strict))
    assert list(tmp_path.iterdir()) == [data]
    result = quantize(tiny_checkpoint, out, options("int4_wo", calib_data=data))
    manifest = read_manifest(out)
    assert manifest["calibration"]["sha256"] == sha256(data)
    assert manifest["calibration"]["total_samples"] == 12 and manifest["calibration"]["calib_samples"] == 6
    assert result.delta.mean_kl > 1e-9


def test_default_tolerances_are_ordered():
    """A coarser format may never be held to a tighter bound than a finer one."""
    order = ["fp16", "bf16", "int8_wo", "fp8", "int8_sq", "int4_awq", "int4_wo"]
    kl = [tolerance_for(p).max_mean_kl for p in order]
    top1 = [tolerance_for(p).min_top1 for p in order]
    assert kl == sorted(kl) and top1 == sorted(top1, reverse=True)
    assert tolerance_for("fp8", "fp8").max_mean_kl > tolerance_for("fp8").max_mean_kl


def test_plan_resolves_without_loading_weights(tiny_checkpoint, tmp_path):
    p = plan(tiny_checkpoint, tmp_path / "out", QuantizeOptions(precision="int4_awq"))
    assert (p.dtype, p.block_size, p.decoder_type, p.quant_algo) == ("float16", 64, "llama", "W4A16_AWQ")
    assert len(p.calibration.calib) == 128 and len(p.calibration.heldout) == 16
    assert not set(p.calibration.calib) & set(p.calibration.heldout)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ engine, CLI
def test_engine_converter(tiny_checkpoint, tmp_path):
    from trtbuild.build.engine import ConvertStep
    from trtbuild.build.quantize import quantize_for_engine

    step = ConvertStep(source=tiny_checkpoint, precision="fp16", kv_cache_dtype="auto", dtype="auto", tp_size=2, pp_size=1)
    result = quantize_for_engine(step, tmp_path / "ckpt")
    assert result.quant_algo is None and result.tp_size == 2
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("rank*.safetensors")) == ["rank0.safetensors", "rank1.safetensors"]


def test_cli(tiny_checkpoint, tmp_path):
    from trtbuild.cli import main

    runner = CliRunner()
    out = tmp_path / "out"
    args = ["quantize", str(tiny_checkpoint), "--precision", "int8_wo", "--calib-size", "6", "--eval-size", "4",
            "--calib-max-len", "48", "--max-mean-kl", "0.5", "--min-top1", "0.3", "--out", str(out), "--json"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["quant_algo"] == "W8A16" and printed["tolerance"] == {"max_mean_kl": 0.5, "min_top1": 0.3}
    assert read_manifest(out)["quant_algo"] == "W8A16"

    again = runner.invoke(main, args)
    assert again.exit_code == 2 and "pass --force" in again.output and "Traceback" not in again.output
    missing = runner.invoke(main, [*args[:-3], "--calib-data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "nope.txt does not exist" in missing.output


# ------------------------------------------------------------------------------------ manifest helper
def test_manifest_detects_changes(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "sub" / "b.json").write_text("{}")
    write_manifest(tmp_path, {"kind": "test"})
    assert read_manifest(tmp_path)["files"] == file_hashes(tmp_path) == {
        "a.bin": hashlib.sha256(b"abc").hexdigest(), "sub/b.json": hashlib.sha256(b"{}").hexdigest()}
    verify_manifest(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"abd")
    with pytest.raises(TrtbuildError, match="changed or missing: a.bin"):
        verify_manifest(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "extra").write_text("x")
    with pytest.raises(TrtbuildError, match="not in the manifest: extra"):
        verify_manifest(tmp_path)


# ------------------------------------------------------------------------------------ trained model
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp8", pytest.param("int4_awq", marks=pytest.mark.very_slow)])
def test_smollm2_delta_within_tolerance(precision, smollm2, tmp_path):
    """The trained model stays within the precision's stated tolerance (quantize raises otherwise)."""
    result = quantize(smollm2, tmp_path / precision, QuantizeOptions(precision=precision, calib_size=32))
    tolerance = tolerance_for(precision)
    assert result.tolerance == tolerance
    assert result.delta.mean_kl <= tolerance.max_mean_kl and result.delta.top1_agreement >= tolerance.min_top1
    assert result.delta.mean_kl > 0.001 and result.delta.top1_agreement < 0.99  # it did quantize
    assert result.delta.perplexity_quantized < 1.5 * result.delta.perplexity_reference
    assert result.group_size == (64 if precision == "int4_awq" else None)  # 576 = 9 x 64, not a multiple of 128
    assert (tmp_path / precision / MANIFEST_NAME).is_file()


@pytest.mark.slow
def test_smollm2_round_to_nearest_int4_is_refused(smollm2, tmp_path):
    """Per-channel INT4 nearly doubles SmolLM2's perplexity: the gate stops it before anything is written."""
    with pytest.raises(TrtbuildError, match=r"int4_wo .* beyond tolerance"):
        quantize(smollm2, tmp_path / "int4_wo", QuantizeOptions(precision="int4_wo", calib_size=32))
    assert not (tmp_path / "int4_wo").exists()
