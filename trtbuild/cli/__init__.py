"""The `trtbuild` command line: thin command modules over functions that tests call directly.

Nothing imports this package back; each module below holds the commands of one stage.
"""

from __future__ import annotations

import os

import click

from trtbuild.cli.bench import bench
from trtbuild.cli.choose import ab_cmd, profile_cmd, select_cmd
from trtbuild.cli.console import TrtbuildGroup
from trtbuild.cli.demo import demo, demo_checkpoint
from trtbuild.cli.deploy import compose, k8s_cmd, plan_cmd
from trtbuild.cli.engine import engine, inspect_cmd
from trtbuild.cli.export import export
from trtbuild.cli.quantize import quantize_cmd
from trtbuild.cli.repo import repo
from trtbuild.cli.serve import generate_cmd, serve
from trtbuild.cli.validate import validate_cmd


@click.group(cls=TrtbuildGroup)
@click.version_option(package_name="trtbuild")
def main() -> None:
    """Hugging Face checkpoint -> TensorRT-LLM / ONNX build -> Triton model repository."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


for _command in (demo_checkpoint, repo, serve, generate_cmd, demo, quantize_cmd, engine, inspect_cmd, export, compose,
                 bench, validate_cmd, k8s_cmd, plan_cmd, ab_cmd, select_cmd, profile_cmd):
    main.add_command(_command)
