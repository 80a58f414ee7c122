"""Prometheus recording rules, the Grafana dashboard and the scrape setup for a trtbuild deployment.

One catalogue feeds everything: `METRICS` (the series Triton, its GPU collector, the TensorRT-LLM
backend and the benchmark client expose), `RECORDING_RULES` (what Prometheus derives from them) and
`PANELS` (what Grafana plots). The Kubernetes PrometheusRule, the compose Prometheus rules file and
the dashboard JSON are all built from these lists, so a panel cannot plot a series that no rule
records and no exporter exposes (tests/test_monitoring.py checks that against a real server).

Metric families a real Triton 2.51 exposes (nvidia-pytriton 0.7.0 on CPU, read from /metrics):
counters nv_inference_request_success, nv_inference_request_failure (label `reason`),
nv_inference_count, nv_inference_exec_count, nv_inference_request_duration_us,
nv_inference_queue_duration_us, nv_inference_compute_input_duration_us,
nv_inference_compute_infer_duration_us, nv_inference_compute_output_duration_us; gauges
nv_inference_pending_request_count, nv_pinned_memory_pool_total_bytes, nv_pinned_memory_pool_used_bytes,
nv_cpu_utilization, nv_cpu_memory_total_bytes, nv_cpu_memory_used_bytes. With
`--metrics-config=summary_latencies=true` also the summaries nv_inference_request_summary_us,
nv_inference_queue_summary_us, nv_inference_compute_{input,infer,output}_summary_us (quantiles 0.5,
0.9, 0.95, 0.99, 0.999 over a sliding window). Triton 2.51 has no latency histograms
(`histogram_latencies=true` is accepted and adds nothing), so p95 latency comes from the summary.
GPU series (nv_gpu_*) need a GPU and DCGM; nv_trt_llm_* come from the TensorRT-LLM C++ backend only.

Caveat for autoscaling: `triton:queue_compute:ratio` follows NVIDIA's reference (Triton tutorials,
Deployment/Kubernetes/TensorRT-LLM_Autoscaling_and_Load_Balancing). A decoupled LLM model that
batches in flight (ours and NVIDIA's) accepts requests at once and queues them inside its executor,
where Triton's queue timer does not see them; the ratio then grows mainly through the pre/post-
processing models' dynamic-batcher queues.

Triton has no TTFT or inter-token metrics for these models, so the benchmark client publishes its
own (`bench_registry`, names in `CLIENT_METRICS`) through a Pushgateway or a node-exporter textfile.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import yaml

from trtbuild.errors import TrtbuildError

TEMPLATE_DIR = "monitoring"

# Triton flags the deployment must pass so the series the rules read exist.
TRITON_METRICS_ARGS: tuple[str, ...] = (
    "--allow-metrics=true",
    "--allow-gpu-metrics=true",
    "--metrics-config=summary_latencies=true",
)

PROMETHEUS_IMAGE = "prom/prometheus:v2.55.1"
PUSHGATEWAY_IMAGE = "prom/pushgateway:v1.10.0"
GRAFANA_IMAGE = "grafana/grafana:11.3.0"
COMPOSE_PROFILE = "monitoring"
DASHBOARD_UID = "trtbuild-triton"
DASHBOARD_FILE = "trtbuild-triton.json"

# Our model names (trtbuild.spec.ModelNames): the entry points a client calls, and the models doing the work.
ENTRYPOINTS = 'model=~"ensemble|.*_bls"'
WORKERS = 'model!~"ensemble|.*_bls"'
# Labels a per-replica series keeps: namespace/pod on Kubernetes (prometheus-adapter maps them to the
# pod), instance everywhere (compose has no pods).
PER_REPLICA = "namespace, pod, instance"


@dataclasses.dataclass(frozen=True)
class Metric:
    """A series some exporter publishes."""

    name: str
    kind: str  # counter | gauge | summary
    source: str  # triton | triton-gpu | trtllm | client
    help: str
    only_on: str | None = None  # why a local CPU tritonserver cannot expose it (None: it can)


METRICS: tuple[Metric, ...] = (
    Metric("nv_inference_request_success", "counter", "triton", "successful requests, per model"),
    Metric("nv_inference_request_failure", "counter", "triton", "failed requests, per model and reason"),
    Metric("nv_inference_request_duration_us", "counter", "triton", "cumulative end-to-end request time"),
    Metric("nv_inference_queue_duration_us", "counter", "triton", "cumulative time in the scheduler queue"),
    Metric("nv_inference_compute_infer_duration_us", "counter", "triton", "cumulative time executing the model"),
    Metric("nv_inference_pending_request_count", "gauge", "triton", "requests waiting for execution, per model"),
    Metric("nv_inference_request_summary_us", "summary", "triton",
           "request-time quantiles over a sliding window (needs --metrics-config=summary_latencies=true)"),
    Metric("nv_cpu_utilization", "gauge", "triton", "host CPU utilisation 0-1"),
    Metric("nv_gpu_utilization", "gauge", "triton-gpu", "GPU utilisation 0-1, per GPU",
           only_on="a GPU host: Triton reads it through DCGM (the local test server has no GPU)"),
    Metric("nv_gpu_memory_used_bytes", "gauge", "triton-gpu", "GPU memory in use, per GPU",
           only_on="a GPU host: Triton reads it through DCGM (the local test server has no GPU)"),
    Metric("nv_gpu_memory_total_bytes", "gauge", "triton-gpu", "GPU memory size, per GPU",
           only_on="a GPU host: Triton reads it through DCGM (the local test server has no GPU)"),
    Metric("nv_trt_llm_kv_cache_block_metrics", "gauge", "trtllm",
           "KV-cache blocks by kv_cache_block_type (max, free, used, tokens_per)",
           only_on="the TensorRT-LLM C++ backend (runtime tensorrtllm), in NVIDIA's trtllm container"),
    Metric("nv_trt_llm_request_metrics", "gauge", "trtllm",
           "in-flight requests by request_type (active, scheduled, context, max...)",
           only_on="the TensorRT-LLM C++ backend (runtime tensorrtllm), in NVIDIA's trtllm container"),
)

# Published by `trtbuild bench` results through bench_registry(); label `quantile` as in a summary.
CLIENT_METRICS: tuple[Metric, ...] = (
    Metric("trtbuild_bench_ttft_seconds", "gauge", "client", "time to first token seen by the client, by quantile"),
    Metric("trtbuild_bench_itl_seconds", "gauge", "client", "inter-token latency seen by the client, by quantile"),
    Metric("trtbuild_bench_request_latency_seconds", "gauge", "client", "end-to-end latency seen by the client, by quantile"),
    Metric("trtbuild_bench_requests_per_second", "gauge", "client", "completed requests per second"),
    Metric("trtbuild_bench_output_tokens_per_second", "gauge", "client", "output tokens per second"),
)
CLIENT_QUANTILES = (("0.5", "p50"), ("0.9", "p90"), ("0.95", "p95"), ("0.99", "p99"))


@dataclasses.dataclass(frozen=True)
class Recording:
    """One Prometheus recording rule."""

    record: str
    expr: str
    help: str


def _per_model_mean(counter: str) -> str:
    by = f"{PER_REPLICA}, model"
    return (f"sum by ({by}) (rate({counter}[1m]))\n"
            f"  / sum by ({by}) (rate(nv_inference_request_success[1m]))")


QUEUE_COMPUTE_RATIO = "triton:queue_compute:ratio"

RECORDING_RULES: tuple[Recording, ...] = (
    Recording(
        QUEUE_COMPUTE_RATIO,
        f"sum by ({PER_REPLICA}) (rate(nv_inference_queue_duration_us{{{WORKERS}}}[1m]))\n"
        f"  / clamp_min(sum by ({PER_REPLICA}) (rate(nv_inference_compute_infer_duration_us{{{WORKERS}}}[1m])), 1)",
        "time requests wait in Triton's queues per unit of compute time, per replica (the HPA's metric; "
        "0 when idle)",
    ),
    Recording("model:nv_inference_request_success:rate1m",
              f"sum by ({PER_REPLICA}, model) (rate(nv_inference_request_success[1m]))", "requests per second"),
    Recording("model:nv_inference_request_failure:rate1m",
              f"sum by ({PER_REPLICA}, model, reason) (rate(nv_inference_request_failure[1m]))",
              "failed requests per second"),
    Recording("model:nv_inference_request_duration_us:mean1m", _per_model_mean("nv_inference_request_duration_us"),
              "mean request time (us)"),
    Recording("model:nv_inference_queue_duration_us:mean1m", _per_model_mean("nv_inference_queue_duration_us"),
              "mean queue time per request (us)"),
    Recording("model:nv_inference_compute_infer_duration_us:mean1m",
              _per_model_mean("nv_inference_compute_infer_duration_us"), "mean compute time per request (us)"),
    Recording("model:nv_inference_request_summary_us:p95",
              f'max by ({PER_REPLICA}, model) (nv_inference_request_summary_us{{quantile="0.95"}})',
              "p95 request time (us) over Triton's summary window; quantiles do not add across replicas, "
              "so dashboards take the max"),
    Recording("trtllm:kv_cache_blocks_used:ratio",
              f'sum by ({PER_REPLICA}, model) (nv_trt_llm_kv_cache_block_metrics{{kv_cache_block_type="used"}})\n'
              f'  / clamp_min(sum by ({PER_REPLICA}, model) '
              f'(nv_trt_llm_kv_cache_block_metrics{{kv_cache_block_type="max"}}), 1)',
              "share of the TensorRT-LLM KV-cache blocks in use"),
)
RULE_GROUP = "trtbuild-triton"
RULE_INTERVAL = "15s"


@dataclasses.dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclasses.dataclass(frozen=True)
class Panel:
    """One dashboard time series panel."""

    title: str
    unit: str
    targets: tuple[Target, ...]
    description: str = ""


MODEL_FILTER = '{model=~"$model"}'
LATENCY_PANEL = "Request latency, mean and p95 (entry points)"


def _m(selector: str) -> str:
    """Add the dashboard's model filter to a label selector body."""
    return f'{{{selector}, model=~"$model"}}'


