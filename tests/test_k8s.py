"""Kubernetes manifests rendered from real generated repositories.

Core kinds are validated offline against the Kubernetes API schemas by kubernetes-validate (strict:
unknown fields fail). The custom resources have no schema there, so they are checked against the
fields their CustomResourceDefinitions publish (CRD_FIELDS below, read from the openAPIV3Schema of
- prometheus-operator/prometheus-operator@6adcebc5076c34f4f55f8f5f7b1e528929373ac7,
  example/prometheus-operator-crd/monitoring.coreos.com_{podmonitors,prometheusrules}.yaml (v1);
- kserve/kserve@aaac4e294dae2c7b1aa1886447793f3aa1c30912,
  config/crd/full/serving.kserve.io_inferenceservices.yaml (v1beta1)),
and the InferenceService's predictor pod fields are validated as a core Pod spec.
"""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from trtbuild.deploy import monitoring
from trtbuild.cli import main
from trtbuild.errors import TrtbuildError
from trtbuild.deploy.k8s import K8sOptions, generate, launch_command, load_documents, plan_deployment

K8S_VERSIONS = ("1.30", "1.37")
IMAGE = "registry.example.com/triton-transformers:24.10-tf5.23"

# path -> (allowed keys, required keys); "[]" steps into list items.
CRD_FIELDS: dict[tuple[str, str], dict[str, tuple[frozenset[str], frozenset[str]]]] = {
    ("monitoring.coreos.com/v1", "PodMonitor"): {
        "spec": (frozenset({
            "attachMetadata", "bodySizeLimit", "convertClassicHistogramsToNHCB", "fallbackScrapeProtocol", "jobLabel",
            "keepDroppedTargets", "labelLimit", "labelNameLengthLimit", "labelValueLengthLimit", "namespaceSelector",
            "nativeHistogramBucketLimit", "nativeHistogramMinBucketFactor", "podMetricsEndpoints", "podTargetLabels",
            "sampleLimit", "scrapeClass", "scrapeClassicHistograms", "scrapeNativeHistograms", "scrapeProtocols",
            "selector", "selectorMechanism", "targetLimit"}), frozenset({"selector"})),
        "spec.selector": (frozenset({"matchExpressions", "matchLabels"}), frozenset()),
        "spec.podMetricsEndpoints[]": (frozenset({
            "authorization", "basicAuth", "bearerTokenSecret", "enableHttp2", "filterRunning", "followRedirects",
            "honorLabels", "honorTimestamps", "interval", "metricRelabelings", "noProxy", "oauth2", "params", "path",
            "port", "portNumber", "proxyConnectHeader", "proxyFromEnvironment", "proxyUrl", "relabelings", "scheme",
            "scrapeTimeout", "targetPort", "tlsConfig", "trackTimestampsStaleness"}), frozenset()),
    },
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "spec": (frozenset({"groups"}), frozenset()),
        "spec.groups[]": (frozenset({"interval", "labels", "limit", "name", "partial_response_strategy", "query_offset",
                                     "rules"}), frozenset({"name"})),
        "spec.groups[].rules[]": (frozenset({"alert", "annotations", "expr", "for", "keep_firing_for", "labels",
                                             "record"}), frozenset({"expr"})),
    },
    ("serving.kserve.io/v1beta1", "InferenceService"): {
        "spec": (frozenset({"canary", "explainer", "predictor", "transformer"}), frozenset({"predictor"})),
        "spec.predictor": (frozenset({
            "activeDeadlineSeconds", "affinity", "annotations", "autoScaling", "automountServiceAccountToken", "batcher",
            "canaryTrafficPercent", "containerConcurrency", "containers", "deploymentStrategy", "dnsConfig", "dnsPolicy",
            "enableServiceLinks", "hostAliases", "hostIPC", "hostNetwork", "hostPID", "hostUsers", "hostname",
            "hostnameOverride", "huggingface", "imagePullSecrets", "initContainers", "labels", "lightgbm", "logger",
            "maxReplicas", "minReplicas", "model", "name", "nodeName", "nodeSelector", "onnx", "os", "overhead", "paddle",
            "pmml", "preemptionPolicy", "priority", "priorityClassName", "pytorch", "readinessGates", "resourceClaims",
            "resources", "restartPolicy", "runtimeClassName", "scaleMetric", "scaleMetricType", "scaleTarget",
            "schedulerName", "schedulingGates", "securityContext", "serviceAccount", "serviceAccountName",
            "setHostnameAsFQDN", "shareProcessNamespace", "sklearn", "storageContainerName", "storageUris", "subdomain",
            "tensorflow", "terminationGracePeriodSeconds", "timeout", "tolerations", "topologySpreadConstraints", "triton",
            "volumes", "workerSpec", "xgboost"}), frozenset()),
    },
}
# InferenceService predictor fields that belong to KServe's ComponentExtensionSpec, not to the pod.
KSERVE_EXTENSION_FIELDS = {"minReplicas", "maxReplicas", "labels", "annotations", "scaleMetric", "scaleTarget",
                           "scaleMetricType", "containerConcurrency", "timeout", "canaryTrafficPercent", "logger",
                           "batcher", "deploymentStrategy", "autoScaling", "storageUris", "workerSpec"}


