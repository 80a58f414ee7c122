"""`trtbuild repo`: a Triton model repository for a checkpoint, on the runtime it names."""

from __future__ import annotations

from pathlib import Path

import click

from trtbuild import runtimes
from trtbuild.cli.console import console, given
from trtbuild.cli.options import build_options, pop_serving_options, serving_options
from trtbuild.repository.serving import policy_from_options
from trtbuild.runtimes.base import RepoRequest


def runtime_options(f):
    """The options each runtime declares for itself (trtbuild.runtimes)."""
    seen = {}
    for entry in runtimes.REGISTRY.values():
        for name, option in zip(entry.option_names, entry.options):
            seen.setdefault(name, option)
    for option in reversed(list(seen.values())):
        f = option(f)
    return f


@click.command("repo")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Model repository to write.")
@click.option("--runtime", type=click.Choice(runtimes.NAMES), default="transformers", show_default=True,
              help="; ".join(f"{r.name}: CHECKPOINT is {r.source}" for r in runtimes.REGISTRY.values()) + ".")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
@build_options
@serving_options
@runtime_options
def repo(checkpoint: Path, out: Path, runtime: str, force: bool, **options) -> None:
    """Generate a Triton model repository for CHECKPOINT."""
    serving = pop_serving_options(options)
    request = RepoRequest(Path(checkpoint), Path(out), options, policy_from_options(options["max_batch_size"], **serving),
                          frozenset(given(options)), force)
    written = runtimes.write_repository(runtime, request)
    console.print(f"[green]wrote[/] {out} ({', '.join(written.entrypoints or written.models)}; runtime {runtime})")
    for note in written.notes:
        console.print(note, highlight=False, soft_wrap=True)
