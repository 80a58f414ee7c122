"""Engine builds (validation, trtllm-build and docker command construction) and the tensorrtllm and
llmapi repositories. TensorRT-LLM cannot be installed here: one test builds a real engine where
`trtllm-build` is on PATH; every other test checks what would run and refuses what cannot work.

The engine-directory fixture is written the way TensorRT-LLM 1.2 writes one (config.json with
`version`, `pretrained_config` and `build_config`, plus one rankN.engine per rank)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2

from trtbuild.cli import main
from trtbuild.build.engine import (
    ENGINE_MANIFEST, PRECISIONS, TRITON_TRTLLM_IMAGE, TRTLLM_BUILD, EngineManifest, EngineOptions, Gpu, Runner,
    build_engine, choose_runner, plan_engine, read_engine_config, read_source, spec_from_engine,
)
from trtbuild.errors import TrtbuildError
from trtbuild.resources import RUNTIME_PACKAGE
from trtbuild.runtimes import generate
from trtbuild.repository.render import load_manifest, read_configs as _configs

A100 = Gpu("NVIDIA A100-SXM4-80GB", (8, 0), 81920)
L40S = Gpu("NVIDIA L40S", (8, 9), 46068)
H100 = Gpu("NVIDIA H100 80GB HBM3", (9, 0), 81559)
T4 = Gpu("Tesla T4", (7, 5), 15360)

QUANT_ALGO = {"fp16": None, "bf16": None, "fp8": "FP8", "int8_sq": "W8A8_SQ_PER_CHANNEL", "int8_wo": "W8A16",
              "int4_wo": "W4A16", "int4_awq": "W4A16_AWQ"}


# ------------------------------------------------------------------------------------- fixtures
def trtllm_pretrained_config(hf_checkpoint: Path, *, dtype="float16", quant_algo=None, kv_cache_quant_algo=None,
                             tp=1, pp=1, logits_dtype="float32") -> dict:
    """A TensorRT-LLM PretrainedConfig for the tiny Llama, with the keys TensorRT-LLM 1.x writes."""
    hf = json.loads((Path(hf_checkpoint) / "config.json").read_text())
    return {
        "architecture": "LlamaForCausalLM",
        "dtype": dtype,
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "num_hidden_layers": hf["num_hidden_layers"],
        "num_attention_heads": hf["num_attention_heads"],
        "num_key_value_heads": hf["num_key_value_heads"],
        "head_size": hf["head_dim"],
        "intermediate_size": hf["intermediate_size"],
        "max_position_embeddings": hf["max_position_embeddings"],
        "hidden_act": hf["hidden_act"],
        "norm_epsilon": hf["rms_norm_eps"],
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": hf["rope_parameters"]["rope_theta"],
        "rotary_scaling": None,
        "logits_dtype": logits_dtype,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "share_embedding_table": False,
        "head_dim": hf["head_dim"],
        "qk_layernorm": False,
        "mlp_bias": False,
        "attn_bias": False,
        "runtime_defaults": None,
        "mapping": {"world_size": tp * pp, "gpus_per_node": 8, "cp_size": 1, "tp_size": tp, "pp_size": pp,
                    "moe_tp_size": tp, "moe_ep_size": 1, "moe_cluster_size": 1},
        "quantization": {"quant_algo": quant_algo, "kv_cache_quant_algo": kv_cache_quant_algo, "group_size": 128,
                         "smoothquant_val": 0.5, "clamp_val": None, "use_meta_recipe": False, "has_zero_point": False,
                         "pre_quant_scale": quant_algo == "W4A16_AWQ", "exclude_modules": ["lm_head"] if quant_algo else None},
    }


def write_trtllm_checkpoint(path: Path, hf_checkpoint: Path, **kwargs) -> Path:
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    config = trtllm_pretrained_config(hf_checkpoint, **kwargs)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for rank in range(config["mapping"]["world_size"]):
        save_file({"transformer.ln_f.weight": np.ones(config["hidden_size"], np.float16)}, str(path / f"rank{rank}.safetensors"))
    return path


def write_engine_dir(path: Path, hf_checkpoint: Path, *, max_batch_size=8, max_input_len=128, max_seq_len=192,
                     max_beam_width=1, max_num_tokens=1536, kv_cache_type="PAGED", tokens_per_block=32,
                     use_paged_context_fmha=True, tokenizer=True, manifest: dict | None = None, **pretrained) -> Path:
    """An engine directory laid out as TensorRT-LLM 1.2's trtllm-build writes it (empty engines)."""
    pretrained_config = trtllm_pretrained_config(hf_checkpoint, **pretrained)
    build_config = {
        "max_input_len": max_input_len, "max_seq_len": max_seq_len, "opt_batch_size": 8, "max_batch_size": max_batch_size,
        "max_beam_width": max_beam_width, "max_num_tokens": max_num_tokens, "opt_num_tokens": None,
        "max_prompt_embedding_table_size": 0, "kv_cache_type": kv_cache_type, "gather_context_logits": False,
        "gather_generation_logits": False, "strongly_typed": True, "force_num_profiles": None,
        "profiling_verbosity": "layer_names_only", "enable_debug_output": False, "max_draft_len": 0,
        "speculative_decoding_mode": 1, "use_refit": False, "input_timing_cache": None, "output_timing_cache": "model.cache",
        "lora_config": {"lora_dir": [], "lora_ckpt_source": "hf", "max_lora_rank": 64, "lora_target_modules": [],
                        "trtllm_modules_to_hf_modules": {}},
        "weight_sparsity": False, "weight_streaming": False, "use_strip_plan": False, "max_encoder_input_len": 1024,
        "monitor_memory": False, "use_mrope": False,
        "plugin_config": {
            "dtype": pretrained_config["dtype"], "bert_attention_plugin": "auto", "gpt_attention_plugin": "auto",
            "gemm_plugin": pretrained_config["dtype"], "gemm_swiglu_plugin": None, "fp8_rowwise_gemm_plugin": None,
            "qserve_gemm_plugin": None, "identity_plugin": None, "nccl_plugin": None, "lora_plugin": None,
            "dora_plugin": False, "weight_only_groupwise_quant_matmul_plugin": None, "weight_only_quant_matmul_plugin": None,
            "smooth_quant_plugins": True, "smooth_quant_gemm_plugin": None, "layernorm_quantization_plugin": None,
            "rmsnorm_quantization_plugin": None, "quantize_per_token_plugin": False, "quantize_tensor_plugin": False,
            "moe_plugin": "auto", "mamba_conv1d_plugin": "auto", "low_latency_gemm_plugin": None,
            "low_latency_gemm_swiglu_plugin": None, "gemm_allreduce_plugin": None, "context_fmha": True,
            "bert_context_fmha_fp32_acc": False, "paged_kv_cache": kv_cache_type == "PAGED", "remove_input_padding": True,
            "norm_quant_fusion": False, "reduce_fusion": False, "user_buffer": False, "tokens_per_block": tokens_per_block,
            "use_paged_context_fmha": use_paged_context_fmha, "use_fp8_context_fmha": False, "fuse_fp4_quant": False,
            "multiple_profiles": False, "paged_state": False, "streamingllm": False, "manage_weights": False,
            "use_fused_mlp": True, "pp_reduce_scatter": False,
        },
    }
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"version": "1.2.1", "pretrained_config": pretrained_config,
                                                  "build_config": build_config}, indent=4))
    for rank in range(pretrained_config["mapping"]["world_size"]):
        (path / f"rank{rank}.engine").write_bytes(b"")
    if tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
            if (hf_checkpoint / name).is_file():
                (path / "tokenizer").mkdir(exist_ok=True)
                shutil.copy2(hf_checkpoint / name, path / "tokenizer" / name)
    if manifest is not None:
        (path / ENGINE_MANIFEST).write_text(json.dumps(manifest))
    return path


