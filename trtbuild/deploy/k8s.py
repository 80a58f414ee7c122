"""Kubernetes manifests for a generated model repository: `trtbuild k8s REPO --out deploy/`.

What the manifests say comes from the repository's trtbuild.json (runtime, world size, model names,
the absolute paths its configs refer to); the text lives in trtbuild/templates/k8s/. Written:

- deployment.yaml: Triton with a pinned image, GPUs = world size, startup/readiness/liveness probes on
  /v2/health/*, /dev/shm in memory, the model store from a PersistentVolumeClaim or copied from
  S3 by an init container; the TensorRT-LLM backend with world size > 1 runs under `mpirun -n WORLD_SIZE`
  in leader mode (rank 0 serves, the other ranks load only the LLM model);
- service.yaml (8000 http, 8001 grpc, 8002 metrics), podmonitor.yaml, prometheusrule.yaml (from
  trtbuild.deploy.monitoring), hpa.yaml (autoscaling/v2 on `triton:queue_compute:ratio` through
  prometheus-adapter), pdb.yaml, grafana-dashboard.yaml (a ConfigMap for Grafana's sidecar);
- with --kserve, inferenceservice.yaml (serving.kserve.io/v1beta1, raw deployment, external
  autoscaler) replaces the Deployment and the Service, and the same HPA scales `NAME-predictor`;
- extras/ (not applied by `kubectl apply -f deploy/`): the prometheus-adapter Helm values and
  copy-model.sh, which puts the repository and the folders it refers to into the PVC or bucket.

The repository's configs hold absolute paths (checkpoint, tokenizer, engine, Python environment), so
the pod mounts the repository and each folder its configs name at the path it had on the build machine
(as `trtbuild compose` does); the model store (PVC or S3 prefix) holds them side by side as repository/,
checkpoint/, tokenizer/, engine/, python-env/.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import jinja2
import yaml

from trtbuild.deploy import monitoring
from trtbuild.deploy.alerts import AlertSettings, Baseline, alert_group, baseline_targets, rollback_step
from trtbuild.atomic import atomic_output_dir
from trtbuild.deploy.openai import FRONTENDS, OPENAI_PORT, openai_command
from trtbuild.deploy.probe import PROBE_TIMEOUT_S, generate_probe, probe_model
from trtbuild.errors import TrtbuildError
from trtbuild.spec import ModelNames

TEMPLATE_DIR = "k8s"

RUNTIMES = ("transformers", "tensorrtllm", "llmapi")
AWS_CLI_IMAGE = "amazon/aws-cli:2.17.0"
STORE_ROOT = "/store"  # where the S3 init container writes the model store
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002
PROBE_PERIOD_S = 10
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Folders a repository may refer to by absolute path: spec field -> name in the model store.
REFERENCED_PATHS = (("checkpoint", "checkpoint"), ("tokenizer_dir", "tokenizer"), ("engine_dir", "engine"),
                    ("text_env", "python-env"))


@dataclasses.dataclass(frozen=True)
class K8sOptions:
    """What `trtbuild k8s` asks; everything else comes from the repository."""

    name: str | None = None  # default: trtbuild-<model_type>
    namespace: str | None = None
    image: str | None = None  # default: the engine's image, or NVIDIA's TensorRT-LLM image (serving_image)
    replicas_min: int = 1
    replicas_max: int = 4
    gpu_per_pod: int | None = None  # default: the world size
    model_source: str = "pvc"  # pvc | s3
    pvc_name: str | None = None  # default: <name>-models
    s3_uri: str | None = None
    s3_secret: str = "trtbuild-s3-credentials"
    frontend: str = "triton"  # triton | openai (Triton's OpenAI-compatible frontend on port 9000)
    s3_endpoint: str | None = None
    init_image: str = AWS_CLI_IMAGE
    kserve: bool = False
    hpa_target: float = 1.0  # average queue/compute ratio per pod the HPA keeps
    startup_timeout_s: int = 1800
    shm_size: str = "2Gi"
    prometheus_release: str = "prometheus"  # label kube-prometheus-stack selects monitors and rules by
    prometheus_url: str = "http://prometheus-operated.monitoring.svc"
    baseline: Path | None = None  # a `trtbuild bench run` result: regression alerts against it (trtbuild.deploy.alerts)
    baseline_load: str | None = None
    alerts: AlertSettings = AlertSettings()
    canary: Path | None = None  # the candidate repository: a second Deployment behind the same Service
    canary_percent: int = 10  # share of the pods (so of the requests) the canary gets; KServe: canaryTrafficPercent

    def check(self) -> None:
        def positive(flag: str, value: int) -> None:
            if not isinstance(value, int) or value < 1:
                raise TrtbuildError(f"{flag} must be a positive integer, got {value!r}")

        positive("--replicas-min", self.replicas_min)
        if self.frontend not in FRONTENDS:
            raise TrtbuildError(f"--frontend {self.frontend} is not one of {', '.join(FRONTENDS)}")
        positive("--replicas-max", self.replicas_max)
        if self.replicas_max < self.replicas_min:
            raise TrtbuildError(f"--replicas-max {self.replicas_max} is below --replicas-min {self.replicas_min}")
        if self.gpu_per_pod is not None:
            positive("--gpu-per-pod", self.gpu_per_pod)
        positive("--startup-timeout", self.startup_timeout_s)
        if self.model_source not in ("pvc", "s3"):
            raise TrtbuildError(f"--model-source must be pvc or s3, got {self.model_source!r}")
        if self.model_source == "s3" and not (self.s3_uri or "").startswith("s3://"):
            raise TrtbuildError("--model-source s3 needs --s3-uri s3://BUCKET/PREFIX")
        if self.model_source == "pvc" and self.s3_uri:
            raise TrtbuildError("--s3-uri is only used with --model-source s3")
        if self.canary is not None and not 0 < self.canary_percent < 100:
            raise TrtbuildError(f"--canary-percent must be in (0, 100), got {self.canary_percent}")
        if not self.hpa_target > 0:
            raise TrtbuildError(f"--hpa-target must be positive, got {self.hpa_target}")
        for flag, value in (("--name", self.name), ("--namespace", self.namespace), ("--pvc-name", self.pvc_name)):
            if value is not None:
                check_dns_label(flag, value)


def check_dns_label(flag: str, value: str) -> None:
    if len(value) > 63 or not DNS_LABEL.match(value):
        raise TrtbuildError(f"{flag} '{value}' is not a valid Kubernetes name",
                            hint="lower-case letters, digits and '-', starting with a letter, at most 63 characters")


@dataclasses.dataclass(frozen=True)
class StoreMount:
    """A folder of the model store and where the pod mounts it."""

    key: str  # sub-folder of the PVC / S3 prefix
    mount_path: str  # path inside the pod
    source: str  # path on the build machine (what copy-model.sh copies)


@dataclasses.dataclass(frozen=True)
class DeploymentPlan:
    """Everything the templates need, decided here."""

    name: str
    namespace: str | None
    image: str
    runtime: str
    world_size: int
    gpus: int
    llm_model: str
    command: tuple[str, ...]
    args: tuple[str, ...]
    mounts: tuple[StoreMount, ...]
    options: K8sOptions
    labels: dict[str, str]
    selector: dict[str, str]
    repository: str
    probe: tuple[str, ...]  # readiness and liveness: a real one-token generate (trtbuild.deploy.probe)
    entrypoints: tuple[str, ...] = ()  # what clients call, from trtbuild.json: what the alerts watch
    app: str = ""  # the app.kubernetes.io/name the Service selects (the stable name, also for the canary)
    track: str | None = None  # stable | canary when a canary is rendered
    canary: "DeploymentPlan | None" = None
    baseline: Baseline | None = None

    @property
    def service_selector(self) -> dict[str, str]:
        """The Service, PodDisruptionBudget and PodMonitor select every pod of the app, both tracks."""
        return {"app.kubernetes.io/name": self.app or self.name}

    @property
    def serverless(self) -> bool:
        """KServe's canaryTrafficPercent works only in its Serverless (Knative) mode, which scales pods itself."""
        return self.options.kserve and self.track is not None

    @property
    def canary_share(self) -> float | None:
        if self.canary is None:
            return None
        if self.options.kserve:
            return self.options.canary_percent / 100
        return self.canary.options.replicas_min / (self.canary.options.replicas_min + self.options.replicas_min)

    @property
    def rollback(self) -> str:
        return rollback_step(self.workload_name, self.namespace, kserve_canary=self.serverless,
                             canary=self.canary.name if self.canary else None)

    @property
    def startup_failure_threshold(self) -> int:
        return math.ceil(self.options.startup_timeout_s / PROBE_PERIOD_S)

    @property
    def workload_name(self) -> str:
        """The Deployment the HPA scales: ours, or the one KServe creates for the predictor."""
        return f"{self.name}-predictor" if self.options.kserve else self.name

    @property
    def pvc_name(self) -> str:
        return self.options.pvc_name or f"{self.name}-models"

    @property
    def hpa_average_value(self) -> str:
        return f"{round(self.options.hpa_target * 1000)}m"


