"""Regression alerts against a recorded baseline and the canary Deployment (`trtbuild k8s --baseline
--canary`): manifests rendered from two real repositories (the tiny build and a smaller-batch one) and
a real `trtbuild bench run` result, validated with kubernetes-validate and the published CRD fields;
every alert expression parses (promql-parser) and selects only series the real server exposes (with
the deployment's metrics flags) or the rules record."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from trtbuild.deploy import alerts, monitoring
from trtbuild.deploy.k8s import K8sOptions, generate
from trtbuild.errors import TrtbuildError

from test_k8s import IMAGE, K8S_VERSIONS, KSERVE_EXTENSION_FIELDS, check_crd_fields
from test_monitoring import matches, metrics_server, selectors, wire_samples  # noqa: F401 - metrics_server is a fixture


@pytest.fixture(scope="module")
def candidate(tiny_spec, tmp_path_factory) -> Path:
    from trtbuild.runtimes import generate as generate_repository

    return generate_repository(dataclasses.replace(tiny_spec, max_batch_size=2), tmp_path_factory.mktemp("cand") / "repo")


@pytest.fixture(scope="module")
def baseline(tiny_server, tmp_path_factory) -> Path:
    """A measured baseline: `trtbuild bench run` against the tiny server."""
    from trtbuild.cli import main

    out = tmp_path_factory.mktemp("baseline") / "bench"
    result = CliRunner().invoke(main, ["bench", "run", "--url", tiny_server.grpc_url, "--concurrency", "1,2", "--requests", "6",
                                       "--input-tokens-mean", "16", "--output-tokens-mean", "4", "--out", str(out), "--no-plots"])
    assert result.exit_code == 0, result.output
    return out / "results.json"


@pytest.fixture(scope="module")
def deploy(tiny_repository, candidate, baseline, tmp_path_factory) -> Path:
    from trtbuild.cli import main

    out = tmp_path_factory.mktemp("deploy") / "deploy"
    result = CliRunner().invoke(main, ["k8s", str(tiny_repository), "--out", str(out), "--image", IMAGE, "--replicas-min", "4",
                                       "--baseline", str(baseline), "--canary", str(candidate), "--canary-percent", "20",
                                       "--namespace", "llm"])
    assert result.exit_code == 0, result.output
    assert "roll back: kubectl scale deployment/trtbuild-llama-canary --replicas=0" in result.output
    return out


def _docs(deploy: Path) -> list[dict]:
    return [d for p in sorted(deploy.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def _alert_group(deploy: Path) -> dict:
    (rule,) = [d for d in _docs(deploy) if d["kind"] == "PrometheusRule"]
    (group,) = [g for g in rule["spec"]["groups"] if g["name"] == alerts.ALERT_GROUP]
    return group


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_canary_and_stable_deployments_validate_and_share_the_service(deploy, candidate, tiny_repository, version):
    docs = _docs(deploy)
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == {"trtbuild-llama", "trtbuild-llama-canary"}
    for d in docs:
        if d["kind"] in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"):
            kubernetes_validate.validate(d, version, strict=True)
        elif d["kind"] in ("PodMonitor", "PrometheusRule"):
            check_crd_fields(d)
    stable, canary = deployments["trtbuild-llama"], deployments["trtbuild-llama-canary"]
    assert (stable["spec"]["replicas"], canary["spec"]["replicas"]) == (4, 1)  # 1 of 5 pods: 20 %
    assert str(tiny_repository) in " ".join(stable["spec"]["template"]["spec"]["containers"][0]["args"])
    assert str(candidate) in " ".join(canary["spec"]["template"]["spec"]["containers"][0]["args"])
    pods = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments.items()}
    # each Deployment owns only its own pods; the Service, PDB and PodMonitor reach both
    assert stable["spec"]["selector"]["matchLabels"].items() <= pods["trtbuild-llama"].items()
    assert not stable["spec"]["selector"]["matchLabels"].items() <= pods["trtbuild-llama-canary"].items()
    assert not canary["spec"]["selector"]["matchLabels"].items() <= pods["trtbuild-llama"].items()
    for d in docs:
        if d["kind"] in ("Service", "PodDisruptionBudget", "PodMonitor"):
            selector = d["spec"]["selector"].get("matchLabels", d["spec"]["selector"])
            assert all(selector.items() <= labels.items() for labels in pods.values()), d["kind"]
    (hpa,) = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "trtbuild-llama"  # the canary keeps its fixed share


def test_alerts_follow_the_baseline_and_name_the_rollback(deploy, baseline, tiny_repository):
    group = _alert_group(deploy)
    bench = json.loads(baseline.read_text())
    p99_ms = bench["runs"][-1]["metrics"]["latency_ms"]["p99"]
    rules = {r.get("alert") or r["record"]: r for r in group["rules"]}
    assert rules[alerts.BASELINE_P99]["expr"] == f"vector({p99_ms * 1e3:.0f})"
    assert rules[alerts.BASELINE_P99]["labels"]["load"] == bench["runs"][-1]["key"]
    latency = rules["TrtbuildLatencyRegression"]
    assert latency["for"] == "10m" and latency["expr"].endswith(f"> {p99_ms * 1e3 * 1.2:.0f}")
    entrypoints = json.loads((tiny_repository / "trtbuild.json").read_text())["entrypoints"].values()
    for name in entrypoints:  # the entry points come from trtbuild.json
        assert name in latency["expr"]
    for name in ("TrtbuildLatencyRegression", "TrtbuildErrorRatio", "TrtbuildQueueSaturation"):
        assert "kubectl scale deployment/trtbuild-llama-canary -n llm --replicas=0" in rules[name]["annotations"]["runbook"]
        assert "kubectl rollout undo deployment/trtbuild-llama -n llm" in rules[name]["annotations"]["runbook"]
    # the dashboard draws the baseline and the alert limit beside the live p99
    (board,) = [json.loads(next(iter(d["data"].values()))) for d in _docs(deploy) if d["kind"] == "ConfigMap"]
    (panel,) = [p for p in board["panels"] if p.get("title") == monitoring.LATENCY_PANEL]
    legends = [t["legendFormat"] for t in panel["targets"]]
    assert {"baseline p99", "alert limit", "p99 {{model}}"} <= set(legends)
    # without --kserve the runbook is rollout undo
    assert alerts.rollback_step("x", None) == "kubectl rollout undo deployment/x (back to the previous Deployment revision)"
    assert "canaryTrafficPercent\":0" in alerts.rollback_step("x", "ns", kserve_canary=True)


@pytest.mark.server
def test_every_alert_expression_parses_and_selects_real_or_recorded_series(deploy, metrics_server):
    from trtbuild.clients.generate import generate as send

    group = _alert_group(deploy)
    recorded = monitoring.recorded_names() | {r["record"] for r in group["rules"] if "record" in r}
    triton = {m.name for m in monitoring.METRICS if m.source == "triton"}
    send(metrics_server.grpc_url, "Hello there", 4, model="ensemble", stream=True)
    samples = wire_samples(metrics_server.metrics())
    checked = 0
    dashboard_exprs = [t["expr"] for d in _docs(deploy) if d["kind"] == "ConfigMap"
                       for p in json.loads(next(iter(d["data"].values())))["panels"] for t in p.get("targets", [])]
    for expr in [r["expr"] for r in group["rules"]] + dashboard_exprs:
        for s in selectors(expr):
            assert s.name in recorded | {m.name for m in (*monitoring.METRICS, *monitoring.CLIENT_METRICS)}, s.name
            if s.name in triton and expr in [r["expr"] for r in group["rules"]]:
                # the real server exposes the series with labels the selector matches
                assert any(n == s.name and all(matches(m, labels) for m in s.matchers.matchers)
                           for n, labels, _ in samples), expr
                checked += 1
    assert checked >= 4  # summary p99, failures, successes (twice)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kserve_canary_is_the_next_revision_with_canary_traffic_percent(tiny_repository, candidate, baseline, tmp_path, version):
    from trtbuild.cli import main

    out = tmp_path / "deploy"
    result = CliRunner().invoke(main, ["k8s", str(tiny_repository), "--out", str(out), "--image", IMAGE, "--kserve",
                                       "--canary", str(candidate), "--canary-percent", "10", "--baseline", str(baseline)])
    assert result.exit_code == 0, result.output
    assert "canary/" in result.output and "promote:" in result.output and "roll back:" in result.output
    (stable,) = [d for d in _docs(out) if d["kind"] == "InferenceService"]
    (canary,) = list(yaml.safe_load_all((out / "canary" / "inferenceservice.yaml").read_text()))
    assert not any(d["kind"] == "HorizontalPodAutoscaler" for d in _docs(out))  # Knative scales Serverless services
    for isvc, repo in ((stable, tiny_repository), (canary, candidate)):
        check_crd_fields(isvc)
        assert isvc["metadata"]["name"] == "trtbuild-llama"  # the same object: the canary is its next revision
        assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
        assert "serving.kserve.io/autoscalerClass" not in isvc["metadata"]["annotations"]
        predictor = isvc["spec"]["predictor"]
        pod = {k: v for k, v in predictor.items() if k not in KSERVE_EXTENSION_FIELDS}
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": pod}, version, strict=True)
        assert str(repo) in " ".join(pod["containers"][0]["args"])
    assert canary["spec"]["predictor"]["canaryTrafficPercent"] == 10 and "canaryTrafficPercent" not in stable["spec"]["predictor"]
    runbook = _alert_group(out)["rules"][-1]["annotations"]["runbook"]
    assert runbook.startswith("kubectl patch inferenceservice trtbuild-llama --type merge") and '"canaryTrafficPercent":0' in runbook


def test_baseline_and_canary_errors(tiny_repository, tmp_path):
    bad = tmp_path / "bench.json"
    bad.write_text(json.dumps({"runs": [{"key": "c1", "aborted": "interrupted", "metrics": {}}]}))
    with pytest.raises(TrtbuildError, match="no complete run"):
        generate(tiny_repository, tmp_path / "a", K8sOptions(image=IMAGE, baseline=bad))
    with pytest.raises(TrtbuildError, match="--canary-percent"):
        generate(tiny_repository, tmp_path / "c", K8sOptions(image=IMAGE, canary=tiny_repository, canary_percent=100))
    with pytest.raises(TrtbuildError, match="--alert-latency-factor"):
        alerts.AlertSettings(latency_factor=0.9).check()


@pytest.mark.server
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs a prometheus binary (Debian: apt-get install prometheus)")
def test_an_induced_slowdown_fires_the_latency_alert_on_a_real_prometheus(metrics_server, baseline, tiny_spec, tiny_repository,
                                                                         tmp_path):
    """Prometheus scrapes the normal build and a deliberately slower one (a sleep after every engine step)
    and evaluates the alert rules as rendered (only `for` and the intervals shortened): the latency alert
    fires for the slow server's entry point and not for the normal one."""
    from conftest import SLOW_STEP_DELAY_MS
    from trtbuild.clients.generate import generate as send
    from trtbuild.deploy.server import ServerOptions, TritonServer, free_port
    from trtbuild.runtimes import generate as generate_repository

    entry = json.loads((tiny_repository / "trtbuild.json").read_text())["entrypoints"]
    group = alerts.alert_group(alerts.Baseline.from_bench(baseline), tuple(entry.values()), alerts.AlertSettings(), "runbook")
    group = dict(group, interval="1s", rules=[dict(r, **({"for": "2s"} if "alert" in r else {})) for r in group["rules"]])
    (tmp_path / "rules.yml").write_text(monitoring.to_yaml({"groups": [group]}))
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    slow_repo = generate_repository(dataclasses.replace(tiny_spec, extra={"fault_injection_step_delay_ms": SLOW_STEP_DELAY_MS}),
                                    tmp_path / "slow")
    with TritonServer(slow_repo, ServerOptions(extra_args=monitoring.TRITON_METRICS_ARGS), log_path=tmp_path / "slow.log") as slow:
        targets = {name: s.metrics_url.split("//")[1].split("/")[0] for name, s in (("fast", metrics_server), ("slow", slow))}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp_path / "rules.yml")],
            "scrape_configs": [{"job_name": "triton", "static_configs": [{"targets": list(targets.values())}]}]}))
        port = free_port()
        with open(tmp_path / "prom.log", "wb") as log:
            prometheus = subprocess.Popen(
                ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=log)
        try:
            firing: list[dict] = []
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and not firing:
                send(metrics_server.grpc_url, "Hello there", 4, model=entry["ensemble"], stream=True)
                send(slow.grpc_url, "Hello there", 8, model=entry["ensemble"], stream=True)
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/alerts", timeout=5) as r:
                        found = json.loads(r.read())["data"]["alerts"]
                except OSError:
                    continue  # Prometheus still starting
                firing = [a for a in found if a["labels"]["alertname"] == "TrtbuildLatencyRegression" and a["state"] == "firing"]
            assert firing, (tmp_path / "prom.log").read_text()[-2000:]
        finally:
            prometheus.terminate()
            prometheus.wait(timeout=30)
    assert {a["labels"]["instance"] for a in firing} == {targets["slow"]}
    assert {a["labels"]["model"] for a in firing} <= set(entry.values())
    assert firing[0]["annotations"]["runbook"] == "runbook"