def engine_manifest(**changes) -> EngineManifest:
    m = EngineManifest("0.1.0", "2026-11-23T00:00:00+00:00", "/ckpt", "hf", "LlamaForCausalLM", "fp16", "auto", "float16",
                       1, 1, "docker", TRITON_TRTLLM_IMAGE, [["docker", "run"]], {"tensorrt_llm": "1.2.1"}, [],
                       {"max_batch_size": 8}, {"precision": "fp16"}, "tokenizer")
    return dataclasses.replace(m, **changes)


def hf_variant(tmp_path: Path, tiny_checkpoint: Path, name: str, **changes) -> Path:
    """The tiny checkpoint with a different config.json (architecture, sizes)."""
    target = tmp_path / name
    shutil.copytree(tiny_checkpoint, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def run_cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def plan(checkpoint, tmp_path, gpus=(H100,), runner=Runner("docker", TRITON_TRTLLM_IMAGE), **options):
    return plan_engine(checkpoint, EngineOptions(**options), tmp_path / "engine", runner=runner, gpus=tuple(gpus))


def flag(argv, name):
    return argv[list(argv).index(name) + 1]


# --------------------------------------------------------------------------- trtllm-build commands
def test_hf_checkpoint_plan_converts_then_builds_for_inflight_batching(tiny_checkpoint, tmp_path):
    p = plan(tiny_checkpoint, tmp_path, precision="fp16", max_batch_size=16, max_input_len=256, max_seq_len=512)
    assert p.source.format == "hf" and p.convert is not None
    assert (p.convert.precision, p.convert.dtype, p.convert.tp_size) == ("fp16", "float16", 1)
    staging = tmp_path / "staging"
    host_ckpt, argv = p.commands_for(staging)
    assert host_ckpt.parent == staging
    build = argv[argv.index(TRTLLM_BUILD):]
    # in-flight batching: attention plugin, packed (unpadded) inputs and a paged KV cache together
    assert flag(build, "--gpt_attention_plugin") == "auto"
    assert flag(build, "--remove_input_padding") == "enable"
    assert flag(build, "--kv_cache_type") == "paged"
    assert flag(build, "--use_paged_context_fmha") == "enable"
    assert (flag(build, "--max_batch_size"), flag(build, "--max_input_len"), flag(build, "--max_seq_len")) == ("16", "256", "512")
    assert flag(build, "--checkpoint_dir") == str(p.out / ".trtllm-checkpoint")  # as the container sees it
    assert flag(build, "--output_dir") == str(p.out)


def test_docker_runner_mounts_staging_at_the_final_path(tiny_checkpoint, tmp_path):
    source = write_trtllm_checkpoint(tmp_path / "ckpt", tiny_checkpoint)
    p = plan(source, tmp_path, runner=choose_runner("docker", "example.com/trtllm:1.2"))
    staging = tmp_path / ".engine.abc.tmp"
    _, argv = p.commands_for(staging)
    image_at = argv.index("example.com/trtllm:1.2")
    docker, inner = argv[:image_at], argv[image_at + 1:]
    assert docker[:3] == ("docker", "run", "--rm")
    assert flag(docker, "--gpus") == "all"
    assert "memlock=-1" in docker and "stack=67108864" in docker
    volumes = [docker[i + 1] for i, a in enumerate(docker) if a == "-v"]
    assert f"{staging}:{p.out}" in volumes
    assert f"{source}:{source}:ro" in volumes  # the TensorRT-LLM checkpoint is only read
    assert flag(docker, "-w") == str(p.out / ".work")
    assert inner[0] == TRTLLM_BUILD
    assert flag(inner, "--checkpoint_dir") == str(source) and flag(inner, "--output_dir") == str(p.out)
    assert str(staging) not in " ".join(inner)
    assert p.convert is None
    assert p.describe()[0].startswith("docker run") and str(staging) not in p.describe()[0]


def test_local_runner_writes_into_the_staging_dir(tiny_checkpoint, tmp_path):
    p = plan(tiny_checkpoint, tmp_path, precision="bf16", runner=Runner("local"))
    staging = tmp_path / ".engine.xyz.tmp"
    host_ckpt, argv = p.commands_for(staging)
    assert argv[0] == TRTLLM_BUILD
    assert flag(argv, "--output_dir") == str(staging)
    assert flag(argv, "--checkpoint_dir") == str(host_ckpt) == str(staging / ".trtllm-checkpoint")


@pytest.mark.parametrize(
    "kind, image, expected, message",
    [
        ("docker", None, ("docker", TRITON_TRTLLM_IMAGE), None),
        ("docker", "my/image:tag", ("docker", "my/image:tag"), None),
        ("auto", "my/image:tag", ("docker", "my/image:tag"), None),
        ("local", None, ("local", None), None),
        ("local", "my/image:tag", None, "--image only applies to --runner docker"),
        ("podman", None, None, "--runner podman is not one of"),
    ],
)
def test_choose_runner(kind, image, expected, message):
    if message:
        with pytest.raises(TrtbuildError, match=message):
            choose_runner(kind, image)
    else:
        r = choose_runner(kind, image)
        assert (r.kind, r.image) == expected


def test_auto_runner_is_local_only_where_trtllm_build_is_on_path():
    assert choose_runner("auto").kind == ("local" if shutil.which(TRTLLM_BUILD) else "docker")


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_every_precision_builds_on_hopper(tiny_checkpoint, tmp_path, precision):
    p = plan(tiny_checkpoint, tmp_path, precision=precision)
    assert p.config.precision == precision
    assert p.convert.precision == precision
    assert p.config.dtype == (PRECISIONS[precision].dtype or "float16")  # fp32 checkpoint -> fp16 activations


@pytest.mark.parametrize(
    "options, gpus, message",
    [
        (dict(precision="fp8"), (A100,), r"--precision fp8 needs SM89 or newer but GPU 0 \(NVIDIA A100-SXM4-80GB\) is SM80"),
        (dict(precision="fp8"), (H100, T4), r"GPU 1 \(Tesla T4\) is SM75"),
        (dict(precision="bf16"), (T4,), "--precision bf16 needs SM80"),
        (dict(precision="int4_awq"), (T4,), "--precision int4_awq needs SM80"),
        (dict(precision="fp16", kv_cache_dtype="fp8"), (A100,), "--kv-cache-dtype fp8 needs SM89"),
        (dict(precision="fp8", kv_cache_dtype="fp8", use_fp8_context_fmha=True), (L40S,), "--use-fp8-context-fmha needs SM90"),
        (dict(precision="fp16", use_fp8_context_fmha=True), (H100,), "--use-fp8-context-fmha needs --precision fp8"),
        (dict(precision="fp8", use_fp8_context_fmha=True), (H100,), "with --use-paged-context-fmha needs --kv-cache-dtype fp8"),
        (dict(precision="fp16", max_input_len=512, max_seq_len=512), (), "--max-input-len 512 must be smaller than --max-seq-len 512"),
        (dict(precision="fp16", max_input_len=100, max_seq_len=2048), (), "--max-seq-len 2048 exceeds the model's max_position_embeddings 1024"),
        (dict(precision="fp16", kv_cache_type="continuous", use_paged_context_fmha=False), (),
         "in-flight batching needs a paged KV cache"),
        (dict(precision="fp16", kv_cache_type="disabled", inflight_batching=False), (), "--use-paged-context-fmha needs --kv-cache-type paged"),
        (dict(precision="fp16", max_input_len=512, max_seq_len=1024, max_num_tokens=256, use_paged_context_fmha=False), (),
         "needs chunked context, which needs --use-paged-context-fmha"),
        (dict(precision="int8_wo", gemm_plugin="fp8"), (), "--gemm-plugin fp8 needs --precision fp8"),
        (dict(precision="bf16", gemm_plugin="float16"), (), "--gemm-plugin float16 with bfloat16 activations"),
        (dict(precision="fp16", dtype="bfloat16"), (), "--precision fp16 means float16; --dtype bfloat16 contradicts it"),
        (dict(precision="fp16", tokens_per_block=48), (), "--tokens-per-block must be a power of two"),
        (dict(precision="fp16", tp_size=3), (), "--tp-size 3 does not divide num_attention_heads 4"),
        (dict(precision="fp16", tp_size=2), (), None),
        # TensorRT-LLM could replicate 2 KV heads over 4 ranks, but the ModelOpt export refuses it (trtbuild.build.quantize)
        (dict(precision="fp16", tp_size=4), (), "--tp-size 4 does not divide num_key_value_heads 2"),
        (dict(precision="fp16", pp_size=3), (), "--pp-size 3 exceeds the 2 layers"),
        (dict(precision="fp16", workers=2), (), "--workers 2 exceeds the 1 ranks"),
        (dict(precision="fp16", max_batch_size=0), (), "--max-batch-size must be >= 1"),
        (dict(), (), "--precision is required for the Hugging Face checkpoint"),
    ],
)
def test_impossible_builds_are_refused_before_any_work(tiny_checkpoint, tmp_path, options, gpus, message):
    if message is None:
        assert plan(tiny_checkpoint, tmp_path, gpus=gpus, **options).config.world_size == options["tp_size"]
        return
    with pytest.raises(TrtbuildError, match=message):
        plan(tiny_checkpoint, tmp_path, gpus=gpus, **options)
    assert not (tmp_path / "engine").exists()


def test_all_problems_are_reported_at_once(tiny_checkpoint, tmp_path):
    with pytest.raises(TrtbuildError, match=r"^4 problems: ") as e:
        plan(tiny_checkpoint, tmp_path, gpus=(A100,), precision="fp8", tp_size=3, tokens_per_block=24)
    assert "needs SM89" in str(e.value) and "--tp-size 3" in str(e.value) and "power of two" in str(e.value)


@pytest.mark.parametrize(
    "model_type, architecture, precision, ok",
    [
        ("phi3", "Phi3ForCausalLM", "fp8", True),
        ("phi3", "Phi3ForCausalLM", "int8_sq", False),
        ("gemma2", "Gemma2ForCausalLM", "int4_awq", False),
        ("gemma", "GemmaForCausalLM", "int4_awq", True),
        ("mistral", "MistralForCausalLM", "int8_sq", True),
        ("qwen3", "Qwen3ForCausalLM", "int8_sq", False),
    ],
)
def test_precision_must_suit_the_architecture(tiny_checkpoint, tmp_path, model_type, architecture, precision, ok):
    ckpt = hf_variant(tmp_path, tiny_checkpoint, model_type, model_type=model_type, architectures=[architecture])
    if ok:
        assert plan(ckpt, tmp_path, precision=precision).config.precision == precision
    else:
        with pytest.raises(TrtbuildError, match=f"TensorRT-LLM cannot build .* at {precision}: supported precisions are"):
            plan(ckpt, tmp_path, precision=precision)


def test_fp8_context_fmha_is_chosen_only_where_it_runs(tiny_checkpoint, tmp_path):
    fp8 = dict(precision="fp8", kv_cache_dtype="fp8")
    assert plan(tiny_checkpoint, tmp_path, gpus=(H100,), **fp8).config.use_fp8_context_fmha
    assert not plan(tiny_checkpoint, tmp_path, gpus=(L40S,), **fp8).config.use_fp8_context_fmha
    assert not plan(tiny_checkpoint, tmp_path, gpus=(), **fp8).config.use_fp8_context_fmha
    assert not plan(tiny_checkpoint, tmp_path, gpus=(H100,), precision="fp8").config.use_fp8_context_fmha


def test_defaults_follow_the_model(tiny_checkpoint, tmp_path):
    c = plan(tiny_checkpoint, tmp_path, precision="fp16").config
    assert c.max_seq_len == 1024  # the tiny model's max_position_embeddings, below the 2048 default
    assert c.max_input_len < c.max_seq_len
    assert c.max_num_tokens >= c.max_input_len


# ----------------------------------------------------------------------- TensorRT-LLM checkpoints
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_exported_checkpoint_fixes_precision_and_ranks(tiny_checkpoint, tmp_path, precision):
    dtype = "bfloat16" if precision == "bf16" else "float16"
    source = write_trtllm_checkpoint(tmp_path / "ckpt", tiny_checkpoint, dtype=dtype, quant_algo=QUANT_ALGO[precision], tp=2)
    p = plan(source, tmp_path)
    assert (p.config.precision, p.config.tp_size, p.config.pp_size, p.config.dtype) == (precision, 2, 1, dtype)
    assert p.convert is None and p.source.format == "trtllm"


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(tp_size=1), r"mapping has tp_size 2 x pp_size 1 .* ranks are fixed at export"),
        (dict(pp_size=2), r"mapping has tp_size 2 x pp_size 1"),
        (dict(precision="int8_sq"), "is a fp8 TensorRT-LLM checkpoint .* but --precision is int8_sq"),
        (dict(kv_cache_dtype="int8"), "exported with a fp8 KV cache .* but --kv-cache-dtype is int8"),
        (dict(dtype="bfloat16"), "holds float16 weights; --dtype bfloat16 would need a new export"),
    ],
)
def test_exported_checkpoint_mismatches(tiny_checkpoint, tmp_path, options, message):
    source = write_trtllm_checkpoint(tmp_path / "ckpt", tiny_checkpoint, quant_algo="FP8", kv_cache_quant_algo="FP8", tp=2)
    with pytest.raises(TrtbuildError, match=message):
        plan(source, tmp_path, **options)


