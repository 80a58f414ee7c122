"""Benchmark reports: a terminal table, and JSON, CSV, per-request JSONL and PNG plots on disk.

Files under the output folder:
- `results.json`: config, environment, notes and per run the aggregates, Triton's own statistics
  for the run and the per-request samples that `bench compare` tests;
- `results.csv`: one row per load point (concurrency or request rate);
- `requests.jsonl`: one line per request, warm-up included and marked;
- `throughput_latency.png`, `ttft.png`, `itl.png`, `latency.png`: the sweep's throughput against
  latency curve and the distributions (TTFT and ITL for streamed runs only).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.table import Table

from trtbuild.atomic import atomic_output_dir

if TYPE_CHECKING:
    from trtbuild.bench.run import BenchResult, RunResult
    from trtbuild.bench.metrics import RequestRecord


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(result: "BenchResult") -> Table:
    target = f"{result.interface.name} ({result.interface.kind}, {result.config.protocol}, {'streaming' if result.streaming else 'not streaming'})"
    t = Table(title=f"trtbuild bench: {target}")
    columns = ["load", "ok", "err", "req/s", "tok/s", "TTFT p50", "p99", "ITL p50", "p99", "lat p50", "p99"]
    if result.config.slo.active:
        columns.append("good/s")
    if result.config.gpu_hourly_cost:
        columns += ["$/1k req", "$/1M tok"]
    for c in columns:
        t.add_column(c, justify="left" if c == "load" else "right")
    t.caption = "latencies in ms; tok/s: output tokens per second" + ("; good/s: requests meeting every SLO per second" if result.config.slo.active else "")
    for run in result.runs:
        m = run.metrics

        def pair(stats):
            return ["-", "-"] if stats is None else [_f(stats.p50), _f(stats.p99)]

        row = [run.load.short + (" [yellow](stopped)[/]" if run.aborted else ""), str(m.completed),
               f"[red]{m.failed}[/]" if m.failed else "0", _f(m.requests_per_s, 2), _f(m.output_tokens_per_s, 0),
               *pair(m.ttft_ms), *pair(m.itl_ms), *pair(m.latency_ms)]
        if result.config.slo.active:
            row.append(_f(m.goodput_per_s, 2))
        if result.config.gpu_hourly_cost:
            row += [_f(m.cost.usd_per_1k_requests if m.cost else None, 3), _f(m.cost.usd_per_1m_output_tokens if m.cost else None, 2)]
        t.add_row(*row)
    return t


def record_json(record: "RequestRecord", run: str | None) -> dict[str, Any]:
    ms = lambda v: None if v is None else round(v * 1e3, 4)  # noqa: E731
    return {
        "run": run,
        "index": record.index,
        "prompt_index": record.prompt_index,
        "warmup": record.warmup,
        "ok": record.ok,
        "error": record.error,
        "send_s": record.send,
        "scheduled_s": record.scheduled,
        "ttft_ms": ms(record.ttft),
        "latency_ms": ms(record.latency),
        "itl_ms": ms(record.itl),
        "input_tokens": record.input_tokens,
        "output_tokens": record.output_tokens,
        "requested_output_tokens": record.requested_output_tokens,
        "token_source": record.token_source or None,
        "responses": len(record.arrivals),
        "response_offsets_ms": [round((t - record.send) * 1e3, 4) for t in record.arrivals],
        "text": record.text,
    }


def csv_rows(result: "BenchResult") -> list[dict[str, Any]]:
    rows = []
    for run in result.runs:
        row: dict[str, Any] = {"load": run.load.label, "concurrency": run.load.concurrency, "request_rate": run.load.request_rate,
                               "arrival": run.load.arrival if run.load.request_rate else None,
                               "max_concurrency": run.load.max_concurrency, "aborted": run.aborted}
        row.update(run.metrics.flat())
        if run.server:
            row.update({f"server_{k}": v for k, v in run.server.items()})
        rows.append(row)
    return rows


def write(result: "BenchResult", out: Path, *, inputs=(), force: bool = False, plots: bool = True) -> Path:
    """Write every file at once (atomically) under `out`."""
    with atomic_output_dir(Path(out), force, inputs=inputs) as staging:
        (staging / "results.json").write_text(json.dumps(result.to_json(), indent=2, default=str))
        rows = csv_rows(result)
        if rows:
            fields = list(dict.fromkeys(k for row in rows for k in row))
            with open(staging / "results.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
        with open(staging / "requests.jsonl", "w") as f:
            for r in result.warmup:
                f.write(json.dumps(record_json(r, None)) + "\n")
            for run in result.runs:
                for r in run.records:
                    f.write(json.dumps(record_json(r, run.load.key)) + "\n")
        if plots and result.runs:
            write_plots(result, staging)
    return Path(out)


def write_plots(result: "BenchResult", folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    runs = [r for r in result.runs if r.metrics.latency_ms is not None]
    if not runs:
        return written
    tokens = result.interface.is_llm and any(r.metrics.output_tokens_per_s > 0 for r in runs)
    x_of = (lambda r: r.metrics.output_tokens_per_s) if tokens else (lambda r: r.metrics.requests_per_s)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [("latency p50", "-", lambda r: r.metrics.latency_ms.p50), ("latency p99", "--", lambda r: r.metrics.latency_ms.p99)]
    if result.streaming:
        series.append(("TTFT p50", ":", lambda r: r.metrics.ttft_ms.p50 if r.metrics.ttft_ms else None))
    families = [("closed loop", "o", [r for r in runs if r.load.concurrency is not None]),
                ("open loop", "s", [r for r in runs if r.load.concurrency is None])]
    for family, marker, members in families:
        members = sorted(members, key=x_of)
        for name, style, y_of in series:
            points = [(x_of(r), y_of(r), r) for r in members if y_of(r) is not None]
            if not points:
                continue
            ax.plot([p[0] for p in points], [p[1] for p in points], linestyle=style, marker=marker, label=f"{name} ({family})")
            if name == "latency p50":
                for x, y, r in points:
                    ax.annotate(r.load.short, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("output tokens/s" if tokens else "requests/s")
    ax.set_ylabel("ms")
    ax.set_title(f"{result.interface.name}: throughput vs latency")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(_save(fig, folder / "throughput_latency.png"))
    plt.close(fig)

    for metric, title in (("latency_ms", "request latency"), ("ttft_ms", "time to first token"), ("itl_ms", "inter-token latency")):
        data = [(r.load.short, _samples(r, metric)) for r in runs]
        data = [(k, v) for k, v in data if v]
        if not data:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        every = np.concatenate([v for _, v in data])
        bins = np.histogram_bin_edges(every, bins=min(50, max(5, len(every) // 4)))
        for key, values in data:
            ax.hist(values, bins=bins, histtype="step", linewidth=1.5, label=key)
        ax.set_xlabel("ms")
        ax.set_ylabel("requests")
        ax.set_title(f"{result.interface.name}: {title}")
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, folder / f"{metric.removesuffix('_ms')}.png"))
        plt.close(fig)
    return written


def _samples(run: "RunResult", metric: str) -> list[float]:
    ok = [r for r in run.records if r.ok]
    values = {"latency_ms": [r.latency for r in ok], "ttft_ms": [r.ttft for r in ok] if run.metrics.ttft_ms else [],
              "itl_ms": [r.itl for r in ok] if run.metrics.itl_ms else []}[metric]
    return [v * 1e3 for v in values if v is not None]


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path
