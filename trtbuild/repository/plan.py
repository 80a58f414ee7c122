"""The text-in/text-out repository every LLM runtime shares: preprocessing, the LLM step,
postprocessing and NVIDIA's two entry points; each model described by a ModelPlan that a template renders.

The runtimes (trtbuild.runtimes) plan their own LLM step and hand it to `plan_llm_repository`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from trtbuild.repository import interface
from trtbuild.spec import BuildSpec

@dataclasses.dataclass(frozen=True)
class Batching:
    """Triton's dynamic batcher for one non-decoupled model."""

    max_queue_delay_us: int = 100
    preferred_batch_sizes: tuple[int, ...] = ()
    priority_levels: int = 0
    default_priority_level: int = 0
    queue_policy: Any = None
    priority_queue_policies: tuple[tuple[int, Any], ...] = ()  # (level, trtbuild.repository.serving.QueuePolicy)


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """One model of the repository: which template renders it, with what, and which files it copies."""

    name: str
    template: str  # folder under trtbuild/templates/
    context: dict[str, Any]
    python_model: str | None = None  # a Python-backend model: its module in trtbuild_runtime.backend
    extra_files: dict[str, str] = dataclasses.field(default_factory=dict)  # relative path -> rendered template
    artifacts: dict[str, Path] = dataclasses.field(default_factory=dict)  # relative path -> file or folder copied in

    @property
    def config_template(self) -> str:
        return f"{self.template}/config.pbtxt.j2"


def pbbool(value: bool) -> str:
    return "true" if value else "false"


def plan_llm_repository(spec: BuildSpec, llm_plan: Callable[[BuildSpec], ModelPlan]) -> list[ModelPlan]:
    """The text-in/text-out repository: preprocessing, the LLM step, postprocessing, and NVIDIA's two entry
    points (`ensemble`, and `tensorrt_llm_bls` / `llm_bls`) as ensembles."""
    names = spec.names
    tokenizer = str(spec.tokenizer.absolute())
    common = dict(spec=spec)
    text_env = [("EXECUTION_ENV_PATH", str(spec.text_env))] if spec.text_env else []
    preprocessing = ModelPlan(
        names.preprocessing,
        "preprocessing",
        dict(
            common,
            inputs=interface.PREPROCESSING_INPUTS,
            outputs=interface.PREPROCESSING_OUTPUTS,
            parameters=[
                ("tokenizer_dir", tokenizer),
                ("add_special_tokens", pbbool(spec.add_special_tokens)),
                ("max_input_len", spec.max_input_len),
                *text_env,
            ],
            batching=Batching(),
            instances=spec.preprocessing_instances,
        ),
        python_model="preprocessing",
    )
    postprocessing = ModelPlan(
        names.postprocessing,
        "postprocessing",
        dict(
            common,
            inputs=interface.POSTPROCESSING_INPUTS,
            outputs=interface.POSTPROCESSING_OUTPUTS,
            parameters=[("tokenizer_dir", tokenizer), ("skip_special_tokens", pbbool(spec.skip_special_tokens)), *text_env],
            batching=Batching(),
            instances=spec.postprocessing_instances,
        ),
        python_model="postprocessing",
    )
    llm = llm_plan(spec)
    if "text_output" in {t.name for t in llm.context["outputs"]}:
        # a text model: NVIDIA's two entry points are single-step ensembles onto it, one Python hop
        step = (interface.text_ensemble_step(names.llm),)
        inputs, outputs = interface.TEXT_ENSEMBLE_INPUTS, logits_typed(interface.TEXT_ENSEMBLE_OUTPUTS, spec)
    else:  # token ids only (NVIDIA's tensorrt_llm): tokenize, generate, detokenize, routed by Triton
        step = interface.ensemble_steps(names.preprocessing, names.llm, names.postprocessing)
        inputs, outputs = interface.ENSEMBLE_INPUTS, logits_typed(interface.ENSEMBLE_OUTPUTS, spec)
    # both names route through Triton's core, never through Python calling a decoupled model
    # (server issues 8922 and 8882: Python BLS into a decoupled model fails under concurrent streams)
    entries = [ModelPlan(name, "ensemble", dict(common, inputs=inputs, outputs=outputs, steps=step))
               for name in (names.ensemble, names.bls)]
    return [preprocessing, llm, postprocessing, *entries]


def logits_typed(tensors: tuple[interface.Tensor, ...], spec: BuildSpec) -> tuple[interface.Tensor, ...]:
    """Logits outputs carry the engine's logits dtype (TensorRT-LLM engines may emit FP16 logits)."""
    data_type = spec.extra.get("logits_datatype", "TYPE_FP32")
    return tuple(dataclasses.replace(t, data_type=data_type) if t.name in ("context_logits", "generation_logits") else t
                 for t in tensors)