def test_a_real_modelopt_export_is_read_as_written(tiny_checkpoint, tmp_path):
    """The conversion step's own output (trtbuild.build.quantize, fp16, tp 2), not a hand-written fixture."""
    from trtbuild.build.engine import ConvertStep, default_converter
    from trtbuild.build.inspection import inspect_path

    step = ConvertStep(tiny_checkpoint, "fp16", "auto", "float16", 2, 1)
    default_converter(step, tmp_path / "export")
    p = plan(tmp_path / "export", tmp_path)
    assert (p.source.format, p.config.precision, p.config.tp_size, p.config.dtype) == ("trtllm", "fp16", 2, "float16")
    assert p.convert is None and flag(p.commands_for(tmp_path / "s")[1], "--checkpoint_dir") == str(tmp_path / "export")
    hf = read_source(tiny_checkpoint).model
    assert dataclasses.replace(p.source.model, dtype=hf.dtype, tie_word_embeddings=hf.tie_word_embeddings,
                               bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id) == hf
    assert inspect_path(tmp_path / "export", plan=False).tp_size == 2


def test_exported_checkpoint_needs_every_rank(tiny_checkpoint, tmp_path):
    source = write_trtllm_checkpoint(tmp_path / "ckpt", tiny_checkpoint, tp=2, pp=2)
    (source / "rank3.safetensors").unlink()
    with pytest.raises(TrtbuildError, match="world size 4 but rank3.safetensors is missing"):
        read_source(source)


