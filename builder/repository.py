"""Render a Triton model repository from a BuildSpec, check it with Triton's own schema, write it atomically.

Templates in `model_repo_templates/` hold the text; this module decides what goes into them. Every
config.pbtxt is parsed as Triton's `ModelConfig` protobuf and the ensemble graph is checked before
anything is written, so a broken template or wiring is an error here, not at server start.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import jinja2
import yaml
from tritonclient.grpc import model_config_pb2

from builder import interface
from builder.atomic import atomic_output_dir
from builder.errors import TrtbuildError
from builder.serving import apply_policy
from builder.spec import BuildSpec
from builder.templates import TEMPLATE_ROOT, environment, parse_config, render_template

COMMON_FILES = ("_common/trtbuild_utils.py", "_common/trtbuild_tokenizer.py")
MANIFEST = "trtbuild.json"


@dataclasses.dataclass(frozen=True)
class Batching:
    """Triton's dynamic batcher for one non-decoupled model."""

    max_queue_delay_us: int = 100
    preferred_batch_sizes: tuple[int, ...] = ()
    priority_levels: int = 0
    default_priority_level: int = 0
    queue_policy: Any = None
    priority_queue_policies: tuple[tuple[int, Any], ...] = ()  # (level, builder.serving.QueuePolicy)


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """One model of the repository: which template renders it, with what, and which files it copies."""

    name: str
    template: str  # folder under model_repo_templates/
    context: dict[str, Any]
    python_files: tuple[str, ...] = ()  # files under the template folder copied verbatim
    extra_files: dict[str, str] = dataclasses.field(default_factory=dict)  # relative path -> rendered template
    artifacts: dict[str, Path] = dataclasses.field(default_factory=dict)  # relative path -> file or folder copied in

    @property
    def config_template(self) -> str:
        return f"{self.template}/config.pbtxt.j2"


def _bool(value: bool) -> str:
    return "true" if value else "false"


def plan_llm_repository(spec: BuildSpec, llm_plan: Callable[[BuildSpec], ModelPlan] | None = None) -> list[ModelPlan]:
    """The text-in/text-out repository: preprocessing, the LLM step, postprocessing, ensemble and BLS."""
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
                ("add_special_tokens", _bool(spec.add_special_tokens)),
                ("max_input_len", spec.max_input_len),
                *text_env,
            ],
            batching=Batching(),
            instances=spec.preprocessing_instances,
        ),
        python_files=("1/model.py",),
    )
    postprocessing = ModelPlan(
        names.postprocessing,
        "postprocessing",
        dict(
            common,
            inputs=interface.POSTPROCESSING_INPUTS,
            outputs=interface.POSTPROCESSING_OUTPUTS,
            parameters=[("tokenizer_dir", tokenizer), ("skip_special_tokens", _bool(spec.skip_special_tokens)), *text_env],
            batching=Batching(),
            instances=spec.postprocessing_instances,
        ),
        python_files=("1/model.py",),
    )
    llm = (llm_plan or LLM_PLANS[spec.runtime])(spec)
    outputs = _logits_typed(interface.ENSEMBLE_OUTPUTS, spec)
    ensemble = ModelPlan(
        names.ensemble,
        "ensemble",
        dict(
            common,
            inputs=interface.ENSEMBLE_INPUTS,
            outputs=outputs,
            steps=interface.ensemble_steps(names.preprocessing, names.llm, names.postprocessing),
        ),
    )
    bls = ModelPlan(
        names.bls,
        "bls",
        dict(
            common,
            inputs=interface.ENSEMBLE_INPUTS,
            outputs=outputs,
            parameters=[
                ("preprocessing_model", names.preprocessing),
                ("llm_model", names.llm),
                ("llm_input_map", json.dumps(dict(interface.DIRECT_TO_LLM))),
                ("tokenizer_dir", tokenizer),
                ("skip_special_tokens", _bool(spec.skip_special_tokens)),
                ("max_inflight", spec.max_batch_size * 2),
                *text_env,
            ],
            instances=1,
        ),
        python_files=("1/model.py",),
    )
    return [preprocessing, llm, postprocessing, ensemble, bls]


RUNTIME_PACKAGE = Path(__file__).resolve().parents[1] / "trtbuild_runtime"


