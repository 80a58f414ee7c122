"""Recording rules, Grafana dashboard and compose monitoring stack, checked against a real Triton.

The server test starts the local tritonserver with the flags the deployment passes
(monitoring.TRITON_METRICS_ARGS), sends requests, reads /metrics and requires every series the rules
and the dashboard select to exist there with matching labels, unless it is recorded by our rules,
published by our benchmark exporter, or in ABSENT_LOCALLY (GPU and TensorRT-LLM-only series).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import subprocess
import time

import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from trtbuild.deploy import monitoring

# Series the local CPU server cannot expose, and why.
ABSENT_LOCALLY = {
    "nv_gpu_utilization": "DCGM GPU metric: needs a GPU (the test server runs on CPU)",
    "nv_gpu_memory_used_bytes": "DCGM GPU metric: needs a GPU (the test server runs on CPU)",
    "nv_gpu_memory_total_bytes": "DCGM GPU metric: needs a GPU (the test server runs on CPU)",
    "nv_trt_llm_kv_cache_block_metrics": "exported by the TensorRT-LLM C++ backend only (runtime tensorrtllm)",
    "nv_trt_llm_request_metrics": "exported by the TensorRT-LLM C++ backend only (runtime tensorrtllm)",
}


def all_queries() -> list[str]:
    return [r.expr for r in monitoring.RECORDING_RULES] + monitoring.dashboard_queries(monitoring.dashboard())


def selectors(expr: str) -> list[promql_parser.VectorSelector]:
    found = []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def rate_arguments(expr: str) -> list[str]:
    """Metric names passed to rate()/increase(): those must be counters."""
    names = []

    def visit(node):
        if isinstance(node, promql_parser.Call) and node.func.name in ("rate", "increase", "irate"):
            names.append(node.args[0].vector_selector.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def selected_metrics() -> set[str]:
    names = {s.name for q in all_queries() for s in selectors(q)}
    return names | set(monitoring.dashboard_variable_metrics(monitoring.dashboard()))


def wire_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) as Prometheus scrapes them: prometheus_client's parser appends `_total` to
    counter samples (OpenMetrics style), Prometheus stores Triton's counters under their exposed names."""
    exposed = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    out = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = s.name
            if name not in exposed and name.endswith("_total") and name[: -len("_total")] in exposed:
                name = name[: -len("_total")]
            assert name in exposed, f"cannot map parsed sample {s.name} back to the exposition"
            out.append((name, s.labels, s.value))
    return out


def matches(matcher, labels: dict[str, str]) -> bool:
    value = labels.get(matcher.name, "")
    pattern = matcher.value.replace("$model", ".*")  # Grafana variable: any model
    op = matcher.op
    if op == promql_parser.MatchOp.Equal:
        return value == pattern
    if op == promql_parser.MatchOp.NotEqual:
        return value != pattern
    full = re.fullmatch(pattern, value) is not None
    return full if op == promql_parser.MatchOp.Re else not full


def test_every_expression_parses():
    queries = all_queries()
    assert len(queries) > len(monitoring.RECORDING_RULES)
    for q in queries:
        promql_parser.parse(q)
    with pytest.raises(ValueError):
        promql_parser.parse("rate(nv_inference_queue_duration_us[1m]")


def test_dashboard_plots_only_catalogued_or_recorded_series():
    known = {m.name for m in (*monitoring.METRICS, *monitoring.CLIENT_METRICS)} | monitoring.recorded_names()
    assert selected_metrics() <= known, selected_metrics() - known
    board_metrics = {s.name for q in monitoring.dashboard_queries(monitoring.dashboard()) for s in selectors(q)}
    assert monitoring.recorded_names() <= board_metrics, "a recording rule no panel plots"
    assert set(ABSENT_LOCALLY) == {m.name for m in monitoring.METRICS if m.only_on}


def test_dashboard_model_is_well_formed():
    board = json.loads(monitoring.dashboard_json())
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for p in panels:
        g = p["gridPos"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"panel '{p['title']}' overlaps another"
        cells |= area
        assert g["x"] + g["w"] <= 24
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(set(refs)) == len(refs)
        assert all(t["datasource"] == {"type": "prometheus", "uid": "${datasource}"} for t in p.get("targets", []))
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"datasource", "model"}
    assert all("$model" not in t["expr"] or "model=~\"$model\"" in t["expr"]
               for p in panels for t in p.get("targets", []))


@pytest.fixture(scope="module")
def metrics_server(tiny_repository, tmp_path_factory):
    """The local tritonserver started with the metrics flags the deployment passes."""
    from trtbuild.deploy.server import ServerOptions, TritonServer

    server = TritonServer(tiny_repository, ServerOptions(extra_args=monitoring.TRITON_METRICS_ARGS),
                          log_path=tmp_path_factory.mktemp("metrics-server") / "tritonserver.log")
    with server:
        yield server