def test_engine_and_modelopt_hf_exports_are_not_build_sources(tiny_checkpoint, tmp_path):
    engine = write_engine_dir(tmp_path / "engine", tiny_checkpoint)
    with pytest.raises(TrtbuildError, match="is already a TensorRT-LLM engine"):
        read_source(engine)
    hf = hf_variant(tmp_path, tiny_checkpoint, "hfq")
    (hf / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "FP8"}}))
    with pytest.raises(TrtbuildError, match="ModelOpt Hugging Face export"):
        read_source(hf)


# --------------------------------------------------------------------------------------- the CLI
def test_dry_run_prints_the_plan_and_writes_nothing(tiny_checkpoint, tmp_path):
    out = tmp_path / "engines" / "tiny"
    code, text = run_cli("engine", tiny_checkpoint, "--precision", "int8_sq", "--out", out, "--runner", "docker",
                         "--max-seq-len", 512, "--tp-size", 2, "--dry-run", "--json")
    assert code == 0, text
    data = json.loads(text[text.index("{"):])
    assert data["build_config"]["precision"] == "int8_sq" and data["build_config"]["tp_size"] == 2
    assert data["image"] == TRITON_TRTLLM_IMAGE
    assert data["steps"][0].startswith("trtbuild.build.quantize") and "trtllm-build" in data["steps"][1]
    assert not out.exists() and not out.parent.exists()


