"""The llmapi runtime: TensorRT-LLM's PyTorch `LLM` API in a Python-backend model (NVIDIA's
`llmapi` interface), for a Hugging Face checkpoint or a ModelOpt-quantized one (`--format hf`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from trtbuild.errors import TrtbuildError
from trtbuild.repository import interface
from trtbuild.repository.plan import ModelPlan, pbbool
from trtbuild.repository.render import write_spec_repository
from trtbuild.runtimes.base import RepoRequest, Runtime, Written, spec_from_options
from trtbuild.spec import BuildSpec

HONOURS = frozenset({"max_batch_size", "max_input_len", "max_output_len", "dtype", "device", "tokenizer_dir",
                     "kv_cache_free_gpu_mem_fraction", "exclude_input_in_output"})

# NVIDIA's LLM-API model interface (triton_backend/all_models/llmapi), plus repetition_penalty and min_tokens.
LLMAPI_INPUTS: tuple[interface.Tensor, ...] = (
    interface.Tensor("text_input", "TYPE_STRING", (-1,)),
    *(interface.Tensor(name, f"TYPE_{dtype}", (1,), optional=True) for name, dtype in (
        ("streaming", "BOOL"),
        ("sampling_param_best_of", "INT32"),
        ("sampling_param_temperature", "FP32"),
        ("sampling_param_top_k", "INT32"),
        ("sampling_param_top_p", "FP32"),
        ("sampling_param_frequency_penalty", "FP32"),
        ("sampling_param_presence_penalty", "FP32"),
        ("sampling_param_repetition_penalty", "FP32"),
        ("sampling_param_min_tokens", "INT32"),
        ("sampling_param_max_tokens", "INT32"),
        ("sampling_param_seed", "UINT64"),
        ("sampling_param_exclude_input_from_output", "BOOL"),
        ("return_finish_reason", "BOOL"),
        ("return_stop_reason", "BOOL"),
        ("return_cumulative_logprob", "BOOL"),
    )),
    interface.Tensor("sampling_param_stop", "TYPE_STRING", (-1,), optional=True),
)
LLMAPI_OUTPUTS: tuple[interface.Tensor, ...] = (
    interface.Tensor("text_output", "TYPE_STRING", (-1,)),
    interface.Tensor("finish_reason", "TYPE_STRING", (-1,)),
    interface.Tensor("stop_reason", "TYPE_STRING", (-1,)),
    interface.Tensor("cumulative_logprob", "TYPE_FP32", (-1,)),
)
# our ensemble input -> LLM-API input, so clients of the standard ensemble interface work unchanged
LLMAPI_FROM_ENSEMBLE: tuple[tuple[str, str], ...] = (
    ("text_input", "text_input"),
    ("sampling_param_max_tokens", "max_tokens"),
    ("streaming", "stream"),
    ("sampling_param_temperature", "temperature"),
    ("sampling_param_top_k", "top_k"),
    ("sampling_param_top_p", "top_p"),
    ("sampling_param_frequency_penalty", "frequency_penalty"),
    ("sampling_param_presence_penalty", "presence_penalty"),
    ("sampling_param_repetition_penalty", "repetition_penalty"),
    ("sampling_param_min_tokens", "min_tokens"),
    ("sampling_param_seed", "seed"),
    ("sampling_param_stop", "stop_words"),
    ("sampling_param_exclude_input_from_output", "exclude_input_in_output"),
)


def llmapi_args(spec: BuildSpec) -> list[tuple[str, Any]]:
    """`tensorrt_llm.LLM(...)` keyword arguments (model.yaml), from the same spec as config.pbtxt."""
    tp = int(spec.extra.get("tp_size", spec.world_size))
    pp = int(spec.extra.get("pp_size", 1))
    if tp * pp != spec.world_size:
        raise TrtbuildError(f"tensor_parallel_size {tp} x pipeline_parallel_size {pp} != world size {spec.world_size}")
    return [
        ("model", str(spec.checkpoint.absolute())),
        ("tokenizer", str(spec.tokenizer.absolute())),
        ("backend", "pytorch"),
        ("dtype", spec.dtype),
        ("tensor_parallel_size", tp),
        ("pipeline_parallel_size", pp),
        ("max_batch_size", spec.max_batch_size),
        ("max_num_tokens", int(spec.extra.get("max_num_tokens", max(spec.max_input_len, min(8192, spec.max_batch_size * spec.max_seq_len))))),
        ("max_seq_len", spec.max_seq_len),
        ("max_beam_width", spec.max_beam_width),
        ("kv_cache_config", {
            "free_gpu_memory_fraction": spec.kv_cache.free_gpu_mem_fraction,
            "enable_block_reuse": spec.kv_cache.enable_reuse,
            "dtype": spec.kv_cache.dtype,
        }),
    ]


def plan_llmapi_repository(spec: BuildSpec) -> list[ModelPlan]:
    """The LLM-API model (tensorrt_llm.LLM, PyTorch backend) plus an ensemble speaking our client interface."""
    names = spec.names
    by_name = {t.name: t for t in interface.ENSEMBLE_INPUTS}
    text_output = next(t for t in interface.ENSEMBLE_OUTPUTS if t.name == "text_output")
    llm = ModelPlan(
        names.llm,
        "llmapi",
        dict(
            spec=spec,
            inputs=LLMAPI_INPUTS,
            outputs=LLMAPI_OUTPUTS,
            parameters=[("max_input_len", spec.max_input_len), ("exclude_input_in_output", pbbool(spec.exclude_input_in_output))],
            llm_args=llmapi_args(spec),
        ),
        python_model="llmapi",
        extra_files={"1/model.yaml": "llmapi/1/model.yaml.j2"},
    )
    ensemble = ModelPlan(
        names.ensemble,
        "ensemble",
        dict(
            spec=spec,
            inputs=tuple(by_name[ours] for _, ours in LLMAPI_FROM_ENSEMBLE),
            outputs=(text_output, interface.Tensor("finish_reason", "TYPE_STRING", (-1,))),
            steps=(interface.Step(names.llm, LLMAPI_FROM_ENSEMBLE, (("text_output", "text_output"), ("finish_reason", "finish_reason"))),),
        ),
    )
    return [llm, ensemble]




def spec(request: RepoRequest) -> BuildSpec:
    if request.options.get("device", "cuda") != "cuda" and "device" in request.explicit:
        raise TrtbuildError("the llmapi runtime runs on the GPU only", hint="omit --device")
    spec = spec_from_options(request.checkpoint, "llmapi", request.serving, **request.options)
    return dataclasses.replace(spec, device="cuda", kv_cache=dataclasses.replace(spec.kv_cache, enable_reuse=True))


def write(spec: BuildSpec, out: Path, force: bool = False) -> Written:
    return write_spec_repository(spec, plan_llmapi_repository(spec), out, force=force)


RUNTIME = Runtime("llmapi", "a Hugging Face checkpoint (tensorrt_llm.LLM, PyTorch backend)", spec, write, HONOURS,
                  "the checkpoint and model.yaml fix it")
