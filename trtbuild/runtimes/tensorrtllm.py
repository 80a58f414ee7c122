"""The tensorrtllm runtime: a TensorRT-LLM engine (`trtbuild engine`) behind NVIDIA's C++
`tensorrt_llm` model, with our preprocessing and postprocessing, and its two entry points
(`ensemble`, `tensorrt_llm_bls`) as three-step ensembles around it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from trtbuild.errors import TrtbuildError
from trtbuild.repository import interface
from trtbuild.repository.plan import Batching, ModelPlan, logits_typed, pbbool, plan_llm_repository
from trtbuild.repository.render import write_spec_repository
from trtbuild.runtimes.base import RepoRequest, Runtime, Written
from trtbuild.spec import BuildSpec

HONOURS = frozenset({"max_batch_size", "max_input_len", "max_output_len", "dtype", "device", "tokenizer_dir",
                     "kv_cache_page_size", "kv_cache_free_gpu_mem_fraction", "exclude_input_in_output", "text_env"})


def plan_tensorrtllm_llm(spec: BuildSpec) -> ModelPlan:
    """NVIDIA's C++ `tensorrt_llm` model; `spec` was read from the engine (trtbuild.build.engine.spec_from_engine)."""
    if spec.engine_dir is None:
        raise TrtbuildError("the tensorrtllm runtime needs an engine directory", hint="trtbuild repo ENGINE_DIR --runtime tensorrtllm")
    parameters = [
        ("gpt_model_type", "inflight_fused_batching"),
        ("gpt_model_path", str(spec.engine_dir.absolute())),
        ("tokenizer_dir", str(spec.tokenizer.absolute())),
        ("max_beam_width", spec.max_beam_width),
        ("batch_scheduler_policy", spec.extra.get("batch_scheduler_policy", "guaranteed_no_evict")),
        ("kv_cache_free_gpu_mem_fraction", spec.kv_cache.free_gpu_mem_fraction),
        ("enable_kv_cache_reuse", pbbool(spec.kv_cache.enable_reuse)),
        ("enable_chunked_context", pbbool(spec.extra.get("enable_chunked_context", False))),
        ("exclude_input_in_output", pbbool(spec.exclude_input_in_output)),
        ("normalize_log_probs", "true"),
        ("cancellation_check_period_ms", 100),
        ("FORCE_CPU_ONLY_INPUT_TENSORS", "no"),
    ]
    if spec.kv_cache.num_blocks:
        parameters.append(("max_tokens_in_paged_kv_cache", spec.kv_cache.num_blocks * spec.kv_cache.page_size))
    if spec.world_size > 1:  # leader mode: rank r drives GPU r of the ranks mpirun starts
        parameters.append(("gpu_device_ids", spec.extra.get("gpu_device_ids") or ",".join(str(r) for r in range(spec.world_size))))
    if spec.extra.get("participant_ids"):
        parameters.append(("participant_ids", spec.extra["participant_ids"]))
    return ModelPlan(
        spec.names.llm,
        "llm_tensorrtllm",
        dict(
            spec=spec,
            inputs=interface.LLM_INPUTS,
            outputs=logits_typed(interface.LLM_OUTPUTS, spec),
            parameters=parameters,
            batching=Batching(max_queue_delay_us=0, preferred_batch_sizes=(spec.max_batch_size,)),
        ),
    )




def plan(spec: BuildSpec) -> list[ModelPlan]:
    return plan_llm_repository(spec, plan_tensorrtllm_llm)


def engine_spec(engine_dir: Path, explicit: dict, **o) -> BuildSpec:
    """Every engine-fixed value comes from the engine; a value given on the command line may only lower it."""
    from trtbuild.build.engine import spec_from_engine

    if "device" in explicit and explicit["device"] != "cuda":
        raise TrtbuildError("the tensorrtllm runtime runs on the GPU only", hint="omit --device")
    requested = {k: explicit[k] for k in ("max_batch_size", "max_input_len", "max_output_len", "dtype", "kv_cache_page_size")
                 if k in explicit}
    spec = spec_from_engine(engine_dir, tokenizer_dir=o.get("tokenizer_dir"), requested=requested,
                            kv_cache_free_gpu_mem_fraction=o["kv_cache_free_gpu_mem_fraction"],
                            exclude_input_in_output=o["exclude_input_in_output"])
    if o.get("text_env"):
        spec = dataclasses.replace(spec, text_env=Path(o["text_env"]).absolute())
    return spec


def spec(request: RepoRequest) -> BuildSpec:
    explicit = {k: request.options[k] for k in request.explicit}
    return dataclasses.replace(engine_spec(request.checkpoint, explicit, **request.options), serving=request.serving)


def write(spec: BuildSpec, out: Path, force: bool = False) -> Written:
    return write_spec_repository(spec, plan(spec), out, force=force)


RUNTIME = Runtime("tensorrtllm", "an engine dir (trtbuild engine)", spec, write, HONOURS, "the engine fixes it")