def launch_command(repository: str, runtime: str, world_size: int, llm_model: str) -> list[str]:
    """The server command line: plain tritonserver, or mpirun for the TensorRT-LLM runtimes.

    tensorrtllm (C++ backend, leader mode): one tritonserver per rank; ranks > 0 load only the LLM model
    and serve no endpoint. llmapi: one tritonserver under mpirun, the LLM API starts its TP/PP workers.
    """
    server = ["tritonserver", f"--model-repository={repository}", f"--http-port={HTTP_PORT}",
              f"--grpc-port={GRPC_PORT}", f"--metrics-port={METRICS_PORT}", *monitoring.TRITON_METRICS_ARGS]
    if runtime == "tensorrtllm" and world_size > 1:
        worker = ["tritonserver", f"--model-repository={repository}", "--model-control-mode=explicit",
                  f"--load-model={llm_model}", "--allow-http=false", "--allow-grpc=false", "--allow-metrics=false"]
        cmd = ["mpirun", "--allow-run-as-root"]
        for rank in range(world_size):
            cmd += ["-n", "1", *(worker if rank else server), f"--backend-config=python,shm-region-prefix-name=prefix{rank}_"]
            cmd += [":"] if rank < world_size - 1 else []
        return cmd
    if runtime == "llmapi":
        return ["mpirun", "--allow-run-as-root", "-n", "1", *server]
    return server