def test_the_export_step_refuses_before_any_work(tiny_checkpoint, tmp_path):
    # int4_awq's group size (128 or 64) must divide every GEMM input per rank: 64 / tp 2 = 32 cannot
    with pytest.raises(TrtbuildError, match="no INT4 group size"):
        plan(tiny_checkpoint, tmp_path, precision="int4_awq", tp_size=2)
    assert not (tmp_path / "engine").exists()


def test_cli_refusal_is_one_line_exit_2(tiny_checkpoint, tmp_path):
    code, text = run_cli("engine", tiny_checkpoint, "--precision", "fp16", "--out", tmp_path / "e",
                         "--max-input-len", 600, "--max-seq-len", 512, "--dry-run")
    assert code == 2
    assert "must be smaller than --max-seq-len 512" in text and "Traceback" not in text


def test_build_refuses_a_missing_local_trtllm_build_before_writing(tiny_checkpoint, tmp_path):
    if shutil.which(TRTLLM_BUILD):
        pytest.skip("trtllm-build is installed here")
    p = plan(tiny_checkpoint, tmp_path, precision="fp16", runner=Runner("local"))
    with pytest.raises(TrtbuildError, match="trtllm-build is not on PATH"):
        build_engine(p, converter=lambda step, out: pytest.fail("must not convert"))
    assert not p.out.exists()


