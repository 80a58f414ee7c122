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
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from builder import interface
from builder.atomic import atomic_output_dir
from builder.errors import TrtbuildError
from builder.spec import BuildSpec

TEMPLATE_ROOT = Path(__file__).resolve().parent.parent / "model_repo_templates"
COMMON_FILES = ("_common/trtbuild_utils.py",)
MANIFEST = "trtbuild.json"


@dataclasses.dataclass(frozen=True)
class Batching:
    """Triton's dynamic batcher for one non-decoupled model."""

    max_queue_delay_us: int = 100
    preferred_batch_sizes: tuple[int, ...] = ()
    priority_levels: int = 0
    default_priority_level: int = 0
    queue_policy: Any = None


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """One model of the repository: which template renders it, with what, and which files it copies."""

    name: str
    template: str  # folder under model_repo_templates/
    context: dict[str, Any]
    python_files: tuple[str, ...] = ()  # files under the template folder copied verbatim
    extra_files: dict[str, str] = dataclasses.field(default_factory=dict)  # relative path -> rendered template

    @property
    def config_template(self) -> str:
        return f"{self.template}/config.pbtxt.j2"


def _pbstr(value: Any) -> str:
    """Escape a value for a protobuf text-format string literal."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def environment(root: Path = TEMPLATE_ROOT) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(root)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["pbstr"] = _pbstr
    return env


def _bool(value: bool) -> str:
    return "true" if value else "false"


def plan_llm_repository(spec: BuildSpec, llm_plan: Callable[[BuildSpec], ModelPlan] | None = None) -> list[ModelPlan]:
    """The text-in/text-out repository: preprocessing, the LLM step, postprocessing, ensemble and BLS."""
    names = spec.names
    tokenizer = str(spec.tokenizer.absolute())
    common = dict(spec=spec)
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
            parameters=[("tokenizer_dir", tokenizer), ("skip_special_tokens", _bool(spec.skip_special_tokens))],
            batching=Batching(),
            instances=spec.postprocessing_instances,
        ),
        python_files=("1/model.py",),
    )
    llm = (llm_plan or LLM_PLANS[spec.runtime])(spec)
    ensemble = ModelPlan(
        names.ensemble,
        "ensemble",
        dict(
            common,
            inputs=interface.ENSEMBLE_INPUTS,
            outputs=interface.ENSEMBLE_OUTPUTS,
            steps=interface.ensemble_steps(names.preprocessing, names.llm, names.postprocessing),
        ),
    )
    bls = ModelPlan(
        names.bls,
        "bls",
        dict(
            common,
            inputs=interface.ENSEMBLE_INPUTS,
            outputs=interface.ENSEMBLE_OUTPUTS,
            parameters=[
                ("preprocessing_model", names.preprocessing),
                ("llm_model", names.llm),
                ("postprocessing_model", names.postprocessing),
                ("llm_input_map", json.dumps(dict(interface.DIRECT_TO_LLM))),
                ("accumulate_tokens", "true"),
            ],
            instances=max(1, spec.max_batch_size // 4),
        ),
        python_files=("1/model.py",),
    )
    return [preprocessing, llm, postprocessing, ensemble, bls]


def plan_transformers_llm(spec: BuildSpec) -> ModelPlan:
    return ModelPlan(
        spec.names.llm,
        "llm_transformers",
        dict(
            spec=spec,
            inputs=interface.LLM_INPUTS,
            outputs=interface.LLM_OUTPUTS,
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
            ],
        ),
        python_files=("1/model.py",),
    )


LLM_PLANS: dict[str, Callable[[BuildSpec], ModelPlan]] = {"transformers": plan_transformers_llm}


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
        text = _render_template(env, plan.config_template, plan)
        config = parse_config(text, plan.name, plan.config_template)
        if config.name != plan.name:
            raise TrtbuildError(f"model '{plan.name}': {plan.config_template} renders name '{config.name}'")
        files = {rel: _render_template(env, tpl, plan) for rel, tpl in plan.extra_files.items()}
        rendered.append(RenderedModel(plan, text, config, files))
    check_ensembles(rendered)
    return rendered


def _render_template(env: jinja2.Environment, template: str, plan: ModelPlan) -> str:
    try:
        return env.get_template(template).render(name=plan.name, **plan.context)
    except jinja2.UndefinedError as e:
        raise TrtbuildError(f"model '{plan.name}': template {template} uses an unfilled value: {e.message}") from None
    except jinja2.TemplateSyntaxError as e:
        raise TrtbuildError(f"model '{plan.name}': template {e.filename or template} line {e.lineno}: {e.message}") from None
    except jinja2.TemplateNotFound as e:
        raise TrtbuildError(f"model '{plan.name}': template {e.name} not found under {TEMPLATE_ROOT}") from None


def parse_config(text: str, model: str, template: str) -> model_config_pb2.ModelConfig:
    """Parse with Triton's own ModelConfig schema: unknown fields and unfilled values fail here."""
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise TrtbuildError(f"model '{model}': config.pbtxt from template {template} is invalid: {e}") from None
    return config


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


def write_repository(rendered: list[RenderedModel], out: Path, manifest: dict[str, Any], *, force: bool = False,
                     root: Path = TEMPLATE_ROOT) -> Path:
    with atomic_output_dir(out, force=force) as staging:
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
            if not any(p.is_dir() and p.name.isdigit() for p in target.iterdir()):
                (target / "1").mkdir()
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return Path(out)


def generate(spec: BuildSpec, out: Path, *, force: bool = False) -> Path:
    """Render, check and write the repository for `spec`."""
    plans = plan_llm_repository(spec)
    rendered = render(plans)
    manifest = {
        "trtbuild_version": _version(),
        "spec": spec.to_json(),
        "models": {m.plan.name: m.plan.template for m in rendered},
        "entrypoints": {"ensemble": spec.names.ensemble, "bls": spec.names.bls},
    }
    return write_repository(rendered, out, manifest, force=force)


def _version() -> str:
    from builder import __version__

    return __version__


def load_manifest(repository: Path) -> dict[str, Any]:
    path = Path(repository) / MANIFEST
    if not path.is_file():
        raise TrtbuildError(f"{repository} has no {MANIFEST}", hint="was it generated by `trtbuild repo`?")
    return json.loads(path.read_text())
