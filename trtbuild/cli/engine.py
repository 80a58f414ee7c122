"""`trtbuild engine`, `trtbuild inspect` and `trtbuild compose`, and the engine side of `trtbuild repo`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from trtbuild.cli.console import console
from trtbuild.precisions import KV_CACHE_DTYPES, NAMES


@click.command("engine")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Engine directory to write, e.g. engines/NAME.")
@click.option("--precision", type=click.Choice(NAMES), default=None,
              help="Required for a Hugging Face checkpoint; read from a TensorRT-LLM checkpoint.")
@click.option("--kv-cache-dtype", type=click.Choice(KV_CACHE_DTYPES), default=None, help="KV-cache storage (auto: activation dtype).")
@click.option("--dtype", type=click.Choice(["auto", "float16", "bfloat16"]), default="auto", show_default=True,
              help="Activation dtype of quantized precisions.")
@click.option("--max-batch-size", type=int, default=64, show_default=True)
@click.option("--max-input-len", type=int, default=None, help="Longest prompt [min(1024, max_seq_len / 2)].")
@click.option("--max-seq-len", type=int, default=None, help="Prompt + output [min(2048, max_position_embeddings)].")
@click.option("--max-num-tokens", type=int, default=None, help="Tokens per engine step [min(8192, batch x seq)].")
@click.option("--max-beam-width", type=int, default=1, show_default=True)
@click.option("--kv-cache-type", type=click.Choice(["paged", "continuous", "disabled"]), default="paged", show_default=True)
@click.option("--tokens-per-block", type=int, default=32, show_default=True, help="Paged KV-cache block size.")
@click.option("--use-paged-context-fmha/--no-use-paged-context-fmha", default=True, show_default=True,
              help="Needed for KV-cache reuse and chunked context.")
@click.option("--use-fp8-context-fmha/--no-use-fp8-context-fmha", default=None, help="FP8 attention (fp8, Hopper) [auto].")
@click.option("--multiple-profiles/--no-multiple-profiles", default=False, show_default=True)
@click.option("--gemm-plugin", type=click.Choice(["auto", "disable", "float16", "bfloat16", "fp8"]), default="auto", show_default=True)
@click.option("--logits-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--tp-size", type=int, default=None, help="Tensor parallelism [1, or the checkpoint's].")
@click.option("--pp-size", type=int, default=None, help="Pipeline parallelism [1, or the checkpoint's].")
@click.option("--inflight-batching/--no-inflight-batching", default=True, show_default=True,
              help="Build for the in-flight batcher (needs a paged KV cache).")
@click.option("--workers", type=int, default=1, show_default=True, help="Ranks built in parallel.")
@click.option("--tokenizer-dir", type=click.Path(path_type=Path), default=None, help="Copied next to the engine [the checkpoint].")
@click.option("--image", default=None, help="Container for --runner docker [the pinned Triton TRT-LLM image].")
@click.option("--runner", type=click.Choice(["auto", "local", "docker"]), default="auto", show_default=True,
              help="auto: local when trtllm-build is on PATH, else docker.")
@click.option("--dry-run", is_flag=True, help="Check everything and print the plan; run nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan (or manifest) as JSON.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
def engine(checkpoint: Path, out: Path, runner: str, image: str | None, tokenizer_dir: Path | None, dry_run: bool,
           as_json: bool, force: bool, **options) -> None:
    """Build a TensorRT-LLM engine from CHECKPOINT (Hugging Face or TensorRT-LLM checkpoint)."""
    import dataclasses

    from trtbuild.atomic import check_output_dir
    from trtbuild.build.engine import EngineOptions, build_engine, choose_runner, plan_engine

    plan = plan_engine(checkpoint, EngineOptions(**options), out, runner=choose_runner(runner, image), tokenizer_dir=tokenizer_dir)
    if dry_run:
        check_output_dir(plan.out, force, inputs=plan.inputs)
        if as_json:
            click.echo(json.dumps(plan.to_json(), indent=2))
        else:
            _print_plan(plan)
        return
    _print_plan(plan)
    manifest = build_engine(plan, force=force)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(manifest), indent=2))
    console.print(f"[green]wrote[/] {plan.out} ({manifest.precision}, tp {manifest.tp_size} x pp {manifest.pp_size})")


def _print_plan(plan) -> None:
    c = plan.config
    gpus = ", ".join(f"{g.name} ({g.sm})" for g in plan.gpus) or "none visible"
    console.print(f"[bold]engine plan[/] {plan.source.path} ({plan.source.format}, {plan.source.architecture}) -> {plan.out}", highlight=False)
    console.print(f"  precision {c.precision}, KV cache {c.kv_cache_dtype}, dtype {c.dtype}, tp {c.tp_size} x pp {c.pp_size}; "
                  f"runner {plan.runner.kind}{' ' + plan.runner.image if plan.runner.image else ''}; GPUs: {gpus}", highlight=False)
    for i, step in enumerate(plan.describe(), 1):
        console.print(f"  {i}. {step}", highlight=False, soft_wrap=True)


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--gpu-mem-gib", type=float, default=80.0, show_default=True, help="Memory of one GPU.")
@click.option("--seq-len", type=int, default=None, help="Tokens per sequence [the engine's max_seq_len, or min(2048, max positions)].")
@click.option("--kv-dtype", type=click.Choice(["auto", "fp32", "fp16", "bf16", "fp8", "int8"]), default="auto", show_default=True)
@click.option("--tp-size", type=int, default=None)
@click.option("--pp-size", type=int, default=None)
@click.option("--precision", type=click.Choice(NAMES), default=None,
              help="Precision of the build plan shown for a Hugging Face checkpoint [its 16-bit type].")
@click.option("--kv-fraction", type=float, default=0.9, show_default=True, help="kv_cache_free_gpu_mem_fraction.")
@click.option("--reserve-gib", type=float, default=2.0, show_default=True, help="CUDA context + activation buffers.")
@click.option("--tokens-per-block", type=int, default=None, help="KV-cache block [the engine's, or 32].")
@click.option("--json", "as_json", is_flag=True)
def inspect_cmd(path: Path, as_json: bool, **options) -> None:
    """Parameters, weight and KV-cache bytes, the largest batch that fits, and the build plan of PATH."""
    from rich.console import Console

    from trtbuild.build.inspection import inspect_path, render

    report = inspect_path(path, **options)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        render(report, Console())