def referenced_mounts(repository: Path, spec: dict[str, Any]) -> list[StoreMount]:
    """Folders outside the repository that its configs name by absolute path (as a quoted value)."""
    repository = Path(repository).absolute()
    texts = "\n".join(p.read_text(errors="replace") for p in sorted(repository.rglob("*"))
                      if p.is_file() and p.name != "trtbuild.json" and p.suffix in (".pbtxt", ".yaml", ".yml", ".json"))
    mounts: list[StoreMount] = []
    for field, key in REFERENCED_PATHS:
        value = spec.get(field)
        if not value:
            continue
        path = Path(value)
        if not path.is_absolute():
            raise TrtbuildError(f"{repository}/trtbuild.json: spec.{field} '{value}' is not an absolute path",
                                hint="regenerate the repository with `trtbuild repo`")
        quoted = re.compile(rf"""["']{re.escape(str(path))}/?["']""")
        covered = any(path == Path(m.mount_path) or path.is_relative_to(m.mount_path) for m in mounts)
        if covered or path.is_relative_to(repository) or not quoted.search(texts):
            continue
        if repository.is_relative_to(path):
            raise TrtbuildError(f"the repository {repository} lies inside spec.{field} {path}",
                                hint="generate the repository outside the checkpoint / engine folder")
        if not path.is_dir():
            raise TrtbuildError(f"{repository}/trtbuild.json: spec.{field} {path} does not exist",
                                hint="the model store must hold it: generate the manifests where the repository was built")
        mounts.append(StoreMount(key, str(path), str(path)))
    return mounts