@pytest.mark.server
def test_rules_and_dashboard_read_series_the_real_server_exposes(metrics_server):
    from trtbuild.clients.generate import generate

    for model in ("ensemble", "llm_bls"):
        generate(metrics_server.grpc_url, "Hello there", 8, model=model, stream=True)
    text = metrics_server.metrics()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = [(name, labels) for name, labels, _ in wire_samples(text)]
    sample_names = {name for name, _ in samples}

    observed_raw = set()
    for name in selected_metrics() - monitoring.recorded_names():
        if name in {m.name for m in monitoring.CLIENT_METRICS}:
            continue  # checked against the benchmark exporter below
        if name in ABSENT_LOCALLY:
            assert name not in sample_names, f"{name} is exposed locally: drop it from ABSENT_LOCALLY"
            continue
        assert name in sample_names, f"the server exposes no {name}"
        observed_raw.add(name)
    assert {"nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us",
            "nv_inference_request_summary_us"} <= observed_raw

    for query in all_queries():
        for sel in selectors(query):
            if sel.name not in observed_raw:
                continue
            hits = [labels for name, labels in samples if name == sel.name
                    and all(matches(m, labels) for m in sel.matchers.matchers)]
            assert hits, f"{sel} matches no sample on the server (query: {query})"
        for name in rate_arguments(query):
            if name in families:
                assert families[name].type == "counter", f"rate() over {name}, a {families[name].type}"
    assert families["nv_inference_request_summary_us"].type == "summary"
    entry_models = {labels["model"] for name, labels in samples if name == "nv_inference_request_success"}
    assert {"ensemble", "llm_bls", "llm"} <= entry_models


def bench_result() -> dict:
    """A `trtbuild bench` result built by the benchmark's own code from synthetic request records."""
    from trtbuild.bench.run import RunResult
    from trtbuild.bench.loadgen import LoadPoint
    from trtbuild.bench.metrics import RequestRecord, summarize

    runs = []
    for concurrency, gap in ((1, 0.01), (4, 0.03)):
        records = []
        for i in range(20):
            send = i * 0.1
            first = send + 0.05 + gap * (i % 5)
            arrivals = [first + k * gap for k in range(8)]
            records.append(RequestRecord(index=i, send=send, arrivals=arrivals, end=arrivals[-1], output_tokens=8,
                                         input_tokens=16))
        point = LoadPoint(concurrency=concurrency)
        metrics = summarize(records, streaming=True)
        runs.append(RunResult(point, metrics, records, None, None, "2026-01-01T00:00:00+00:00").to_json(True))
    return {"tool": "trtbuild bench", "target": {"model": "ensemble"}, "runs": runs}


def test_benchmark_exporter_publishes_the_client_series():
    bench = bench_result()
    text = monitoring.bench_exposition(bench)
    samples = wire_samples(text)
    used = [s for q in all_queries() for s in selectors(q)]
    for metric in monitoring.CLIENT_METRICS:
        uses = [s for s in used if s.name == metric.name]
        assert uses, f"{metric.name} is exported but plotted nowhere"
        for sel in uses:
            assert any(n == metric.name and all(matches(m, labels) for m in sel.matchers.matchers)
                       for n, labels, _ in samples), f"{sel} matches no exported sample"
    ttft = {(labels["load"], labels["quantile"]): v for n, labels, v in samples if n == "trtbuild_bench_ttft_seconds"}
    for run in bench["runs"]:
        assert ttft[(run["key"], "0.95")] == pytest.approx(run["metrics"]["ttft_ms"]["p95"] / 1e3)
    with pytest.raises(monitoring.TrtbuildError):
        monitoring.bench_registry({"runs": None})


