"""The Jinja environment over trtbuild/templates/ and Triton's config.pbtxt schema.

Shared by `repository` (which renders whole repositories) and `serving` (which reads what a
model's rendered config says about it), so neither imports the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from trtbuild.errors import TrtbuildError
from trtbuild.resources import TEMPLATE_ROOT



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


def render_template(env: jinja2.Environment, template: str, plan) -> str:
    """One template of a model plan (trtbuild.repository.plan.ModelPlan), errors named by model and file."""
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