def _fake_docker(tmp_path, monkeypatch, script: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text("#!/bin/sh\n" + script)
    docker.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


@pytest.mark.parametrize("script, message", [
    ('echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?" >&2; exit 1',
     "the Docker daemon is not reachable (Cannot connect to the Docker daemon"),
    ('echo \'{"runc":{"path":"runc"}}\'', "Docker has no NVIDIA runtime"),
])
def test_an_unusable_docker_runner_is_refused_before_quantizing(tiny_checkpoint, tmp_path, monkeypatch, script, message):
    _fake_docker(tmp_path, monkeypatch, script)
    out = tmp_path / "engines" / "tiny"
    code, text = run_cli("engine", tiny_checkpoint, "--precision", "fp8", "--out", out, "--runner", "docker")
    assert code == 2 and message in text and "Traceback" not in text, text
    assert not out.exists() and not out.parent.exists()
    p = plan(tiny_checkpoint, tmp_path, precision="fp8")
    with pytest.raises(TrtbuildError, match=re.escape(message)):
        build_engine(p, converter=lambda step, output: pytest.fail("quantized before checking the runner"))


def test_build_refuses_a_non_empty_out(tiny_checkpoint, tmp_path):
    p = plan(tiny_checkpoint, tmp_path, precision="fp16", runner=Runner("local"))
    p.out.mkdir()
    (p.out / "keep").write_text("x")
    with pytest.raises(TrtbuildError, match="exists and is not empty"):
        build_engine(p)


@pytest.mark.skipif(shutil.which(TRTLLM_BUILD) is None,
                    reason="trtllm-build is not on PATH: TensorRT-LLM cannot be installed on this machine "
                           "(its PyPI package downloads from NVIDIA's unreachable index)")
def test_real_engine_build(tiny_checkpoint, tmp_path):
    if importlib.util.find_spec("trtbuild.build.quantize") is None:
        pytest.skip("trtbuild.build.quantize (the Hugging Face -> TensorRT-LLM checkpoint step) is not available")
    p = plan_engine(tiny_checkpoint, EngineOptions(precision="fp16", max_batch_size=4, max_input_len=64, max_seq_len=128),
                    tmp_path / "engine", runner=Runner("local"))
    manifest = build_engine(p)
    engine = read_engine_config(p.out)
    assert (engine.max_batch_size, engine.max_input_len, engine.max_seq_len) == (4, 64, 128)
    assert engine.paged_kv_cache and (p.out / "rank0.engine").stat().st_size > 0
    assert EngineManifest.read(p.out) == manifest
    assert manifest.commands[-1][0] == TRTLLM_BUILD and manifest.versions.get("tensorrt_llm")
    assert not (p.out / ".trtllm-checkpoint").exists() and not (p.out / ".work").exists()


def test_tokenizer_copy_takes_no_weights(tiny_checkpoint, tmp_path):
    from trtbuild.build.engine import copy_tokenizer
    from transformers import AutoTokenizer

    copy_tokenizer(tiny_checkpoint, tmp_path / "tok")
    names = {p.name for p in (tmp_path / "tok").iterdir()}
    assert "tokenizer.json" in names and "config.json" in names and not any(n.endswith(".safetensors") for n in names)
    text = "The capital of France is"
    assert AutoTokenizer.from_pretrained(tmp_path / "tok")(text).input_ids == AutoTokenizer.from_pretrained(tiny_checkpoint)(text).input_ids
    exported = write_trtllm_checkpoint(tmp_path / "ckpt", tiny_checkpoint)
    shutil.copy2(tiny_checkpoint / "tokenizer.json", exported / "tokenizer.json")
    copy_tokenizer(exported, tmp_path / "tok2")
    assert {p.name for p in (tmp_path / "tok2").iterdir()} == {"tokenizer.json"}  # not TensorRT-LLM's config.json


def test_manifest_round_trip(tmp_path):
    m = engine_manifest(tp_size=2)
    m.write(tmp_path)
    assert EngineManifest.read(tmp_path) == m and m.world_size == 2
    (tmp_path / ENGINE_MANIFEST).write_text('{"image": "x"}')
    with pytest.raises(TrtbuildError, match="is not a trtbuild engine manifest"):
        EngineManifest.read(tmp_path)


# ----------------------------------------------------------------------------- engine -> BuildSpec
def test_spec_reads_every_engine_fixed_value(tiny_checkpoint, tmp_path):
    engine = write_engine_dir(tmp_path / "engine", tiny_checkpoint, max_batch_size=12, max_input_len=100, max_seq_len=300,
                              max_beam_width=2, tokens_per_block=64, logits_dtype="float16", kv_cache_quant_algo="FP8")
    spec = spec_from_engine(engine)
    assert (spec.max_batch_size, spec.max_input_len, spec.max_seq_len, spec.max_beam_width) == (12, 100, 300, 2)
    assert spec.kv_cache.page_size == 64 and spec.kv_cache.dtype == "fp8" and spec.kv_cache.enable_reuse
    assert spec.world_size == 1 and spec.engine_dir == engine and spec.runtime == "tensorrtllm"
    assert spec.tokenizer == engine / "tokenizer"
    assert spec.extra["logits_datatype"] == "TYPE_FP16"
    assert spec.model.model_type == "llama" and spec.model.num_kv_heads == 2


@pytest.mark.parametrize(
    "requested, message",
    [
        ({"max_batch_size": 9}, r"--max-batch-size 9 exceeds the engine's max_batch_size 8"),
        ({"max_input_len": 129}, r"--max-input-len 129 exceeds the engine's max_input_len 128"),
        ({"max_output_len": 65}, r"--max-output-len 65 exceeds the engine's max_output_len 64"),
        ({"kv_cache_page_size": 64}, r"--kv-cache-page-size 64 differs from the engine's tokens_per_block 32"),
        ({"dtype": "bfloat16"}, r"--dtype bfloat16 differs from the engine's dtype float16"),
        ({"max_batch_size": 4, "max_input_len": 64}, None),
    ],
)
def test_command_line_cannot_exceed_the_engine(tiny_checkpoint, tmp_path, requested, message):
    engine = write_engine_dir(tmp_path / "engine", tiny_checkpoint)
    if message is None:
        spec = spec_from_engine(engine, requested=requested)
        assert (spec.max_batch_size, spec.max_input_len) == (4, 64)
        return
    with pytest.raises(TrtbuildError, match=message):
        spec_from_engine(engine, requested=requested)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(kv_cache_type="CONTINUOUS"), "has no paged KV cache"),
        (dict(tokenizer=False), "no tokenizer found for the engine"),
        (dict(tp=2), "world size 2 in config.json but rank1.engine is missing"),
    ],
)
def test_unservable_engines_are_refused(tiny_checkpoint, tmp_path, change, message):
    engine = write_engine_dir(tmp_path / "engine", tiny_checkpoint, **change)
    if "tp" in change:
        (engine / "rank1.engine").unlink()
    with pytest.raises(TrtbuildError, match=message):
        spec_from_engine(engine)


def test_a_checkpoint_is_not_an_engine(tiny_checkpoint, tmp_path):
    source = write_trtllm_checkpoint(tmp_path / "ckpt", tiny_checkpoint)
    with pytest.raises(TrtbuildError, match="is a TensorRT-LLM checkpoint"):
        read_engine_config(source)
    with pytest.raises(TrtbuildError, match="is a Hugging Face checkpoint"):
        read_engine_config(tiny_checkpoint)


# ------------------------------------------------------------------------- tensorrtllm repository


def _params(config) -> dict:
    return {k: v.string_value for k, v in config.parameters.items()}


