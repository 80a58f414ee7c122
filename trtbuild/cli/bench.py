"""`trtbuild bench run` and `trtbuild bench compare`: the command line over trtbuild.bench.run / trtbuild.bench.compare."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
from rich.console import Console

from trtbuild.cli.console import console
from trtbuild.errors import TrtbuildError


def _numbers(text: str | None, kind, option: str) -> list:
    if not text:
        return []
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise TrtbuildError(f"{option}: '{text}' is not a comma-separated list of numbers") from None
    if any(v <= 0 for v in values):
        raise TrtbuildError(f"{option}: values must be positive, got {text}")
    return values


def _shapes(values: tuple[str, ...]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    shapes = []
    for value in values:
        name, sep, dims = value.partition("=")
        try:
            shape = tuple(int(d) for d in dims.split(",") if d.strip())
        except ValueError:
            shape = ()
        if not sep or not name or not shape:
            raise TrtbuildError(f"--input-shape '{value}': expected NAME=D1,D2,... (batch dimension included)")
        shapes.append((name, shape))
    return tuple(shapes)


def _stdout() -> Console:
    """Tables on stdout; piped to a file they keep their rows on one line each."""
    out = Console()
    return out if out.is_terminal else Console(width=160)


@click.group("bench")
def bench() -> None:
    """Benchmark a served model (`run`) and compare two results (`compare`)."""


@bench.command("run")
@click.option("--url", default=None, help="host:port; defaults to 127.0.0.1:8001 (grpc) or 127.0.0.1:8000 (http).")
@click.option("--protocol", type=click.Choice(["grpc", "http"]), default="grpc", show_default=True)
@click.option("--model", default="ensemble", show_default=True)
@click.option("--interface", type=click.Choice(["auto", "ensemble", "llmapi", "tensor"]), default="auto", show_default=True,
              help="auto: from the model's inputs (text_input+max_tokens: ensemble/BLS; sampling_param_max_tokens: llmapi; else tensor).")
@click.option("--stream/--no-stream", default=True, show_default=True, help="Streamed responses (TTFT and ITL need them).")
@click.option("--concurrency", default=None, help="Closed loop: comma-separated concurrencies to sweep, e.g. 1,4,16,64.")
@click.option("--request-rate", default=None, help="Open loop: comma-separated request rates (requests/s) to sweep.")
@click.option("--arrival", type=click.Choice(["poisson", "constant"]), default="poisson", show_default=True)
@click.option("--max-concurrency", type=int, default=None, help="Open loop: most requests in flight (default: unbounded).")
@click.option("--requests", type=int, default=None, help="Measured requests per load point [default: 100 unless --duration].")
@click.option("--duration", type=float, default=None, help="Seconds of sending per load point.")
@click.option("--warmup", type=int, default=2, show_default=True, help="Requests sent first and left out of every statistic.")
@click.option("--input-tokens-mean", type=float, default=128, show_default=True)
@click.option("--input-tokens-stddev", type=float, default=0, show_default=True)
@click.option("--output-tokens-mean", type=float, default=128, show_default=True)
@click.option("--output-tokens-stddev", type=float, default=0, show_default=True)
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="Tokenizer folder (default: the tokenizer_dir the server's models name, if it exists here).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="JSONL prompts: {\"text\": ..., \"output_tokens\": N} per line, instead of synthetic ones.")
@click.option("--num-prompts", type=int, default=1000, show_default=True, help="Synthetic prompts cycled through by --duration runs.")
@click.option("--force-output-len/--no-force-output-len", default=True, show_default=True,
              help="Send min_tokens = max_tokens so every answer has exactly the requested length.")
@click.option("--slo", default=None, help="Goodput objectives, e.g. ttft_ms=200,itl_ms=50,latency_ms=5000.")
@click.option("--gpu-hourly-cost", type=float, default=None, help="USD per hour of the serving hardware: adds cost columns.")
@click.option("--request-timeout", type=float, default=600, show_default=True, help="Seconds before a request counts as failed.")
@click.option("--max-errors", type=int, default=100, show_default=True, help="Stop a run (and the sweep) after this many failures.")
@click.option("--input-shape", multiple=True, help="Tensor models: NAME=D1,D2 (batch dimension included) for a variable-shape input.")
@click.option("--http-json", is_flag=True, help="Tensor models over HTTP: send JSON tensors instead of binary ones.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--metrics-url", default=None, help="The server's metrics endpoint (host:8002): records its GPU memory for `trtbuild select`.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Folder for JSON, CSV, JSONL and plots.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
def run_cmd(url, protocol, model, interface, stream, concurrency, request_rate, arrival, max_concurrency, requests, duration,
            warmup, input_tokens_mean, input_tokens_stddev, output_tokens_mean, output_tokens_stddev, tokenizer, prompts_file,
            num_prompts, force_output_len, slo, gpu_hourly_cost, request_timeout, max_errors, input_shape, http_json, seed,
            metrics_url, out, force, no_plots) -> None:
    """Measure TTFT, ITL, latency, throughput and goodput of a served model."""
    from trtbuild.atomic import check_output_dir
    from trtbuild.bench.run import BenchConfig, run_benchmark
    from trtbuild.bench.loadgen import LoadPoint
    from trtbuild.bench.metrics import SLO
    from trtbuild.clients.prompts import LengthDistribution
    from trtbuild.bench.report import table, write

    if out is not None:
        check_output_dir(out, force, inputs=(prompts_file, tokenizer if tokenizer and Path(tokenizer).exists() else None))
    loads = [LoadPoint(concurrency=int(c)) for c in _numbers(concurrency, int, "--concurrency")]
    loads += [LoadPoint(request_rate=r, arrival=arrival, max_concurrency=max_concurrency)
              for r in _numbers(request_rate, float, "--request-rate")]
    if max_concurrency is not None and max_concurrency < 1:
        raise TrtbuildError(f"--max-concurrency must be at least 1, got {max_concurrency}")
    config = BenchConfig(
        url=url or ("127.0.0.1:8001" if protocol == "grpc" else "127.0.0.1:8000"),
        protocol=protocol, model=model, interface=interface, stream=stream,
        loads=tuple(loads or [LoadPoint(concurrency=1)]),
        requests=requests if requests is not None or duration is not None else 100, duration=duration, warmup=warmup,
        input_tokens=LengthDistribution(input_tokens_mean, input_tokens_stddev),
        output_tokens=LengthDistribution(output_tokens_mean, output_tokens_stddev),
        prompts_file=prompts_file, num_prompts=num_prompts, tokenizer=tokenizer, force_output_len=force_output_len,
        slo=SLO.parse(slo), gpu_hourly_cost=gpu_hourly_cost, request_timeout=request_timeout, max_errors=max_errors,
        seed=seed, input_shapes=_shapes(input_shape), http_binary=not http_json, metrics_url=metrics_url,
    )
    with _Progress(config) as progress:
        result = run_benchmark(config, progress=progress.update, on_start=progress.start)
    _stdout().print(table(result))
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    for run in result.runs:
        for error, count in run.metrics.errors.items():
            console.print(f"[red]{run.load.label}: {count} x[/] {error}", highlight=False)
    if out is not None:
        write(result, out, inputs=(prompts_file,), force=force, plots=not no_plots)
        console.print(f"[green]wrote[/] {out} (results.json, results.csv, requests.jsonl{'' if no_plots else ', plots'})")
    if any(r.aborted == "interrupted" for r in result.runs) or any("interrupted" in n for n in result.notes):
        console.print("[yellow]interrupted:[/] the results above cover what was measured before Ctrl-C")
        sys.exit(130)
    if not any(r.metrics.completed for r in result.runs):
        raise TrtbuildError("no request completed", hint="see the errors above")
    aborted = [r for r in result.runs if r.aborted]
    if aborted:
        console.print(f"[bold red]aborted[/] at {aborted[0].load.label}: {aborted[0].aborted}; "
                      "the results above (and in --out) cover what was measured", highlight=False)
        sys.exit(1)


class _Progress:
    """A rich progress bar per load point, refreshed at most ten times a second."""

    def __init__(self, config):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.config = config
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.fields[failed]}"), console=console, transient=False)
        self.task = None
        self.last = 0.0

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def start(self, point, total) -> None:
        bound = total if total is not None else (int(self.config.duration) if self.config.duration else None)
        label = point.label if total is not None else f"{point.label} (seconds)"
        self.task = self.progress.add_task(label, total=bound, failed="")
        self.last = 0.0

    def update(self, point, done, failed, elapsed) -> None:
        now = time.perf_counter()
        if now - self.last < 0.1 and done != self.config.requests:
            return
        self.last = now
        completed = done if self.config.requests is not None else min(elapsed, self.config.duration or elapsed)
        self.progress.update(self.task, completed=completed, failed=f"[red]{failed} failed[/]" if failed else "")


@bench.command("compare")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("new", type=click.Path(path_type=Path))
@click.option("--metric", default="output_tokens_per_s", show_default=True,
              help="Metric of the verdict and the regression check: output_tokens_per_s, requests_per_s, goodput_per_s, "
                   "or {ttft,itl,latency}_{p50,p90,p95,p99,mean}.")
@click.option("--max-regression", type=float, default=0.2, show_default=True,
              help="Exit 1 when --metric gets worse by more than this fraction at any load point.")
@click.option("--alpha", type=float, default=0.05, show_default=True, help="Significance level of Welch's t-test.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the comparison as JSON.")
def compare_cmd(base: Path, new: Path, metric: str, max_regression: float, alpha: float, json_out: Path | None) -> None:
    """Compare two `bench run` results (results.json or their --out folders)."""
    from trtbuild.bench.compare import compare, load_result, table

    comparison = compare(load_result(base), load_result(new), metric=metric, max_regression=max_regression, alpha=alpha)
    _stdout().print(table(comparison))
    for line in comparison.verdict_lines():
        click.echo(line)
    if comparison.unmatched:
        console.print(f"[yellow]note:[/] load points in only one file: {', '.join(comparison.unmatched)}")
    if json_out is not None:
        json_out.write_text(json.dumps(comparison.to_json(), indent=2))
    if comparison.regressed:
        console.print(f"[bold red]regression:[/] {metric} got worse by more than {max_regression:.0%}")
        sys.exit(1)