ROWS: tuple[tuple[str, tuple[Panel, ...]], ...] = (
    ("Traffic", (
        Panel("Request rate", "reqps", (
            Target(f"sum by (model) (model:nv_inference_request_success:rate1m{MODEL_FILTER})", "{{model}}"),),
            "Requests per second completed by each model (entry points and the models they call)."),
        Panel("Failed requests", "reqps", (
            Target(f"sum by (model, reason) (model:nv_inference_request_failure:rate1m{MODEL_FILTER})", "{{model}} {{reason}}"),)),
        Panel("Queue / compute ratio (HPA metric)", "none", (
            Target(f"{QUEUE_COMPUTE_RATIO}", "{{pod}} {{instance}}"),),
            "Queue time over compute time of the non-entry-point models, per replica; the HPA scales on it."),
        Panel("Pending requests", "short", (
            Target(f"sum by (model) (nv_inference_pending_request_count{MODEL_FILTER})", "{{model}}"),)),
    )),
    ("Server latency", (
        Panel(LATENCY_PANEL, "ms", (
            Target(f"max by (model) (model:nv_inference_request_duration_us:mean1m{_m(ENTRYPOINTS)}) / 1000",
                   "mean {{model}}"),
            Target(f"max by (model) (model:nv_inference_request_summary_us:p95{_m(ENTRYPOINTS)}) / 1000",
                   "p95 {{model}}"),
        ), "p95 is the worst replica's summary quantile: quantiles cannot be averaged."),
        Panel("Queue time per request", "ms", (
            Target(f"max by (model) (model:nv_inference_queue_duration_us:mean1m{_m(WORKERS)}) / 1000", "{{model}}"),)),
        Panel("Compute time per request", "ms", (
            Target(f"max by (model) (model:nv_inference_compute_infer_duration_us:mean1m{_m(WORKERS)}) / 1000",
                   "{{model}}"),),
            "A decoupled LLM model returns from execute() at once, so its compute time is small."),
    )),
    ("Client-measured LLM latency (trtbuild bench)", (
        Panel("Time to first token", "s", tuple(
            Target(f'max by (model) (trtbuild_bench_ttft_seconds{{quantile="{q}", model=~"$model"}})', f"{p} {{{{model}}}}")
            for q, p in CLIENT_QUANTILES if q in ("0.5", "0.95", "0.99")),
            "Published from `trtbuild bench` results (trtbuild.deploy.monitoring.bench_registry, to a Pushgateway or a "
            "textfile exporter): Triton has no TTFT metric for these models."),
        Panel("Inter-token latency", "s", tuple(
            Target(f'max by (model) (trtbuild_bench_itl_seconds{{quantile="{q}", model=~"$model"}})', f"{p} {{{{model}}}}")
            for q, p in CLIENT_QUANTILES if q in ("0.5", "0.95"))),
        Panel("End-to-end latency (client)", "s", tuple(
            Target(f'max by (model) (trtbuild_bench_request_latency_seconds{{quantile="{q}", model=~"$model"}})',
                   f"{p} {{{{model}}}}")
            for q, p in CLIENT_QUANTILES if q in ("0.5", "0.95", "0.99"))),
        Panel("Client throughput", "short", (
            Target('sum by (model) (trtbuild_bench_output_tokens_per_second{model=~"$model"})', "tokens/s {{model}}"),
            Target('sum by (model) (trtbuild_bench_requests_per_second{model=~"$model"})', "requests/s {{model}}"),
        )),
    )),
    ("GPU and KV cache", (
        Panel("GPU utilisation", "percentunit", (
            Target("nv_gpu_utilization", "{{pod}} {{instance}} {{gpu_uuid}}"),)),
        Panel("GPU memory used", "bytes", (
            Target("nv_gpu_memory_used_bytes", "used {{pod}} {{instance}} {{gpu_uuid}}"),
            Target("nv_gpu_memory_total_bytes", "total {{pod}} {{instance}} {{gpu_uuid}}"),
        )),
        Panel("KV-cache blocks in use (TensorRT-LLM backend)", "percentunit", (
            Target(f"trtllm:kv_cache_blocks_used:ratio{MODEL_FILTER}", "{{pod}} {{instance}} {{model}}"),),
            "Only the TensorRT-LLM C++ backend exports KV-cache metrics."),
        Panel("In-flight requests (TensorRT-LLM backend)", "short", (
            Target(f'sum by (request_type) (nv_trt_llm_request_metrics{{request_type!="max", model=~"$model"}})',
                   "{{request_type}}"),)),
        Panel("Host CPU utilisation", "percentunit", (
            Target("nv_cpu_utilization", "{{pod}} {{instance}}"),)),
    )),
)