def test_compose_services_pass_docker_compose(tmp_path, monkeypatch):
    from trtbuild.deploy.compose import validate_compose

    services = monitoring.compose_services(tmp_path)
    compose = {"name": "trtbuild-test",
               "services": {"triton": {"image": "nvcr.io/nvidia/tritonserver:24.10-py3",
                                       "command": ["tritonserver", "--model-repository=/models",
                                                   *monitoring.TRITON_METRICS_ARGS]},
                            **services}}
    file = tmp_path / "docker-compose.yml"
    file.write_text(yaml.safe_dump(compose, sort_keys=False))
    monkeypatch.delenv("COMPOSE_PROFILES", raising=False)
    assert set(validate_compose(file)["services"]) == {"triton"}  # the stack is opt-in
    monkeypatch.setenv("COMPOSE_PROFILES", monitoring.COMPOSE_PROFILE)
    model = validate_compose(file)
    for name in ("prometheus", "grafana", "pushgateway"):
        assert model["services"][name]["profiles"] == [monitoring.COMPOSE_PROFILE]
    assert "profiles" not in model["services"]["triton"]
    root = tmp_path / "monitoring"
    prometheus = yaml.safe_load((root / "prometheus" / "prometheus.yml").read_text())
    targets = {c["job_name"]: c["static_configs"][0]["targets"] for c in prometheus["scrape_configs"]}
    assert targets["triton"] == ["triton:8002"]
    assert prometheus["rule_files"] == ["/etc/prometheus/rules.yml"]
    mounts = {v["target"]: v["source"] for v in model["services"]["prometheus"]["volumes"]}
    assert mounts["/etc/prometheus"] == str(root / "prometheus")
    assert yaml.safe_load((root / "prometheus" / "rules.yml").read_text()) == {"groups": monitoring.rule_groups()}
    dashboards = root / "grafana" / "dashboards" / monitoring.DASHBOARD_FILE
    assert json.loads(dashboards.read_text()) == monitoring.dashboard()
    provider = yaml.safe_load((root / "grafana" / "provisioning" / "dashboards" / "trtbuild.yml").read_text())
    grafana_mounts = {v["target"]: v["source"] for v in model["services"]["grafana"]["volumes"]}
    assert grafana_mounts[provider["providers"][0]["options"]["path"]] == str(dashboards.parent)


def test_rule_groups_are_what_both_deployments_load():
    (group,) = monitoring.rule_groups()
    assert [r["record"] for r in group["rules"]] == [r.record for r in monitoring.RECORDING_RULES]
    assert all(dataclasses.is_dataclass(r) for r in monitoring.RECORDING_RULES)
    assert yaml.safe_load(monitoring.to_yaml({"groups": monitoring.rule_groups()})) == {"groups": monitoring.rule_groups()}


def _query(url: str, expr: str) -> list[dict]:
    import urllib.parse
    import urllib.request

    with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.mark.server
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs a prometheus binary (Debian: apt-get install prometheus)")
def test_recording_rules_evaluate_on_a_real_prometheus(metrics_server, tmp_path):
    """Prometheus scrapes the real server under load and evaluates the recording rules as shipped."""
    from trtbuild.deploy.server import free_port
    from trtbuild.clients.generate import generate

    groups = [dict(g, interval="2s") for g in monitoring.rule_groups()]  # faster evaluation, same rules
    (tmp_path / "rules.yml").write_text(monitoring.to_yaml({"groups": groups}))
    target = metrics_server.metrics_url.split("//")[1].split("/")[0]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "2s"},
        "rule_files": [str(tmp_path / "rules.yml")],
        "scrape_configs": [{"job_name": "triton", "static_configs": [{"targets": [target]}]}],
    }))
    port = free_port()
    with open(tmp_path / "prom.log", "wb") as log:
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wanted = {
            monitoring.QUEUE_COMPUTE_RATIO: None,
            "model:nv_inference_request_success:rate1m": 'model="ensemble"',
            "model:nv_inference_request_duration_us:mean1m": 'model="llm_bls"',
            "model:nv_inference_request_summary_us:p95": 'model="ensemble"',
        }
        results: dict[str, list[dict]] = {}
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(results) < len(wanted):
            for model in ("ensemble", "llm_bls"):
                generate(metrics_server.grpc_url, "Hello there", 4, model=model, stream=True)
            for record, selector in wanted.items():
                try:
                    found = _query(url, f"{record}{{{selector or ''}}}")
                except OSError:
                    break  # Prometheus still starting
                # until requests have ended inside the 1 min window a rate is 0 and a mean 0/0 = NaN;
                # the HPA's ratio must be a number at once (0 when idle)
                values = [float(r["value"][1]) for r in found]
                if values and all(math.isfinite(v) and (v > 0 or selector is None) for v in values):
                    results[record] = found
        assert set(results) == set(wanted), (set(wanted) - set(results), (tmp_path / "prom.log").read_text()[-2000:])
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
    (ratio,) = results[monitoring.QUEUE_COMPUTE_RATIO]
    assert ratio["metric"]["instance"] == target and float(ratio["value"][1]) >= 0
    assert float(results["model:nv_inference_request_success:rate1m"][0]["value"][1]) > 0
    p95_us = float(results["model:nv_inference_request_summary_us:p95"][0]["value"][1])
    mean_us = float(results["model:nv_inference_request_duration_us:mean1m"][0]["value"][1])
    assert p95_us > 0 and mean_us > 0
