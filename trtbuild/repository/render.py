"""Render a repository's model plans, check them with Triton's own schema, write them atomically.

Every config.pbtxt is parsed as Triton's `ModelConfig` protobuf and each ensemble graph is checked
before anything is written, so a broken template or wiring is an error here, not at server start.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jinja2
import yaml
from tritonclient.grpc import model_config_pb2

from trtbuild.atomic import atomic_output_dir
from trtbuild.errors import TrtbuildError
from trtbuild.repository.plan import ModelPlan
from trtbuild.repository.serving import apply_policy
from trtbuild.spec import BuildSpec
from trtbuild.repository.templates import environment, parse_config, render_template
from trtbuild.resources import RUNTIME_PACKAGE

PYTHON_MODEL_TEMPLATE = "_python_model.py.j2"  # the one-line model.py of a Python-backend model
MANIFEST = "trtbuild.json"


@dataclasses.dataclass(frozen=True)
class Written:
    """A written repository and what the user still has to do with it."""

    out: Path
    models: tuple[str, ...]
    entrypoints: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


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
        if plan.python_model:
            files["1/model.py"] = python_model_file(env, plan)
        for rel, file_text in files.items():
            _check_data_file(plan, rel, file_text)
        rendered.append(RenderedModel(plan, text, config, files))
    check_ensembles(rendered)
    return rendered


def python_model_file(env: jinja2.Environment, plan: ModelPlan) -> str:
    """The model.py Triton loads: an import of the backend module that is the model."""
    if not (RUNTIME_PACKAGE / "backend" / f"{plan.python_model}.py").is_file():
        raise TrtbuildError(f"model '{plan.name}': trtbuild_runtime.backend has no module '{plan.python_model}'")
    return env.get_template(PYTHON_MODEL_TEMPLATE).render(name=plan.name, module=plan.python_model)


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


def write_repository(rendered: list[RenderedModel], out: Path, manifest: dict[str, Any], *, inputs, force: bool = False) -> Path:
    """Write atomically; `inputs` (and every artifact copied in) must lie outside `out`."""
    sources = [*inputs, *(source for m in rendered for source in m.plan.artifacts.values())]
    with atomic_output_dir(out, force=force, inputs=sources) as staging:
        for model in rendered:
            target = staging / model.plan.name
            target.mkdir(parents=True)
            (target / "config.pbtxt").write_text(model.config_text)
            if model.plan.python_model:  # the repository carries the code its model.py imports
                shutil.copytree(RUNTIME_PACKAGE, target / "1" / RUNTIME_PACKAGE.name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
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


def write_spec_repository(spec: BuildSpec, plans: list[ModelPlan], out: Path, *, force: bool = False,
                          extra: dict[str, Any] | None = None) -> Written:
    """Apply the serving policy, render, check and write the repository of a BuildSpec; trtbuild.json records it."""
    rendered = render(apply_policy(plans, spec.serving))
    models = {m.plan.name: m.plan.template for m in rendered}
    manifest = {
        "trtbuild_version": version(),
        "spec": spec.to_json(),
        "models": models,
        "entrypoints": {k: v for k, v in {"ensemble": spec.names.ensemble, "bls": spec.names.bls}.items() if v in models},
    }
    for key, value in (extra or {}).items():
        manifest[key] = {**manifest[key], **value} if isinstance(manifest.get(key), dict) else value
    inputs = (spec.checkpoint, spec.tokenizer_dir, spec.engine_dir, spec.text_env)
    write_repository(rendered, out, manifest, inputs=inputs, force=force)
    return Written(Path(out), tuple(models), tuple(manifest["entrypoints"].values()))


def version() -> str:
    from trtbuild import __version__

    return __version__


def read_configs(repository: Path) -> dict[str, model_config_pb2.ModelConfig]:
    """Every model's config.pbtxt of a written repository, parsed, by model name."""
    return {path.parent.name: parse_config(path.read_text(), path.parent.name, str(path))
            for path in sorted(Path(repository).glob("*/config.pbtxt"))}


def load_manifest(repository: Path) -> dict[str, Any]:
    path = Path(repository) / MANIFEST
    if not path.is_file():
        raise TrtbuildError(f"{repository} has no {MANIFEST}", hint="was it generated by `trtbuild repo`?")
    return json.loads(path.read_text())