def check_crd_fields(obj: dict) -> None:
    """Raise AssertionError when `obj` uses a field its CRD does not publish or lacks a required one."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    assert key in CRD_FIELDS, f"no published fields recorded for {key}"
    assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}, sorted(obj)
    for path, (allowed, required) in CRD_FIELDS[key].items():
        nodes = [obj]
        for step in path.split("."):
            many = step.endswith("[]")
            name = step.removesuffix("[]")
            nodes = [n[name] for n in nodes if name in n]
            if many:
                nodes = [item for n in nodes for item in n]
        assert nodes, f"{key[1]}: nothing at {path}"
        for node in nodes:
            assert isinstance(node, dict), f"{key[1]}.{path} is not an object"
            assert set(node) <= allowed, f"{key[1]}.{path}: unpublished field(s) {sorted(set(node) - allowed)}"
            assert required <= set(node), f"{key[1]}.{path}: missing {sorted(required - set(node))}"


def by_kind(docs: list[dict]) -> dict[str, dict]:
    out = {}
    for d in docs:
        assert d["kind"] not in out, f"two {d['kind']} objects"
        out[d["kind"]] = d
    return out


def container(pod_spec: dict) -> dict:
    (only,) = pod_spec["containers"]
    return only


@pytest.fixture(scope="module")
def deploy(tiny_repository, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deploy") / "deploy"
    generate(tiny_repository, out, K8sOptions(image=IMAGE, replicas_min=2, replicas_max=6))
    return out


@pytest.fixture(scope="module")
def trtllm_repository(tiny_checkpoint, tmp_path_factory) -> Path:
    """A real tensorrtllm repository with world size 2 (the engine folder only has to exist here)."""
    from trtbuild.checkpoint import load_model_spec
    from trtbuild.runtimes import generate as generate_repository
    from trtbuild.spec import BuildSpec

    root = tmp_path_factory.mktemp("trtllm")
    engine = root / "engine"
    engine.mkdir()
    spec = BuildSpec(checkpoint=tiny_checkpoint, model=load_model_spec(tiny_checkpoint), runtime="tensorrtllm",
                     world_size=2, engine_dir=engine, max_batch_size=4, max_input_len=128, max_output_len=64)
    return generate_repository(spec, root / "repo")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_kinds_pass_the_kubernetes_schemas(deploy, version):
    docs = by_kind(load_documents(deploy))
    assert set(docs) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap",
                         "PodMonitor", "PrometheusRule"}
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"):
        kubernetes_validate.validate(docs[kind], version, strict=True)


def test_strict_validation_rejects_an_unknown_field(deploy):
    deployment = by_kind(load_documents(deploy))["Deployment"]
    container(deployment["spec"]["template"]["spec"])["imagePulPolicy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.30", strict=True)


def test_custom_resources_use_published_crd_fields(deploy):
    docs = by_kind(load_documents(deploy))
    check_crd_fields(docs["PodMonitor"])
    check_crd_fields(docs["PrometheusRule"])
    broken = yaml.safe_load(yaml.safe_dump(docs["PodMonitor"]))
    broken["spec"]["podMetricEndpoints"] = broken["spec"].pop("podMetricsEndpoints")
    with pytest.raises(AssertionError, match="podMetricEndpoints"):
        check_crd_fields(broken)


def test_deployment_runs_triton_on_the_repository(deploy, tiny_repository):
    docs = by_kind(load_documents(deploy))
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    c = container(pod)
    assert c["image"] == IMAGE
    assert c["command"] == ["tritonserver"]
    assert f"--model-repository={tiny_repository}" in c["args"]
    assert set(monitoring.TRITON_METRICS_ARGS) <= set(c["args"])
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    # ready is not healthy: both probes send a one-token generate to the text model
    for probe in ("readinessProbe", "livenessProbe"):
        command = c[probe]["exec"]["command"]
        assert command[:2] == ["python3", "-c"] and command[3] == "http://localhost:8000/v2/models/llm/generate"
        assert c[probe]["timeoutSeconds"] > float(command[4])
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800
    assert c["resources"]["limits"] == {"nvidia.com/gpu": 1}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert volumes["model-store"]["persistentVolumeClaim"]["claimName"] == "trtbuild-llama-models"
    assert docs["Deployment"]["spec"]["replicas"] == 2


def _absolute_paths_in_configs(repository: Path) -> set[str]:
    paths = set()
    for config in repository.rglob("config.pbtxt"):
        for value in re.findall(r'string_value:\s*"([^"]+)"', config.read_text()):
            if value.startswith("/"):
                paths.add(value)
    return paths


def test_every_path_the_repository_names_is_mounted(deploy, tiny_repository):
    c = container(by_kind(load_documents(deploy))["Deployment"]["spec"]["template"]["spec"])
    mounted = {m["mountPath"]: m for m in c["volumeMounts"] if m["name"] == "model-store"}
    assert mounted[str(tiny_repository)]["subPath"] == "repository"
    named = _absolute_paths_in_configs(tiny_repository)
    assert named, "the repository's configs name no absolute path: nothing to check"
    for path in named:
        assert any(path == m or path.startswith(m + "/") for m in mounted), f"{path} is not mounted"
    assert all(m["readOnly"] for m in mounted.values())


def test_service_monitor_hpa_and_pdb_select_the_pods(deploy):
    docs = by_kind(load_documents(deploy))
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selectors = [docs["Service"]["spec"]["selector"], docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
                 docs["PodMonitor"]["spec"]["selector"]["matchLabels"],
                 docs["Deployment"]["spec"]["selector"]["matchLabels"]]
    for selector in selectors:
        assert selector.items() <= pod_labels.items()
    service_ports = {p["name"]: (p["port"], p["targetPort"]) for p in docs["Service"]["spec"]["ports"]}
    assert service_ports == {"http": (8000, "http"), "grpc": (8001, "grpc"), "metrics": (8002, "metrics")}
    assert docs["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": docs["Deployment"]["metadata"]["name"]}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "1000m"}
    recorded = [r["record"] for g in docs["PrometheusRule"]["spec"]["groups"] for r in g["rules"]]
    assert metric["pods"]["metric"]["name"] in recorded
    assert docs["PodDisruptionBudget"]["spec"] == {"maxUnavailable": 1, "selector": docs["PodDisruptionBudget"]["spec"]["selector"]}


def test_prometheus_adapter_serves_the_recorded_ratio(deploy):
    values = yaml.safe_load((deploy / "extras" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["seriesQuery"].startswith(monitoring.QUEUE_COMPUTE_RATIO + "{")
    assert rule["name"]["as"] == monitoring.QUEUE_COMPUTE_RATIO
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    # the recorded series keeps the labels the adapter maps to the pod
    ratio = next(r for r in monitoring.RECORDING_RULES if r.record == monitoring.QUEUE_COMPUTE_RATIO)
    assert "namespace, pod" in ratio.expr


def test_rules_and_dashboard_come_from_builder_monitoring(deploy):
    docs = by_kind(load_documents(deploy))
    assert docs["PrometheusRule"]["spec"]["groups"] == monitoring.rule_groups()
    (dashboard_text,) = docs["ConfigMap"]["data"].values()
    assert yaml.safe_load(dashboard_text) == monitoring.dashboard()
    assert docs["ConfigMap"]["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_s3_model_source_copies_with_an_init_container(tiny_repository, tmp_path):
    out = tmp_path / "deploy"
    plan = generate(tiny_repository, out, K8sOptions(image=IMAGE, model_source="s3", s3_uri="s3://models/llama/",
                                                     s3_endpoint="http://minio.minio:9000"))
    deployment = by_kind(load_documents(out))["Deployment"]
    kubernetes_validate.validate(deployment, "1.30", strict=True)
    pod = deployment["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    script = init["args"][0]
    keys = ["repository", *(m.key for m in plan.mounts)]
    for key in keys:
        assert f'"s3://models/llama/{key}" /store/{key}' in script
    assert script.count("--endpoint-url http://minio.minio:9000") == len(keys)
    assert init["envFrom"] == [{"secretRef": {"name": "trtbuild-s3-credentials", "optional": True}}]
    assert {v["name"]: v for v in pod["volumes"]}["model-store"] == {"name": "model-store", "emptyDir": {}}
    subpaths = {m["subPath"] for m in container(pod)["volumeMounts"] if m["name"] == "model-store"}
    assert subpaths == set(keys)
    copy = (out / "extras" / "copy-model.sh").read_text()
    assert f'"{tiny_repository}" "s3://models/llama/repository"' in copy


def test_tensorrtllm_world_size_2_runs_mpirun_leader_mode(trtllm_repository, tmp_path):
    out = tmp_path / "deploy"
    plan = generate(trtllm_repository, out)
    assert plan.world_size == 2 and plan.gpus == 2
    from trtbuild.build.engine import TRITON_TRTLLM_IMAGE

    deployment = by_kind(load_documents(out))["Deployment"]
    kubernetes_validate.validate(deployment, "1.30", strict=True)
    c = container(deployment["spec"]["template"]["spec"])
    assert c["image"] == TRITON_TRTLLM_IMAGE
    assert c["command"] == ["mpirun"] and c["args"][0] == "--allow-run-as-root"
    ranks = " ".join(c["args"][1:]).split(" : ")
    assert len(ranks) == 2 and all(r.startswith("-n 1 tritonserver ") for r in ranks)
    assert "--load-model" not in ranks[0] and "--http-port=8000" in ranks[0]
    assert "--load-model=tensorrt_llm" in ranks[1] and "--allow-http=false" in ranks[1]
    assert [f"prefix{i}_" in r for i, r in enumerate(ranks)] == [True, True]
    assert c["resources"]["limits"] == {"nvidia.com/gpu": 2}
    mounted = {m["mountPath"] for m in c["volumeMounts"]}
    for path in _absolute_paths_in_configs(trtllm_repository):
        assert any(path == m or path.startswith(m + "/") for m in mounted), f"{path} is not mounted"
    with pytest.raises(TrtbuildError, match="world size 2"):
        plan_deployment(trtllm_repository, K8sOptions(gpu_per_pod=1))


def test_launch_command_per_runtime():
    assert launch_command("/r", "transformers", 1, "llm")[0] == "tritonserver"
    llmapi = launch_command("/r", "llmapi", 4, "tensorrt_llm")
    assert llmapi[:5] == ["mpirun", "--allow-run-as-root", "-n", "1", "tritonserver"] and ":" not in llmapi
    trt = launch_command("/r", "tensorrtllm", 4, "tensorrt_llm")
    assert trt.count("tritonserver") == 4 and trt.count(":") == 3


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kserve_inference_service(trtllm_repository, tmp_path, version):
    out = tmp_path / "deploy"
    plan = generate(trtllm_repository, out, K8sOptions(kserve=True, name="llama-trt", namespace="llm"))
    docs = by_kind(load_documents(out))
    assert set(docs) == {"InferenceService", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap",
                         "PodMonitor", "PrometheusRule"}
    isvc = docs["InferenceService"]
    check_crd_fields(isvc)
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert annotations["serving.kserve.io/autoscalerClass"] == "external"
    predictor = isvc["spec"]["predictor"]
    pod = {k: v for k, v in predictor.items() if k not in KSERVE_EXTENSION_FIELDS}
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": pod}, version, strict=True)
    assert container(pod)["name"] == "kserve-container"
    assert predictor["labels"].items() >= docs["PodMonitor"]["spec"]["selector"]["matchLabels"].items()
    hpa = docs["HorizontalPodAutoscaler"]
    kubernetes_validate.validate(hpa, version, strict=True)
    assert hpa["spec"]["scaleTargetRef"]["name"] == "llama-trt-predictor" == plan.workload_name
    assert all(d["metadata"]["namespace"] == "llm" for d in docs.values())


def test_options_are_checked(tiny_repository, tmp_path):
    cases = [
        (K8sOptions(image=IMAGE, replicas_min=3, replicas_max=2), "below --replicas-min"),
        (K8sOptions(image=IMAGE, model_source="s3"), "--s3-uri"),
        (K8sOptions(image=IMAGE, name="Llama_8B"), "not a valid Kubernetes name"),
        (K8sOptions(), "transformers runtime needs an image"),
    ]
    for options, message in cases:
        with pytest.raises(TrtbuildError, match=message):
            plan_deployment(tiny_repository, options)
    with pytest.raises(TrtbuildError, match="trtbuild.json"):
        plan_deployment(tmp_path, K8sOptions(image=IMAGE))


def test_cli_writes_once_and_refuses_a_non_empty_out(tiny_repository, tmp_path):
    out = tmp_path / "deploy"
    runner = CliRunner()
    args = ["k8s", str(tiny_repository), "--out", str(out), "--image", IMAGE, "--replicas-max", "3"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    assert (out / "extras" / "copy-model.sh").stat().st_mode & 0o111
    second = runner.invoke(main, args)
    assert second.exit_code == 2 and "not empty" in second.output
    assert runner.invoke(main, [*args, "--force", "--replicas-min", "4"]).exit_code == 2


def test_openai_frontend_serves_port_9000_and_keeps_the_probes(tiny_repository, tmp_path, tiny_spec):
    out = tmp_path / "deploy"
    generate(tiny_repository, out, K8sOptions(image=IMAGE, frontend="openai"))
    docs = by_kind(load_documents(out))
    for kind in ("Deployment", "Service"):
        kubernetes_validate.validate(docs[kind], "1.30", strict=True)
    c = container(docs["Deployment"]["spec"]["template"]["spec"])
    assert c["command"] == ["python3"] and c["args"][0] == "/opt/tritonserver/python/openai/openai_frontend/main.py"
    assert f"--model-repository={tiny_repository}" in c["args"] and f"--tokenizer={tiny_spec.checkpoint}" in c["args"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["openai"] == 9000
    assert {p["name"]: p["port"] for p in docs["Service"]["spec"]["ports"]}["openai"] == 9000
    assert "/v2/models/llm/generate" in c["readinessProbe"]["exec"]["command"][3]  # the KServe frontend stays on
