"""`trtbuild quantize`: a thin layer over trtbuild.build.quantize.quantize."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from trtbuild.cli.console import console
from trtbuild.build.quantize import (DEVICES, DTYPES, FORMATS, INT4_BLOCK_SIZES, KV_CACHE_DTYPES, PRECISIONS, QuantizeOptions,
                              Tolerance, quantize, tolerance_for)


@click.command("quantize")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--precision", type=click.Choice(PRECISIONS), required=True,
              help="fp16/bf16: cast only; fp8, int8_sq (SmoothQuant W8A8), int8_wo/int4_wo (weight-only), int4_awq.")
@click.option("--kv-cache-dtype", type=click.Choice(KV_CACHE_DTYPES), default="auto", show_default=True,
              help="auto: the activation dtype; fp8/int8 calibrate KV-cache scales.")
@click.option("--calib-size", type=int, default=128, show_default=True, help="Calibration samples.")
@click.option("--calib-data", type=click.Path(path_type=Path), default=None,
              help="UTF-8 text, one sample per non-empty line [trtbuild/data/calibration.txt].")
@click.option("--calib-max-len", type=int, default=256, show_default=True, help="Tokens per sample, truncated.")
@click.option("--eval-size", type=int, default=16, show_default=True,
              help="Held-out samples (the file's last lines) for the logits delta.")
@click.option("--tp-size", type=int, default=1, show_default=True, help="Tensor parallelism (rank files; trtllm).")
@click.option("--pp-size", type=int, default=1, show_default=True, help="Pipeline parallelism (rank files; trtllm).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="trtllm", show_default=True,
              help="trtllm: config.json + rank{N}.safetensors for trtllm-build; hf: pre-quantized HF checkpoint for the LLM API.")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="Dtype of what is not quantized [the checkpoint's 16-bit dtype, else float16].")
@click.option("--block-size", type=click.Choice(["auto", *map(str, INT4_BLOCK_SIZES)]), default="auto", show_default=True,
              help="INT4 group size (int4_awq; int4_wo with --format hf) [128 where the shapes allow, else 64].")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--max-mean-kl", type=float, default=None, help="Override the precision's KL tolerance (nats/token).")
@click.option("--min-top1", type=float, default=None, help="Override the precision's top-1 agreement tolerance.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory to write.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def quantize_cmd(checkpoint: Path, precision: str, kv_cache_dtype: str, calib_size: int, calib_data: Path | None,
                 calib_max_len: int, eval_size: int, tp_size: int, pp_size: int, fmt: str, dtype: str, block_size: str,
                 device: str, max_mean_kl: float | None, min_top1: float | None, out: Path, force: bool, as_json: bool) -> None:
    """Quantize CHECKPOINT with NVIDIA ModelOpt, check its logits against the original, export to --out."""
    tolerance = None
    if max_mean_kl is not None or min_top1 is not None:
        base = tolerance_for(precision, kv_cache_dtype)
        tolerance = Tolerance(base.max_mean_kl if max_mean_kl is None else max_mean_kl,
                              base.min_top1 if min_top1 is None else min_top1)
    options = QuantizeOptions(
        precision=precision, kv_cache_dtype=kv_cache_dtype, calib_size=calib_size, calib_data=calib_data,
        calib_max_len=calib_max_len, eval_size=eval_size, tp_size=tp_size, pp_size=pp_size, format=fmt, dtype=dtype,
        block_size=None if block_size == "auto" else int(block_size), device=device, tolerance=tolerance,
    )
    result = quantize(checkpoint, out, options, force=force, console=console)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(result), indent=2, default=str))
    d, t = result.delta, result.tolerance
    console.print(
        f"[green]wrote[/] {result.out} ({fmt}; quant_algo {result.quant_algo}, kv_cache_quant_algo "
        f"{result.kv_cache_quant_algo}, {result.dtype}, tp {result.tp_size} x pp {result.pp_size})\n"
        f"logits vs original on {d.samples} held-out samples ({d.tokens} tokens): mean KL {d.mean_kl:.5f} "
        f"(max {t.max_mean_kl}), top-1 {d.top1_agreement:.4f} (min {t.min_top1}), max |diff| {d.max_abs_diff:.3f}, "
        f"mean |diff| {d.mean_abs_diff:.4f}, perplexity {d.perplexity_reference:.2f} -> {d.perplexity_quantized:.2f}; "
        f"{result.timings_s['total']:.0f} s",
        highlight=False,
    )
