"""The transformers runtime: a Hugging Face checkpoint served by the LLM step in Triton's Python
backend, on trtbuild_runtime (the Llama family) or transformers' continuous batching (the rest)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from trtbuild.repository import interface
from trtbuild.repository.plan import Batching, ModelPlan, pbbool, plan_llm_repository
from trtbuild.repository.render import write_spec_repository
from trtbuild.runtimes.base import Runtime, Written, spec_from_options
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


RUNTIME = Runtime("transformers", "a Hugging Face checkpoint",
                  lambda r: spec_from_options(r.checkpoint, "transformers", r.serving, **r.options), write)
