"""`trtbuild export onnx`, and the ONNX branch of `trtbuild repo` (options + handler)."""

from __future__ import annotations

import functools
from pathlib import Path

import click
from rich.table import Table

from builder.errors import TrtbuildError
from builder.onnx_repository import ONNX_RUNTIMES

TASK_NAMES = ("feature-extraction", "text-classification", "text-generation-with-past")


@click.group("export")
def export() -> None:
    """Export a checkpoint to a portable format (ONNX)."""


@export.command("onnx")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--task", type=click.Choice(TASK_NAMES), required=True,
              help="feature-extraction / text-classification (encoders), text-generation-with-past (decoders).")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset; 18 or newer.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True)
@click.option("--int8-mode", type=click.Choice(["dynamic", "static"]), default=None,
              help="INT8: dynamic (weights only, default) or static (QDQ, calibrated; encoders).")
@click.option("--calib-data", type=click.Path(path_type=Path), default=None,
              help="Static INT8 calibration text: one sample per line, or JSONL with a 'text' field.")
@click.option("--calib-samples", type=int, default=128, show_default=True, help="Calibration samples used at most.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Export directory to write.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
def export_onnx_cmd(checkpoint: Path, task: str, opset: int, precision: str, int8_mode: str | None,
                    calib_data: Path | None, calib_samples: int, out: Path, force: bool) -> None:
    """Export CHECKPOINT to ONNX, convert its precision and validate it against PyTorch."""
    from builder.cli import console
    from builder.onnx_export import ExportOptions, export_onnx

    if calib_samples < 1:
        raise TrtbuildError(f"--calib-samples must be a positive integer, got {calib_samples}")
    options = ExportOptions(checkpoint=checkpoint, task=task, out=out, opset=opset, precision=precision,
                            int8_mode=int8_mode, calib_data=calib_data, calib_samples=calib_samples, force=force)
    with console.status("exporting") as status:
        result = export_onnx(options, progress=lambda message: status.update(message))
    console.print(validation_table(result.manifest))
    console.print(f"[green]wrote[/] {out} ({result.manifest['model_file']}, export.json)")


def validation_table(manifest: dict) -> Table:
    v = manifest["validation"]
    table = Table(title=f"{manifest['task']} {manifest['precision']}"
                        f"{' ' + manifest['int8_mode'] if manifest.get('int8_mode') else ''} vs PyTorch "
                        f"(export {manifest['timings']['export_s']:.1f} s, total {manifest['timings']['total_s']:.1f} s)")
    for column in ("batch", "seq", "past", "output", "max abs", "rel", "top-1 / cosine"):
        table.add_column(column, justify="right")
    for case in v["cases"]:
        for name, row in case["outputs"].items():
            quality = row.get("top1", row.get("cosine"))
            table.add_row(str(case["batch"]), str(case["seq"]), str(case["past"]), name, f"{row['max_abs']:.3g}",
                          f"{row['rel']:.3g}", "" if quality is None else f"{quality:.5f}")
    return table


def onnx_repo_options(f):
    """Options only the ONNX runtimes of `repo` read (batching, instances and queues come from the
    serving options, builder.serving)."""
    options = [
        click.option("--trt-accelerator", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                     help="ONNX: TensorRT execution provider in the onnxruntime backend (auto: on where it can run)."),
        click.option("--trt-precision", type=click.Choice(["FP32", "FP16", "INT8"], case_sensitive=False), default=None,
                     help="ONNX: TensorRT execution-provider precision; default: the export's."),
        click.option("--trt-workspace-mib", type=int, default=1024, show_default=True,
                     help="ONNX: TensorRT workspace (execution provider and trtexec)."),
        click.option("--trt-engine-cache", default="/tmp/trtbuild/trt_engine_cache", show_default=True,
                     help="ONNX: where the TensorRT execution provider caches engines ('' to disable)."),
        click.option("--opt-batch-size", type=int, default=None, help="ONNX, tensorrt: profile batch size (default: max)."),
        click.option("--opt-seq-len", type=int, default=128, show_default=True, help="ONNX, tensorrt: profile sequence length."),
        click.option("--pad-to-multiple-of", type=int, default=8, show_default=True,
                     help="ONNX encoders: the tokenizer pads each request to a multiple of this many tokens."),
    ]
    return functools.reduce(lambda acc, opt: opt(acc), reversed(options), f)


ONNX_OPTION_NAMES = ("trt_accelerator", "trt_precision", "trt_workspace_mib", "trt_engine_cache", "opt_batch_size",
                     "opt_seq_len", "pad_to_multiple_of")
LLM_ONLY_OPTIONS = ("dtype", "tokenizer_dir", "kv_cache_page_size", "kv_cache_free_gpu_mem_fraction", "text_env", "llm_engine",
                    "max_num_tokens", "enable_kv_cache_reuse", "stream_interval_ms", "stream_max_tokens", "kv_cache_dtype",
                    "speculative_decoding_mode", "max_draft_len", "max_matching_ngram_size")


def _given(options: dict, names) -> list[str]:
    """Which of `names` the user typed (not defaults)."""
    from click.core import ParameterSource

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return []
    return [k for k in names if k in options and ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None)]


def pop_onnx_options(options: dict, runtime: str) -> dict:
    """Remove the ONNX-only options from `repo`'s keyword arguments; typing one for another runtime is an error."""
    given = _given(options, ONNX_OPTION_NAMES)
    if given and runtime not in ONNX_RUNTIMES:
        raise TrtbuildError(f"--{given[0].replace('_', '-')} only applies to --runtime onnxruntime, onnxruntime-python or tensorrt")
    return {name: options.pop(name) for name in ONNX_OPTION_NAMES if name in options}


def onnx_repo(export_dir: Path, out: Path, runtime: str, force: bool, serving, **o) -> None:
    """`trtbuild repo EXPORT_DIR --runtime onnxruntime|onnxruntime-python|tensorrt`: `serving` is the
    ServingPolicy from the serving options; `o` holds build_options and the ONNX options."""
    from builder.cli import console
    from builder.onnx_repository import OnnxServeSpec, generate_onnx_repository

    given = _given(o, LLM_ONLY_OPTIONS)
    if given:
        raise TrtbuildError(f"--{given[0].replace('_', '-')} does not apply to --runtime {runtime}",
                            hint="the export directory fixes the precision and holds the tokenizer")
    serve = OnnxServeSpec(
        export_dir=Path(export_dir), runtime=runtime, max_batch_size=o["max_batch_size"],
        max_input_len=o["max_input_len"], max_output_len=o["max_output_len"], device=o.get("device", "auto"),
        serving=serving, trt_accelerator=o["trt_accelerator"], trt_precision=o["trt_precision"],
        trt_workspace_mib=o["trt_workspace_mib"], trt_engine_cache=o["trt_engine_cache"] or None,
        opt_batch_size=o["opt_batch_size"], opt_seq_len=o["opt_seq_len"], pad_to_multiple_of=o["pad_to_multiple_of"],
    )
    result = generate_onnx_repository(serve, out, force=force)
    console.print(f"[green]wrote[/] {out} ({', '.join(result.manifest['models'])}; runtime {runtime})")
    if result.trtexec:
        info = result.manifest["trtexec"]
        console.print(f"build the TensorRT plan before serving (in {info['image']}, or where trtexec exists):")
        console.print(f"  docker run --rm --gpus all -v {Path(out).absolute()}:/models -w /models {info['image']} "
                      f"bash {info['script']}", highlight=False, soft_wrap=True)
        console.print(f"  ({result.trtexec})", highlight=False, soft_wrap=True)