def serving_image(runtime: str, spec: dict[str, Any], image: str | None) -> str:
    """The pinned image: the one that built the engine, NVIDIA's TensorRT-LLM image, or --image (as compose does)."""
    from trtbuild.build.engine import TRITON_TRTLLM_IMAGE, EngineManifest

    engine_image = None
    if runtime == "tensorrtllm" and spec.get("engine_dir") and Path(spec["engine_dir"]).is_dir():
        engine = EngineManifest.read(Path(spec["engine_dir"]))
        engine_image = engine.image if engine else None
    if image and engine_image and image != engine_image:
        raise TrtbuildError(f"--image {image} differs from {engine_image}, the image that built the engine in "
                            f"{spec['engine_dir']}", hint="engines only load in the TensorRT-LLM version that built them; omit --image")
    if runtime == "transformers" and not image:
        raise TrtbuildError("the transformers runtime needs an image with Triton's Python backend, torch and "
                            "transformers==5.23.0", hint="build one (e.g. FROM nvcr.io/nvidia/tritonserver:24.10-pyt-python-py3 "
                            "plus pip install transformers==5.23.0) and pass --image")
    return image or engine_image or TRITON_TRTLLM_IMAGE


def _default_name(spec: dict[str, Any]) -> str:
    model_type = str((spec.get("model") or {}).get("model_type") or "model")
    name = re.sub(r"[^a-z0-9-]+", "-", f"trtbuild-{model_type}".lower()).strip("-")
    return name[:63].rstrip("-")


def plan_deployment(repository: Path, options: K8sOptions, *, app: str | None = None, track: str | None = None) -> DeploymentPlan:
    """The plan of `repository`; with a canary (options.canary), that of the candidate too, as track canary."""
    from trtbuild.repository.render import load_manifest

    options.check()
    repository = Path(repository).absolute()
    manifest = load_manifest(repository)
    spec = manifest.get("spec") or {}
    where = f"{repository}/trtbuild.json"
    runtime = spec.get("runtime")
    if runtime not in RUNTIMES:
        raise TrtbuildError(f"{where}: spec.runtime '{runtime}' has no Kubernetes template",
                            hint=f"supported: {', '.join(RUNTIMES)}")
    world_size = int(spec.get("world_size") or 1)
    gpus = options.gpu_per_pod or world_size
    if gpus < world_size:
        raise TrtbuildError(f"--gpu-per-pod {gpus} is below the repository's world size {world_size} ({where})",
                            hint=f"a pod needs one GPU per rank: use --gpu-per-pod {world_size} or leave it out")
    names = ModelNames.for_runtime(runtime)
    models = manifest.get("models") or {}
    if names.llm not in models:
        raise TrtbuildError(f"{where}: the repository has no model '{names.llm}' (models: {', '.join(models) or 'none'})")
    name = options.name or _default_name(spec)
    check_dns_label("--name", name)
    if options.canary is not None and track is None:
        track = "stable"
    app = app or name
    if track == "canary" and not options.kserve:  # KServe: the same InferenceService, a new revision
        name = f"{app}-canary"[:63].rstrip("-")
    labels = {"app.kubernetes.io/name": app, "app.kubernetes.io/component": "triton",
              "app.kubernetes.io/part-of": "trtbuild", **({"trtbuild.io/track": track} if track else {})}
    if options.frontend == "openai":
        command = list(openai_command(str(repository), spec, HTTP_PORT, GRPC_PORT))
    else:
        command = launch_command(str(repository), runtime, world_size, names.llm)
    canary = None
    if track == "stable":
        replicas = max(1, round(options.replicas_min * options.canary_percent / (100 - options.canary_percent)))
        canary = plan_deployment(options.canary, dataclasses.replace(
            options, canary=None, name=None, replicas_min=replicas, replicas_max=max(replicas, options.replicas_max)),
            app=app, track="canary")
    baseline = Baseline.from_bench(options.baseline, options.baseline_load) if options.baseline is not None else None
    return DeploymentPlan(
        name=name,
        namespace=options.namespace,
        image=serving_image(runtime, spec, options.image),
        runtime=runtime,
        world_size=world_size,
        gpus=gpus,
        llm_model=names.llm,
        command=tuple(command[:1]),
        args=tuple(command[1:]),
        mounts=tuple(referenced_mounts(repository, spec)),
        options=options,
        labels=labels,
        selector={"app.kubernetes.io/name": app, **({"trtbuild.io/track": track} if track else {})},
        repository=str(repository),
        probe=generate_probe(probe_model(manifest), HTTP_PORT),
        entrypoints=tuple(dict.fromkeys((manifest.get("entrypoints") or {}).values())),
        app=app,
        track=track,
        canary=canary,
        baseline=baseline,
    )