def plan_transformers_llm(spec: BuildSpec) -> ModelPlan:
    """The LLM step; with trtbuild's engine it carries the runtime package, so the repository is self-contained."""
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
                ("exclude_input_in_output", _bool(spec.exclude_input_in_output)),
                ("quantization", spec.quantization),
                ("engine", choice.engine),
                ("engine_reason", choice.reason),
                ("max_num_tokens", spec.max_num_tokens),
                ("stream_interval_ms", spec.stream_interval_ms),
                ("stream_max_tokens", spec.stream_max_tokens),
                ("add_special_tokens", _bool(spec.add_special_tokens)),
                ("skip_special_tokens", _bool(spec.skip_special_tokens)),
                ("enable_kv_cache_reuse", _bool(spec.kv_cache.enable_reuse)),
                ("kv_cache_dtype", spec.kv_cache.dtype),
                ("speculative_decoding_mode", spec.speculative_decoding_mode),
                ("max_draft_len", spec.max_draft_len),
                ("max_matching_ngram_size", spec.max_matching_ngram_size),
            ],
        ),
        python_files=("1/model.py", "1/llm_runtime.py"),
        artifacts={"1/trtbuild_runtime": RUNTIME_PACKAGE} if choice.engine == "trtbuild" else {},
    )


def _logits_typed(tensors: tuple[interface.Tensor, ...], spec: BuildSpec) -> tuple[interface.Tensor, ...]:
    """Logits outputs carry the engine's logits dtype (TensorRT-LLM engines may emit FP16 logits)."""
    data_type = spec.extra.get("logits_datatype", "TYPE_FP32")
    return tuple(dataclasses.replace(t, data_type=data_type) if t.name in ("context_logits", "generation_logits") else t
                 for t in tensors)


def plan_tensorrtllm_llm(spec: BuildSpec) -> ModelPlan:
    """NVIDIA's C++ `tensorrt_llm` model; `spec` was read from the engine (builder.engine.spec_from_engine)."""
    if spec.engine_dir is None:
        raise TrtbuildError("the tensorrtllm runtime needs an engine directory", hint="trtbuild repo ENGINE_DIR --runtime tensorrtllm")
    parameters = [
        ("gpt_model_type", "inflight_fused_batching"),
        ("gpt_model_path", str(spec.engine_dir.absolute())),
        ("tokenizer_dir", str(spec.tokenizer.absolute())),
        ("max_beam_width", spec.max_beam_width),
        ("batch_scheduler_policy", spec.extra.get("batch_scheduler_policy", "guaranteed_no_evict")),
        ("kv_cache_free_gpu_mem_fraction", spec.kv_cache.free_gpu_mem_fraction),
        ("enable_kv_cache_reuse", _bool(spec.kv_cache.enable_reuse)),
        ("enable_chunked_context", _bool(spec.extra.get("enable_chunked_context", False))),
        ("exclude_input_in_output", _bool(spec.exclude_input_in_output)),
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
            outputs=_logits_typed(interface.LLM_OUTPUTS, spec),
            parameters=parameters,
            batching=Batching(max_queue_delay_us=0, preferred_batch_sizes=(spec.max_batch_size,)),
        ),
    )


LLM_PLANS: dict[str, Callable[[BuildSpec], ModelPlan]] = {"transformers": plan_transformers_llm, "tensorrtllm": plan_tensorrtllm_llm}

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
            parameters=[("max_input_len", spec.max_input_len), ("exclude_input_in_output", _bool(spec.exclude_input_in_output))],
            llm_args=llmapi_args(spec),
        ),
        python_files=("1/model.py", "1/llmapi_config.py"),
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


REPOSITORY_PLANS: dict[str, Callable[[BuildSpec], list[ModelPlan]]] = {"llmapi": plan_llmapi_repository}


@dataclasses.dataclass
class RenderedModel:
    plan: ModelPlan
    config_text: str
    config: model_config_pb2.ModelConfig
    files: dict[str, str]  # relative path -> text


def render(plans: list[ModelPlan], env: jinja2.Environment | None = None) -> list[RenderedModel]:
    env = env or environment()
    rendered = []
    for plan in plans:
        text = render_template(env, plan.config_template, plan)
        config = parse_config(text, plan.name, plan.config_template)
        if config.name != plan.name:
            raise TrtbuildError(f"model '{plan.name}': {plan.config_template} renders name '{config.name}'")
        files = {rel: render_template(env, tpl, plan) for rel, tpl in plan.extra_files.items()}
        for rel, file_text in files.items():
            _check_data_file(plan, rel, file_text)
        rendered.append(RenderedModel(plan, text, config, files))
    check_ensembles(rendered)
    return rendered


def _check_data_file(plan: ModelPlan, rel: str, text: str) -> None:
    """Rendered YAML/JSON files must parse, like config.pbtxt must."""
    try:
        if rel.endswith((".yaml", ".yml")):
            yaml.safe_load(text)
        elif rel.endswith(".json"):
            json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise TrtbuildError(f"model '{plan.name}': rendered {rel} does not parse: {e}") from None


def _dims_compatible(a, b) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b))