def test_tensorrtllm_repository_agrees_with_the_engine(tiny_checkpoint, tmp_path):
    engine = write_engine_dir(tmp_path / "engine", tiny_checkpoint, max_batch_size=6, max_beam_width=2, logits_dtype="float16",
                              max_num_tokens=64)
    code, text = run_cli("repo", engine, "--runtime", "tensorrtllm", "--out", tmp_path / "repo",
                         "--kv-cache-free-gpu-mem-fraction", 0.8)
    assert code == 0, text
    configs = _configs(tmp_path / "repo")
    assert set(configs) == {"preprocessing", "tensorrt_llm", "postprocessing", "ensemble", "tensorrt_llm_bls"}
    llm = configs["tensorrt_llm"]
    assert llm.backend == "tensorrtllm" and llm.model_transaction_policy.decoupled
    assert all(c.max_batch_size == 6 for c in configs.values())
    p = _params(llm)
    assert p["gpt_model_type"] == "inflight_fused_batching"
    assert p["gpt_model_path"] == str(engine)
    assert p["max_beam_width"] == "2"
    assert p["kv_cache_free_gpu_mem_fraction"] == "0.8"
    assert p["enable_kv_cache_reuse"] == "true"  # the engine has paged context FMHA
    assert p["enable_chunked_context"] == "true"  # max_num_tokens 64 < max_input_len 128
    assert p["batch_scheduler_policy"] == "guaranteed_no_evict" and p["exclude_input_in_output"] == "true"
    assert "gpu_device_ids" not in p
    assert _params(configs["preprocessing"])["tokenizer_dir"] == str(engine / "tokenizer")
    for model in ("tensorrt_llm", "ensemble", "tensorrt_llm_bls"):
        logits = {t.name: t.data_type for t in configs[model].output if t.name.endswith("_logits")}
        assert set(logits.values()) == {model_config_pb2.TYPE_FP16}, model
    steps = configs["ensemble"].ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["preprocessing", "tensorrt_llm", "postprocessing"]
    spec = load_manifest(tmp_path / "repo")["spec"]
    assert spec["engine_dir"] == str(engine) and spec["world_size"] == 1 and spec["runtime"] == "tensorrtllm"


def test_tensorrtllm_multi_gpu_parameters(tiny_checkpoint, tmp_path):
    engine = write_engine_dir(tmp_path / "engine", tiny_checkpoint, tp=2)
    repo = generate(spec_from_engine(engine), tmp_path / "repo")
    p = _params(_configs(repo)["tensorrt_llm"])
    assert p["gpu_device_ids"] == "0,1"
    assert load_manifest(repo)["spec"]["world_size"] == 2


def test_tensorrtllm_step_uses_the_backends_seed_input(tiny_checkpoint, tmp_path):
    repo = generate(spec_from_engine(write_engine_dir(tmp_path / "engine", tiny_checkpoint)), tmp_path / "repo")
    assert "seed" in {t.name for t in _configs(repo)["tensorrt_llm"].input}


@pytest.mark.parametrize(
    "args, message",
    [
        (("--max-batch-size", 64), "--max-batch-size 64 exceeds the engine's max_batch_size 8"),
        (("--max-output-len", 1000), "--max-output-len 1000 exceeds the engine's max_output_len 64"),
        (("--kv-cache-page-size", 16), "--kv-cache-page-size 16 differs from the engine's tokens_per_block 32"),
        (("--device", "cpu"), "the tensorrtllm runtime runs on the GPU only"),
        (("--quantization", "fp8"), "--quantization does not apply to the tensorrtllm runtime"),
    ],
)
def test_repo_cli_refuses_values_the_engine_cannot_serve(tiny_checkpoint, tmp_path, args, message):
    engine = write_engine_dir(tmp_path / "engine", tiny_checkpoint)
    code, text = run_cli("repo", engine, "--runtime", "tensorrtllm", "--out", tmp_path / "repo", *args)
    assert code == 2 and message in text and "Traceback" not in text
    assert not (tmp_path / "repo").exists()


def test_tensorrtllm_runtime_on_a_checkpoint_says_build_an_engine(tiny_checkpoint, tmp_path):
    code, text = run_cli("repo", tiny_checkpoint, "--runtime", "tensorrtllm", "--out", tmp_path / "repo")
    assert code == 2 and "is a Hugging Face checkpoint" in text and "trtbuild engine" in text


# ----------------------------------------------------------------------------- llmapi repository
@pytest.fixture(scope="module")
def llmapi_config_module():
    from trtbuild_runtime.backend import llmapi_config

    return llmapi_config


@pytest.mark.parametrize(
    "args, message",
    [
        (("--kv-cache-page-size", 64), "--kv-cache-page-size does not apply to the llmapi runtime"),
        (("--quantization", "fp8"), "--quantization does not apply to the llmapi runtime"),
        (("--device", "cpu"), "the llmapi runtime runs on the GPU only"),
    ],
)
def test_llmapi_refuses_options_it_would_ignore(tiny_checkpoint, tmp_path, args, message):
    code, text = run_cli("repo", tiny_checkpoint, "--runtime", "llmapi", "--out", tmp_path / "repo", *args)
    assert code == 2 and message in text and not (tmp_path / "repo").exists()