# The dashboard's model variable lists the models this series knows.
MODEL_VARIABLE_METRIC = "nv_inference_request_success"


# ------------------------------------------------------------------------------------------ rules
class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (PromQL) as literal blocks, so generated files stay readable."""


_BlockDumper.add_representer(
    str, lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None))


def to_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_BlockDumper, sort_keys=False, width=200)


def rule_groups() -> list[dict[str, Any]]:
    """The `groups` of a Prometheus rules file (also `spec.groups` of a PrometheusRule)."""
    return [{
        "name": RULE_GROUP,
        "interval": RULE_INTERVAL,
        "rules": [{"record": r.record, "expr": r.expr} for r in RECORDING_RULES],
    }]


def recorded_names() -> set[str]:
    return {r.record for r in RECORDING_RULES}


def metric(name: str) -> Metric:
    for m in (*METRICS, *CLIENT_METRICS):
        if m.name == name:
            return m
    raise KeyError(name)


# -------------------------------------------------------------------------------------- dashboard
def dashboard(title: str = "trtbuild / Triton LLM serving", extra: dict[str, tuple[Target, ...]] | None = None) -> dict[str, Any]:
    """The Grafana dashboard (JSON model, schemaVersion 39) with a data-source and a model variable;
    `extra` adds targets to the panels it names (the baseline lines of trtbuild.deploy.alerts)."""
    extra = extra or {}
    datasource = {"type": "prometheus", "uid": "${datasource}"}
    panels: list[dict[str, Any]] = []
    y = 0
    next_id = iter(range(1, 1000))
    for row_title, row_panels in ROWS:
        panels.append({"type": "row", "title": row_title, "id": next(next_id), "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        y += 1
        for i, p in enumerate(row_panels):
            panels.append({
                "type": "timeseries",
                "id": next(next_id),
                "title": p.title,
                "description": p.description,
                "datasource": datasource,
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": y + 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": p.unit, "custom": {"lineWidth": 1, "fillOpacity": 10}},
                                "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                            "tooltip": {"mode": "multi", "sort": "desc"}},
                "targets": [{"refId": chr(ord("A") + k), "datasource": datasource, "expr": t.expr,
                             "legendFormat": t.legend, "range": True}
                            for k, t in enumerate(p.targets + extra.get(p.title, ()))],
            })
        y += 8 * ((len(row_panels) + 1) // 2)
    model_query = f"label_values({MODEL_VARIABLE_METRIC}, model)"
    return {
        "uid": DASHBOARD_UID,
        "title": title,
        "tags": ["trtbuild", "triton", "llm"],
        "timezone": "browser",
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": []},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            {"name": "model", "label": "Model", "type": "query", "datasource": datasource,
             "query": {"query": model_query, "refId": "model"}, "definition": model_query,
             "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
             "current": {"selected": True, "text": ["All"], "value": ["$__all"]}},
        ]},
        "panels": panels,
    }


def dashboard_queries(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression a dashboard runs (panel targets), for checks."""
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def dashboard_variable_metrics(board: dict[str, Any]) -> list[str]:
    """Metrics named in `label_values(metric, label)` variable queries (Grafana syntax, not PromQL)."""
    out = []
    for v in board["templating"]["list"]:
        query = v.get("query")
        text = query.get("query", "") if isinstance(query, dict) else ""
        out += re.findall(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,", text)
    return out


def dashboard_json(board: dict[str, Any] | None = None) -> str:
    return json.dumps(board or dashboard(), indent=2, sort_keys=False) + "\n"


# ------------------------------------------------------------------------------- benchmark metrics
def bench_registry(bench: dict[str, Any], model: str | None = None):
    """A prometheus_client registry holding the client-side metrics of a `trtbuild bench` result.

    One sample per run (label `load` = the run's key, e.g. c8 or r2.5-poisson) and quantile. Push it with
    `prometheus_client.push_to_gateway(url, job="trtbuild_bench", registry=...)` or write it for a
    node-exporter textfile collector with `prometheus_client.write_to_textfile(path, registry)`.
    """
    from prometheus_client import CollectorRegistry, Gauge

    runs = bench.get("runs")
    if not isinstance(runs, list):
        raise TrtbuildError("the benchmark result has no 'runs' list", hint="pass a JSON file written by `trtbuild bench`")
    model = model or (bench.get("target") or {}).get("model") or "unknown"
    registry = CollectorRegistry()
    quantile_gauges = {
        key: Gauge(name, metric(name).help, ["model", "load", "quantile"], registry=registry)
        for key, name in (("ttft_ms", "trtbuild_bench_ttft_seconds"), ("itl_ms", "trtbuild_bench_itl_seconds"),
                          ("latency_ms", "trtbuild_bench_request_latency_seconds"))
    }
    rates = {
        key: Gauge(name, metric(name).help, ["model", "load"], registry=registry)
        for key, name in (("requests_per_s", "trtbuild_bench_requests_per_second"),
                          ("output_tokens_per_s", "trtbuild_bench_output_tokens_per_second"))
    }
    for index, run in enumerate(runs):
        metrics = run.get("metrics") or {}
        load = str(run.get("key") or index)
        for key, gauge in quantile_gauges.items():
            stats = metrics.get(key) or {}
            for quantile, field in CLIENT_QUANTILES:
                if stats.get(field) is not None:
                    gauge.labels(model, load, quantile).set(float(stats[field]) / 1e3)
        for key, gauge in rates.items():
            if metrics.get(key) is not None:
                gauge.labels(model, load).set(float(metrics[key]))
    return registry


def bench_exposition(bench: dict[str, Any], model: str | None = None) -> str:
    """The Prometheus text exposition of bench_registry()."""
    from prometheus_client import generate_latest

    return generate_latest(bench_registry(bench, model)).decode()


# ---------------------------------------------------------------------------------------- compose
@dataclasses.dataclass(frozen=True)
class ComposeMonitoring:
    """Where the compose monitoring stack scrapes Triton and which host ports it publishes."""

    triton_service: str = "triton"
    triton_metrics_port: int = 8002
    prometheus_port: int = 9090
    grafana_port: int = 3000
    pushgateway_port: int = 9091
    directory: str = "monitoring"  # next to the compose file


def _environment():
    from trtbuild.repository.templates import environment

    return environment()


def _render(template: str, **context: Any) -> str:
    from jinja2 import TemplateError

    try:
        text = _environment().get_template(f"{TEMPLATE_DIR}/{template}").render(**context)
    except TemplateError as e:
        raise TrtbuildError(f"template {TEMPLATE_DIR}/{template}: {e}") from None
    yaml.safe_load(text)
    return text


def write_monitoring_files(directory: Path, config: ComposeMonitoring = ComposeMonitoring()) -> list[Path]:
    """Prometheus config + rules, Grafana provisioning (data source, dashboard provider) and the dashboard."""
    root = Path(directory) / config.directory
    files = {
        "prometheus/prometheus.yml": _render("prometheus.yml.j2", c=config),
        "prometheus/rules.yml": "# generated by trtbuild (trtbuild/deploy/monitoring.py)\n"
                                + to_yaml({"groups": rule_groups()}),
        "grafana/provisioning/datasources/prometheus.yml": _render("grafana-datasource.yml.j2", c=config),
        "grafana/provisioning/dashboards/trtbuild.yml": _render("grafana-dashboards.yml.j2", c=config),
        f"grafana/dashboards/{DASHBOARD_FILE}": dashboard_json(),
    }
    written = []
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def compose_services(directory: Path, config: ComposeMonitoring = ComposeMonitoring()) -> dict[str, dict[str, Any]]:
    """Write the monitoring files under `directory` (the compose file's folder) and return the services.

    prometheus, pushgateway and grafana, all under the `monitoring` compose profile, so
    `docker compose --profile monitoring up` starts them next to Triton. Triton must run with
    TRITON_METRICS_ARGS and be reachable as `config.triton_service` on the compose network.
    """
    write_monitoring_files(directory, config)
    base = f"./{config.directory}"
    return {
        "prometheus": {
            "image": PROMETHEUS_IMAGE,
            "profiles": [COMPOSE_PROFILE],
            "command": ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.retention.time=7d"],
            "volumes": [f"{base}/prometheus:/etc/prometheus:ro"],
            "ports": [f"{config.prometheus_port}:9090"],
            "restart": "unless-stopped",
        },
        "pushgateway": {
            "image": PUSHGATEWAY_IMAGE,
            "profiles": [COMPOSE_PROFILE],
            "ports": [f"{config.pushgateway_port}:9091"],
            "restart": "unless-stopped",
        },
        "grafana": {
            "image": GRAFANA_IMAGE,
            "profiles": [COMPOSE_PROFILE],
            "depends_on": ["prometheus"],
            "environment": {
                "GF_AUTH_ANONYMOUS_ENABLED": "true",
                "GF_AUTH_ANONYMOUS_ORG_ROLE": "Viewer",
                "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH": f"/var/lib/grafana/dashboards/{DASHBOARD_FILE}",
            },
            "volumes": [f"{base}/grafana/provisioning:/etc/grafana/provisioning:ro",
                        f"{base}/grafana/dashboards:/var/lib/grafana/dashboards:ro"],
            "ports": [f"{config.grafana_port}:3000"],
            "restart": "unless-stopped",
        },
    }