def check_ensembles(models: list[RenderedModel]) -> None:
    """Every step input is produced upstream (or is an ensemble input) with the same type and shape."""
    by_name = {m.plan.name: m.config for m in models}
    for m in models:
        cfg = m.config
        if cfg.platform != "ensemble":
            continue
        where = f"ensemble '{cfg.name}' (template {m.plan.config_template})"
        available = {t.name: t for t in cfg.input}
        for index, step in enumerate(cfg.ensemble_scheduling.step):
            target = by_name.get(step.model_name)
            if target is None:
                raise TrtbuildError(f"{where}: step {index} calls model '{step.model_name}', which the repository lacks")
            inputs = {t.name: t for t in target.input}
            outputs = {t.name: t for t in target.output}
            for key, value in step.input_map.items():
                if key not in inputs:
                    raise TrtbuildError(f"{where}: step '{step.model_name}' has no input '{key}'")
                if value not in available:
                    raise TrtbuildError(f"{where}: '{value}' feeds '{step.model_name}.{key}' but nothing upstream produces it")
                src, dst = available[value], inputs[key]
                if src.data_type != dst.data_type or not _dims_compatible(src.dims, dst.dims):
                    raise TrtbuildError(
                        f"{where}: '{value}' is {model_config_pb2.DataType.Name(src.data_type)}{list(src.dims)} but "
                        f"'{step.model_name}.{key}' wants {model_config_pb2.DataType.Name(dst.data_type)}{list(dst.dims)}"
                    )
            missing = [n for n, t in inputs.items() if not t.optional and n not in step.input_map]
            if missing:
                raise TrtbuildError(f"{where}: required input(s) {missing} of '{step.model_name}' are not mapped")
            for key, value in step.output_map.items():
                if key not in outputs:
                    raise TrtbuildError(f"{where}: step '{step.model_name}' has no output '{key}'")
                available[value] = outputs[key]
        for out in cfg.output:
            if out.name not in available:
                raise TrtbuildError(f"{where}: output '{out.name}' is produced by no step")
            src = available[out.name]
            if src.data_type != out.data_type or not _dims_compatible(src.dims, out.dims):
                raise TrtbuildError(f"{where}: output '{out.name}' does not match the type/shape its step produces")


def write_repository(rendered: list[RenderedModel], out: Path, manifest: dict[str, Any], *, inputs, force: bool = False,
                     root: Path = TEMPLATE_ROOT) -> Path:
    """Write atomically; `inputs` (and every artifact copied in) must lie outside `out`."""
    sources = [*inputs, *(source for m in rendered for source in m.plan.artifacts.values())]
    with atomic_output_dir(out, force=force, inputs=sources) as staging:
        for model in rendered:
            target = staging / model.plan.name
            target.mkdir(parents=True)
            (target / "config.pbtxt").write_text(model.config_text)
            for rel in model.plan.python_files:
                dest = target / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / model.plan.template / rel, dest)
                if rel.endswith("model.py"):
                    for common in COMMON_FILES:
                        shutil.copy2(root / common, dest.parent / Path(common).name)
            for rel, text in model.files.items():
                dest = target / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(text)
            for rel, source in model.plan.artifacts.items():
                dest = target / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                if Path(source).is_dir():
                    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    shutil.copy2(source, dest)
            if not any(p.is_dir() and p.name.isdigit() for p in target.iterdir()):
                (target / "1").mkdir()
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return Path(out)


def generate(spec: BuildSpec, out: Path, *, force: bool = False) -> Path:
    """Render, check and write the repository for `spec`."""
    plans = REPOSITORY_PLANS.get(spec.runtime, plan_llm_repository)(spec)
    plans = apply_policy(plans, spec.serving)
    rendered = render(plans)
    models = {m.plan.name: m.plan.template for m in rendered}
    manifest = {
        "trtbuild_version": _version(),
        "spec": spec.to_json(),
        "models": models,
        "entrypoints": {k: v for k, v in {"ensemble": spec.names.ensemble, "bls": spec.names.bls}.items() if v in models},
    }
    if spec.runtime == "transformers":
        manifest["llm_engine"] = dataclasses.asdict(spec.engine_choice)
        manifest["entrypoints"]["text"] = spec.names.llm  # text_input -> text_output in one model
    inputs = (spec.checkpoint, spec.tokenizer_dir, spec.engine_dir, spec.text_env)
    return write_repository(rendered, out, manifest, inputs=inputs, force=force)


def _version() -> str:
    from builder import __version__

    return __version__


def load_manifest(repository: Path) -> dict[str, Any]:
    path = Path(repository) / MANIFEST
    if not path.is_file():
        raise TrtbuildError(f"{repository} has no {MANIFEST}", hint="was it generated by `trtbuild repo`?")
    return json.loads(path.read_text())
