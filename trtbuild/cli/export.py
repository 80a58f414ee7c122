"""`trtbuild export onnx`: a thin layer over trtbuild.build.onnx_export."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from trtbuild.cli.console import console
from trtbuild.errors import TrtbuildError

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
    from trtbuild.build.onnx_export import ExportOptions, export_onnx

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