def test_llmapi_repository(tiny_checkpoint, tmp_path, llmapi_config_module):
    code, text = run_cli("repo", tiny_checkpoint, "--runtime", "llmapi", "--out", tmp_path / "repo", "--max-batch-size", 4,
                         "--max-input-len", 100, "--max-output-len", 28, "--dtype", "bfloat16",
                         "--kv-cache-free-gpu-mem-fraction", 0.7)
    assert code == 0, text
    repo = tmp_path / "repo"
    configs = _configs(repo)
    assert set(configs) == {"tensorrt_llm", "ensemble"}
    llm = configs["tensorrt_llm"]
    assert llm.backend == "python" and llm.max_batch_size == 4 and llm.model_transaction_policy.decoupled
    inputs = {t.name: t for t in llm.input}
    assert not inputs["text_input"].optional and list(inputs["text_input"].dims) == [-1]
    assert {"streaming", "sampling_param_max_tokens", "sampling_param_temperature", "sampling_param_top_k",
            "sampling_param_top_p", "sampling_param_stop", "sampling_param_seed"} <= set(inputs)
    assert {t.name for t in llm.output} == {"text_output", "finish_reason", "stop_reason", "cumulative_logprob"}
    for f in ("model.py", "trtbuild_runtime/backend/llmapi_config.py", "trtbuild_runtime/backend/tensors.py", "model.yaml"):
        assert (repo / "tensorrt_llm" / "1" / f).is_file(), f

    args, triton_config = llmapi_config_module.load_model_yaml(repo / "tensorrt_llm" / "1" / "model.yaml")
    assert args == {
        "model": str(tiny_checkpoint), "tokenizer": str(tiny_checkpoint), "backend": "pytorch", "dtype": "bfloat16",
        "tensor_parallel_size": 1, "pipeline_parallel_size": 1, "max_batch_size": 4, "max_num_tokens": 512,
        "max_seq_len": 128, "max_beam_width": 1,
        "kv_cache_config": {"free_gpu_memory_fraction": 0.7, "enable_block_reuse": True, "dtype": "auto"},
    }
    assert triton_config == {"max_batch_size": 4, "decoupled": True}
    # what Triton hands the model in args["model_config"] is the config as JSON with proto field names
    as_triton = json_format.MessageToDict(llm, preserving_proto_field_name=True)
    llmapi_config_module.check_triton_config(as_triton, triton_config)
    with pytest.raises(ValueError, match="max_batch_size: config.pbtxt 4, model.yaml 8"):
        llmapi_config_module.check_triton_config(as_triton, dict(triton_config, max_batch_size=8))
    assert _params(llm)["max_input_len"] == "100"

    ensemble = configs["ensemble"]
    step = ensemble.ensemble_scheduling.step[0]
    assert step.model_name == "tensorrt_llm"
    assert dict(step.input_map)["sampling_param_max_tokens"] == "max_tokens" and dict(step.input_map)["streaming"] == "stream"
    assert {t.name for t in ensemble.output} == {"text_output", "finish_reason"}


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"sampling_param_max_tokens": 16}, {"max_tokens": 16}),
        ({"sampling_param_temperature": 0.0, "sampling_param_max_tokens": 4}, {"top_k": 1, "max_tokens": 4}),
        ({"sampling_param_temperature": 0.7, "sampling_param_top_p": 0.9, "sampling_param_top_k": 40, "sampling_param_seed": 3},
         {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 3}),
        ({"sampling_param_stop": ["###", ""], "sampling_param_best_of": None}, {"stop": ["###"]}),
        ({"sampling_param_stop": [""]}, {}),
        ({"sampling_param_max_tokens": 0}, "sampling_param_max_tokens must be >= 1"),
        ({"sampling_param_temperature": -1.0}, "sampling_param_temperature must be >= 0"),
        ({"sampling_param_top_p": 0.0}, r"sampling_param_top_p must be in \(0, 1\]"),
        ({"sampling_param_min_tokens": 9, "sampling_param_max_tokens": 8}, "min_tokens must not exceed"),
    ],
)
def test_llmapi_sampling_parameters(llmapi_config_module, values, expected):
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            llmapi_config_module.sampling_kwargs(values)
    else:
        assert llmapi_config_module.sampling_kwargs(values) == expected


def test_llmapi_model_yaml_problems(llmapi_config_module, tmp_path):
    (tmp_path / "a.yaml").write_text("backend: pytorch\n")
    with pytest.raises(ValueError, match="'model' .* is missing"):
        llmapi_config_module.load_model_yaml(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="cannot read"):
        llmapi_config_module.load_model_yaml(tmp_path / "b.yaml")
    with pytest.raises(ValueError, match="must be decoupled"):
        llmapi_config_module.check_triton_config({"max_batch_size": 4}, {})
    with pytest.raises(ValueError, match="accepts at most 8"):
        llmapi_config_module.check_prompt_length(9, 8)


def test_llmapi_forgets_the_mpirun_job_but_keeps_mpi_settings(llmapi_config_module):
    env = {"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0", "PMIX_RANK": "0", "PMIX_NAMESPACE": "x",
           "PMI_FD": "3", "OMPI_MCA_btl": "^openib", "PMIX_MCA_gds": "hash", "PATH": "/usr/bin"}
    removed = llmapi_config_module.clear_mpi_job_environment(env)
    assert removed == ["OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_NAMESPACE", "PMIX_RANK", "PMI_FD"]
    assert env == {"OMPI_MCA_btl": "^openib", "PMIX_MCA_gds": "hash", "PATH": "/usr/bin"}


def test_llmapi_model_py_is_valid_python_that_uses_the_llm_api():
    import ast

    tree = ast.parse((RUNTIME_PACKAGE / "backend" / "llmapi.py").read_text())
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert {"generate_async", "aresult", "abort", "text_diff", "get_response_sender", "is_cancelled"} <= names
    classes = {n.name: {f.name for f in n.body if isinstance(f, ast.FunctionDef)} for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"initialize", "execute", "finalize"} <= classes["TritonPythonModel"]


def test_llmapi_rejects_an_unparseable_model_yaml(tiny_spec, tmp_path):
    from trtbuild.resources import TEMPLATE_ROOT as root
    from trtbuild.repository.templates import environment
    from trtbuild.runtimes.llmapi import plan_llmapi_repository
    from trtbuild.repository.render import render

    broken = tmp_path / "templates"
    shutil.copytree(root, broken)
    path = broken / "llmapi" / "1" / "model.yaml.j2"
    path.write_text(path.read_text().replace("triton_config:", "triton_config: [", 1))
    spec = dataclasses.replace(tiny_spec, runtime="llmapi")
    with pytest.raises(TrtbuildError, match="rendered 1/model.yaml does not parse"):
        render(plan_llmapi_repository(spec), environment(broken))
