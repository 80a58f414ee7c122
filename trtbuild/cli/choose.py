"""Choosing the build to ship: `trtbuild profile` (where the time goes), `trtbuild ab` (live A/B with a
verdict) and `trtbuild select` (the best measured build under constraints); the command line over
trtbuild.bench.profile, trtbuild.bench.ab and trtbuild.bench.select."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from trtbuild.cli.bench import _stdout
from trtbuild.cli.console import console
from trtbuild.errors import TrtbuildError


@click.command("ab")
@click.option("--a", "a", required=True, help="The current build: HOST:PORT[/MODEL] (MODEL: an entry point of its trtbuild.json).")
@click.option("--b", "b", required=True, help="The candidate: HOST:PORT[/MODEL].")
@click.option("--split", type=float, default=0.1, show_default=True, help="Fraction of the request stream sent to B.")
@click.option("--protocol", type=click.Choice(["grpc", "http"]), default="grpc", show_default=True)
@click.option("--stream/--no-stream", default=True, show_default=True)
@click.option("--concurrency", type=int, default=None, help="Closed loop: requests in flight [default: 4 unless --request-rate].")
@click.option("--request-rate", type=float, default=None, help="Open loop: requests per second (Poisson arrivals).")
@click.option("--requests", type=int, default=200, show_default=True, help="Measured requests of the whole stream (both arms).")
@click.option("--warmup", type=int, default=2, show_default=True, help="Requests sent first to each arm and left out.")
@click.option("--input-tokens-mean", type=float, default=128, show_default=True)
@click.option("--output-tokens-mean", type=float, default=128, show_default=True)
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="Tokenizer folder (default: the tokenizer_dir A's models name, if it exists here).")
@click.option("--metric", default="latency_p50", show_default=True,
              help="What the speedup is measured on: {ttft,itl,latency}_{p50,p90,p95,p99,mean}.")
@click.option("--min-speedup", type=float, default=1.0, show_default=True,
              help="ROLLOUT needs A/B of --metric at least this (below 1: B may be this much slower).")
@click.option("--max-error-rate", type=float, default=0.01, show_default=True, help="ROLLBACK when B fails more often.")
@click.option("--alpha", type=float, default=0.05, show_default=True, help="Significance level of the tests.")
@click.option("--min-agreement", type=float, default=None, help="ROLLBACK when B's greedy answers agree with A's on fewer tokens.")
@click.option("--agreement-prompts", type=int, default=8, show_default=True, help="Greedy prompts sent to both arms (0: none).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the split, the prompts and the bootstrap.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the result as JSON.")
def ab_cmd(a, b, split, protocol, stream, concurrency, request_rate, requests, warmup, input_tokens_mean, output_tokens_mean,
           tokenizer, metric, min_speedup, max_error_rate, alpha, min_agreement, agreement_prompts, seed, json_out) -> None:
    """Send one request stream to two servers, A and B, and decide: ROLLOUT (exit 0), ROLLBACK (1) or HOLD (3)."""
    from trtbuild.bench.ab import ABConfig, Arm, Thresholds, run_ab, tables, verdict_lines
    from trtbuild.bench.loadgen import LoadPoint
    from trtbuild.bench.run import BenchConfig
    from trtbuild.clients.prompts import LengthDistribution

    if concurrency is not None and request_rate is not None:
        raise TrtbuildError("give --concurrency or --request-rate, not both")
    load = LoadPoint(request_rate=request_rate) if request_rate is not None else LoadPoint(concurrency=concurrency or 4)
    bench = BenchConfig(url="", protocol=protocol, stream=stream, loads=(load,), requests=requests, warmup=warmup,
                        input_tokens=LengthDistribution(input_tokens_mean), output_tokens=LengthDistribution(output_tokens_mean),
                        tokenizer=tokenizer, seed=seed)
    config = ABConfig(Arm.parse(a, "--a"), Arm.parse(b, "--b"), bench, split=split, metric=metric,
                      thresholds=Thresholds(min_speedup, max_error_rate, alpha, min_agreement), agreement_prompts=agreement_prompts)
    with console.status(f"A/B: {requests} requests, {split:.0%} to B"):
        result = run_ab(config)
    out = _stdout()
    for table in tables(result):
        out.print(table)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    for line in verdict_lines(result):
        click.echo(line)
    if json_out is not None:
        json_out.write_text(json.dumps(result.to_json(), indent=2))
    sys.exit(result.verdict.exit_code)


@click.command("select")
@click.argument("results", nargs=-1, required=True)
@click.option("--objective", type=click.Choice(["throughput", "p99", "cost"]), default="throughput", show_default=True,
              help="throughput: output tokens/s; p99: end-to-end latency p99; cost: USD per 1M output tokens.")
@click.option("--load", default=None, help="Compare at this load point (bench's key: c4, r10-poisson); "
                                           "default: each build's best run within the SLO.")
@click.option("--max-ppl-delta", type=float, default=None, help="Most relative perplexity rise (validate's ppl_delta_rel), e.g. 0.02.")
@click.option("--min-token-agreement", type=float, default=None, help="Least greedy token agreement (validate, served).")
@click.option("--max-memory-gib", type=float, default=None, help="Most GPU memory (bench run --metrics-url measured it).")
@click.option("--slo", default=None, help="p99 limits of the operating point: ttft_ms=200,itl_ms=50,latency_ms=2000.")
@click.option("--gpu-hourly-cost", type=float, default=None, help="USD per hour: the cost objective from measured throughput.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="PNG of the objective against accuracy delta.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the selection as JSON.")
def select_cmd(results, objective, load, max_ppl_delta, min_token_agreement, max_memory_gib, slo, gpu_hourly_cost,
               plot_path, json_out) -> None:
    """The build that maximises OBJECTIVE under the constraints, from measured results: RESULT is [NAME=]PATH,
    a folder with a `bench run` results.json (and a `validate` report.json), or the results.json itself.
    Exits 1 when no build meets the constraints."""
    from trtbuild.bench.metrics import SLO
    from trtbuild.bench.select import Constraints, load_build, plot, select, table

    selection = select([load_build(r) for r in results], objective,
                       Constraints(max_ppl_delta, min_token_agreement, max_memory_gib, SLO.parse(slo)), load, gpu_hourly_cost)
    _stdout().print(table(selection))
    front = [c.build.name for c in selection.candidates if c.on_front]
    click.echo(f"Pareto front ({selection.objective} vs accuracy delta): {', '.join(front) or 'none (no build with accuracy results meets the constraints)'}")
    for c in selection.candidates:
        if c is not selection.chosen:
            click.echo(f"{c.build.name} lost: {c.why_lost}")
    if plot_path is not None and plot(selection, plot_path):
        console.print(f"[green]wrote[/] {plot_path}")
    if json_out is not None:
        json_out.write_text(json.dumps(selection.to_json(), indent=2))
    if selection.chosen is None:
        click.echo("selected: none: no build meets the constraints")
        sys.exit(1)
    click.echo(f"selected: {selection.chosen.build.name}")


@click.command("profile")
@click.argument("source", type=click.Path(path_type=Path, exists=True), required=False)
@click.option("--server", default=None, help="Instead of SOURCE: trace a running server, HOST:HTTP_PORT/MODEL "
                                             "(started with `trtbuild serve --trace-file PATH`).")
@click.option("--requests", type=int, default=8, show_default=True, help="--server: requests traced.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N, or auto (CUDA where a GPU is visible).")
@click.option("--batch", type=int, default=4, show_default=True, help="Prompts served together (at most the repository's max batch).")
@click.option("--input-tokens", type=int, default=64, show_default=True)
@click.option("--output-tokens", type=int, default=16, show_default=True)
@click.option("--top", type=int, default=15, show_default=True, help="Operators listed.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder for profile.json, profile.md, trace.json (--server: trace_split.json, .md, .png).")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
def profile_cmd(source, server, requests, device, batch, input_tokens, output_tokens, top, out, force) -> None:
    """Profile prefill and decode steps of the runtime on SOURCE (a checkpoint or a generated repository),
    or split a running server's request time by model with Triton's trace API (--server)."""
    from trtbuild.atomic import check_output_dir

    if (source is None) == (server is None):
        raise TrtbuildError("give SOURCE (a checkpoint or repository) or --server HOST:PORT/MODEL, not both")
    check_output_dir(out, force, inputs=(source,) if source else ())
    if server is not None:
        from trtbuild.bench.ab import Arm
        from trtbuild.bench import trace

        arm = Arm.parse(server, "--server")
        if arm.model is None:
            raise TrtbuildError(f"--server {server}: name the model, HOST:PORT/MODEL (an entry point of its trtbuild.json)")
        with console.status(f"tracing {requests} requests to {arm.model}"):
            splits = trace.collect(arm.url, arm.model, requests=requests, max_tokens=output_tokens)
        click.echo(trace.markdown(splits))
        trace.write(splits, out, force=force)
        console.print(f"[green]wrote[/] {out} (trace_split.json, trace_split.md, trace_split.png)")
        return
    from trtbuild.bench.profile import ProfileConfig, markdown, profile, write

    with console.status(f"profiling {batch} x ({input_tokens} + {output_tokens}) tokens"):
        result, prof = profile(ProfileConfig(source, device, batch, input_tokens, output_tokens, top))
    click.echo(markdown(result))
    write(result, prof, out, force=force)
    console.print(f"[green]wrote[/] {out} (profile.json, profile.md, trace.json)")
