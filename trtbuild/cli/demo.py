"""`trtbuild demo-checkpoint` (the embedded checkpoints) and `trtbuild demo` (the main job on them)."""

from __future__ import annotations

from pathlib import Path

import click

from trtbuild.cli.console import console


@click.command("demo-checkpoint")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--model", "kind", type=click.Choice(["smollm2", "tiny-llama"]), default="smollm2", show_default=True,
              help="smollm2: trained SmolLM2-135M-Instruct; tiny-llama: random 2-layer Llama for tests.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
def demo_checkpoint(out: Path, kind: str, force: bool) -> None:
    """Write the embedded demo checkpoint (no download needed)."""
    from trtbuild.checkpoint import write_demo_checkpoint

    with console.status(f"writing the {kind} checkpoint to {out}"):
        write_demo_checkpoint(out, kind, force=force)
    console.print(f"[green]wrote[/] {out}")


@click.command("demo")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("artifacts/demo"), show_default=True)
@click.option("--model", "kind", type=click.Choice(["smollm2", "tiny-llama"]), default="smollm2", show_default=True)
@click.option("--max-tokens", type=int, default=32, show_default=True)
def demo(workdir: Path, kind: str, max_tokens: int) -> None:
    """The main job on the embedded default: checkpoint -> repository -> server -> gRPC/HTTP generations."""
    from trtbuild.demo import run_demo

    run_demo(workdir, kind=kind, max_tokens=max_tokens, console=console)