def _env() -> jinja2.Environment:
    from trtbuild.repository.templates import environment

    env = environment()
    env.filters["toyaml"] = lambda data, indent=0: _indent(monitoring.to_yaml(data), indent)
    return env


def _indent(text: str, spaces: int) -> str:
    pad = " " * spaces
    return "\n".join(pad + line if line else line for line in text.rstrip("\n").splitlines())


def manifest_files(plan: DeploymentPlan) -> list[str]:
    """Templates to render, each to the file of the same name without .j2."""
    core = ["inferenceservice.yaml"] if plan.options.kserve else ["deployment.yaml", "service.yaml"]
    if plan.canary is not None:  # KServe's canary is the next revision of the same object: applied after the first
        core.append("canary/inferenceservice.yaml" if plan.options.kserve else "deployment-canary.yaml")
    autoscaler = [] if plan.serverless else ["hpa.yaml"]  # Knative scales a Serverless InferenceService
    return [*core, *autoscaler, "pdb.yaml", "podmonitor.yaml", "prometheusrule.yaml", "grafana-dashboard.yaml",
            "extras/prometheus-adapter-values.yaml", "extras/copy-model.sh"]


def render(plan: DeploymentPlan) -> dict[str, str]:
    """File name -> text. YAML files are parsed here, so a broken template fails before anything is written."""
    env = _env()
    context = dict(
        p=plan,
        o=plan.options,
        rule_groups=monitoring.rule_groups() + ([alert_group(plan.baseline, plan.entrypoints, plan.options.alerts, plan.rollback)]
                                                if plan.baseline else []),
        ratio_metric=monitoring.QUEUE_COMPUTE_RATIO,
        dashboard_json=monitoring.dashboard_json(
            monitoring.dashboard(extra=baseline_targets(plan.entrypoints)) if plan.baseline else None),
        dashboard_file=monitoring.DASHBOARD_FILE,
        ports=dict(http=HTTP_PORT, grpc=GRPC_PORT, metrics=METRICS_PORT,
                   **({"openai": OPENAI_PORT} if plan.options.frontend == "openai" else {})),
        store_root=STORE_ROOT,
        probe_period=PROBE_PERIOD_S,
        probe_timeout=PROBE_TIMEOUT_S,
        stable_replicas=plan.options.replicas_min,
    )
    out: dict[str, str] = {}
    for rel in manifest_files(plan):
        canary = rel in ("deployment-canary.yaml", "canary/inferenceservice.yaml")
        template = f"{TEMPLATE_DIR}/{rel.replace('-canary', '').replace('canary/', '')}.j2"
        try:
            text = env.get_template(template).render(**(context | {"p": plan.canary, "o": plan.canary.options}
                                                        if canary else context))
        except jinja2.TemplateError as e:
            raise TrtbuildError(f"template {template}: {e}") from None
        if rel.endswith(".yaml"):
            try:
                docs = [d for d in yaml.safe_load_all(text) if d is not None]
            except yaml.YAMLError as e:
                raise TrtbuildError(f"template {template} renders invalid YAML: {e}") from None
            if not docs:
                raise TrtbuildError(f"template {template} renders no document")
        out[rel] = text
    return out


def generate(repository: Path, out: Path, options: K8sOptions = K8sOptions(), *, force: bool = False) -> DeploymentPlan:
    """Plan, render and write the manifests for `repository` into `out` (atomically)."""
    plan = plan_deployment(repository, options)
    files = render(plan)
    inputs = (repository, *(p for p in (options.canary, options.baseline) if p is not None))
    with atomic_output_dir(Path(out), force=force, inputs=inputs) as staging:
        for rel, text in files.items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            if rel.endswith(".sh"):
                path.chmod(0o755)
    return plan


def load_documents(directory: Path) -> list[dict[str, Any]]:
    """Every Kubernetes object `kubectl apply -f DIRECTORY` would send (top-level *.yaml only)."""
    docs = []
    for path in sorted(Path(directory).glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs
