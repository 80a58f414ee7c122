"""The transformers runtime: a Hugging Face checkpoint served by the LLM step in Triton's Python
backend, on trtbuild_runtime (the Llama family) or transformers' continuous batching (the rest)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from trtbuild.repository import interface
from trtbuild.repository.plan import Batching, ModelPlan, pbbool, plan_llm_repository
from trtbuild.repository.render import write_spec_repository
from trtbuild.errors import TrtbuildError
from trtbuild.runtimes.base import RepoRequest, Runtime, Written, spec_from_options
from trtbuild.spec import BuildSpec


def plan_transformers_llm(spec: BuildSpec) -> ModelPlan:
    """The LLM step: trtbuild_runtime.backend.llm, on the engine `spec.engine_choice` names."""
    choice = spec.engine_choice
    return ModelPlan(
        spec.names.llm,
        "llm_transformers",
        dict(
            spec=spec,
            inputs=interface.TEXT_LLM_INPUTS,
            outputs=interface.TEXT_LLM_OUTPUTS,
            parameters=[
                ("checkpoint_dir", str(spec.checkpoint.absolute())),
                ("tokenizer_dir", str(spec.tokenizer.absolute())),
                ("dtype", spec.torch_dtype),
                ("device", spec.device),
                ("max_input_len", spec.max_input_len),
                ("max_output_len", spec.max_output_len),
                ("kv_cache_page_size", spec.kv_cache.page_size),
                ("kv_cache_num_blocks", spec.kv_cache.blocks_for(spec.max_batch_size, spec.max_seq_len)),
                ("kv_cache_free_gpu_mem_fraction", spec.kv_cache.free_gpu_mem_fraction),
                ("exclude_input_in_output", pbbool(spec.exclude_input_in_output)),
                ("quantization", spec.quantization),
                ("engine", choice.engine),
                ("engine_reason", choice.reason),
                ("max_num_tokens", spec.max_num_tokens),
                ("stream_interval_ms", spec.stream_interval_ms),
                ("stream_max_tokens", spec.stream_max_tokens),
                ("add_special_tokens", pbbool(spec.add_special_tokens)),
                ("skip_special_tokens", pbbool(spec.skip_special_tokens)),
                ("enable_kv_cache_reuse", pbbool(spec.kv_cache.enable_reuse)),
                ("kv_cache_dtype", spec.kv_cache.dtype),
                ("speculative_decoding_mode", spec.speculative_decoding_mode),
                ("max_draft_len", spec.max_draft_len),
                ("max_matching_ngram_size", spec.max_matching_ngram_size),
                ("engine_stall_timeout_s", spec.engine_stall_timeout_s),
                # tests and drills: a prompt that wedges the engine, a delay after every step (a slower build)
                *[(k, v) for k, v in sorted(spec.extra.items()) if k.startswith("fault_injection_") and v],
                # Triton 2.51's stub mis-reads BYTES tensors under numpy 2 (text_input, text_output): the
                # text model runs in the numpy<2 environment where one is given, as trtbuild_runtime
                # needs no transformers (whose scipy/sklearn want numpy 2) and torch takes numpy 1.26
                *([("EXECUTION_ENV_PATH", str(spec.text_env))] if spec.text_env and choice.engine == "trtbuild" else []),
            ],
            # requests join the running batch at once; the batcher is where priorities and queue
            # policies act (the engine itself serves first come, first served)
            batching=Batching(max_queue_delay_us=0),
            engine_name={"trtbuild": "trtbuild_runtime", "transformers": "transformers continuous batching"}[choice.engine],
        ),
        python_model="llm",
    )




def plan(spec: BuildSpec) -> list[ModelPlan]:
    return plan_llm_repository(spec, plan_transformers_llm)


def write(spec: BuildSpec, out: Path, force: bool = False) -> Written:
    extra = {"llm_engine": dataclasses.asdict(spec.engine_choice),
             "entrypoints": {"text": spec.names.llm}}  # text_input -> text_output in one model
    return write_spec_repository(spec, plan(spec), out, force=force, extra=extra)


def check_memory(spec: BuildSpec) -> None:
    """Refuse here, with the numbers, a build the server would refuse at load. On a CPU the KV pool holds
    max_batch_size full sequences; on a GPU (`--gpu-mem-gib`, else the visible device) the pool is sized
    from the memory left at load, so the weights and one full sequence must fit."""
    import torch

    from trtbuild_runtime.config import resolve_device
    from trtbuild_runtime.memory import OutOfMemory, check_cpu_pool, kv_block_bytes

    m, kv = spec.model, spec.kv_cache
    device = "cuda" if spec.gpu_mem_gib else resolve_device(spec.device)
    on_cpu = device == "cpu"
    itemsize = 1 if kv.dtype == "fp8" else 4 if on_cpu and spec.dtype in ("auto", "float32") else 2  # CPU: 16-bit runs as fp32
    block = kv_block_bytes(m.num_layers, kv.page_size, m.num_kv_heads, m.head_dim, itemsize)
    shape = f"--max-batch-size {spec.max_batch_size} x --max-input-len + --max-output-len {spec.max_seq_len}"
    hint = "lower --max-batch-size or --max-input-len/--max-output-len, or use --kv-cache-dtype fp8"
    if on_cpu:
        try:
            check_cpu_pool(kv.blocks_for(spec.max_batch_size, spec.max_seq_len), block, kv.page_size)
        except OutOfMemory as e:
            raise TrtbuildError(f"{shape} cannot be served on this CPU: {e}", hint=hint) from None
        return
    total = spec.gpu_mem_gib * 2**30 if spec.gpu_mem_gib else (
        torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None)
    if total is None:
        return  # no GPU here and none named: the server sizes the pool at load
    weight_bits = {"fp8": 8, "int4_wo": 4, "int4_awq": 4, "int4_gptq": 4}.get(spec.quantization, 32 if spec.torch_dtype == "float32" else 16)
    weights = m.num_parameters * weight_bits / 8
    sequence = -(-spec.max_seq_len // kv.page_size) * block
    usable = total * kv.free_gpu_mem_fraction
    if weights + sequence > usable:
        raise TrtbuildError(f"{shape} cannot be served on a {total / 2**30:.1f} GiB GPU: the weights ({weights / 2**30:.2f} GiB) "
                            f"and one full sequence's KV cache ({sequence / 2**30:.2f} GiB) exceed "
                            f"{kv.free_gpu_mem_fraction:.0%} of it", hint="a larger GPU, --quantization fp8, or " + hint)


def spec(request: RepoRequest) -> BuildSpec:
    built = spec_from_options(request.checkpoint, "transformers", request.serving, **request.options)
    check_memory(built)
    return built


RUNTIME = Runtime("transformers", "a Hugging Face checkpoint", spec, write)
