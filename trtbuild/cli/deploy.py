"""`trtbuild compose` (docker compose), `trtbuild k8s` (Kubernetes manifests) and `trtbuild plan`
(capacity planning): thin layers over trtbuild.deploy."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from trtbuild.cli.console import console, invocation
from trtbuild.cli.options import frontend_option
from trtbuild.errors import TrtbuildError


@click.command("k8s")
@click.argument("repository", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the manifests.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
@click.option("--name", default=None, help="Name of every object (default trtbuild-<model_type>).")
@click.option("--namespace", default=None, help="metadata.namespace (default: none, kubectl's current namespace).")
@click.option("--replicas-min", type=int, default=1, show_default=True)
@click.option("--replicas-max", type=int, default=4, show_default=True)
@click.option("--gpu-per-pod", type=int, default=None, help="nvidia.com/gpu per pod (default: the world size).")
@click.option("--image", default=None, help="Triton image (default: a pinned NGC tag for the runtime).")
@click.option("--model-source", type=click.Choice(["pvc", "s3"]), default="pvc", show_default=True)
@click.option("--pvc-name", default=None, help="PersistentVolumeClaim holding the model store (default <name>-models).")
@click.option("--s3-uri", default=None, help="s3://BUCKET/PREFIX holding the model store (with --model-source s3).")
@click.option("--s3-secret", default="trtbuild-s3-credentials", show_default=True,
              help="Secret with AWS_* variables for the init container (optional at run time).")
@click.option("--s3-endpoint", default=None, help="S3-compatible endpoint URL (MinIO, ...).")
@click.option("--kserve", is_flag=True, help="A KServe InferenceService instead of a Deployment and a Service.")
@click.option("--hpa-target", type=float, default=1.0, show_default=True,
              help="Average queue/compute ratio per pod the HPA keeps.")
@click.option("--startup-timeout", type=int, default=1800, show_default=True,
              help="Seconds the startup probe waits for the models to load.")
@click.option("--shm-size", default="2Gi", show_default=True, help="Size limit of the in-memory /dev/shm.")
@click.option("--prometheus-release", default="prometheus", show_default=True,
              help="`release` label kube-prometheus-stack selects PodMonitors and rules by.")
@click.option("--prometheus-url", default="http://prometheus-operated.monitoring.svc", show_default=True,
              help="Prometheus URL written into the prometheus-adapter values.")
@click.option("--baseline", type=click.Path(path_type=Path), default=None,
              help="A `trtbuild bench run` result: alert when p99 latency regresses against it (and draw it on the dashboard).")
@click.option("--baseline-load", default=None, help="The baseline's load point (bench's key, e.g. c4); default: its last.")
@click.option("--alert-latency-factor", type=float, default=1.2, show_default=True, help="Alert above this x the baseline p99, for 10 minutes.")
@click.option("--alert-error-ratio", type=float, default=0.01, show_default=True, help="Alert above this share of failed requests.")
@click.option("--alert-queue-ratio", type=float, default=3.0, show_default=True, help="Alert above this queue/compute ratio per pod.")
@click.option("--canary", type=click.Path(path_type=Path), default=None,
              help="A candidate repository: rendered as a second Deployment (NAME-canary) behind the same Service.")
@click.option("--canary-percent", type=int, default=10, show_default=True, help="The canary's share of the pods, so of the requests.")
@frontend_option
def k8s_cmd(repository: Path, out: Path, force: bool, **options) -> None:
    """Kubernetes manifests (Deployment or KServe, Service, HPA, PDB, monitoring) for REPOSITORY."""
    from trtbuild.deploy.alerts import AlertSettings
    from trtbuild.deploy.k8s import K8sOptions, generate, manifest_files

    k8s_options = K8sOptions(
        name=options["name"], namespace=options["namespace"], image=options["image"],
        replicas_min=options["replicas_min"], replicas_max=options["replicas_max"], gpu_per_pod=options["gpu_per_pod"],
        model_source=options["model_source"], pvc_name=options["pvc_name"], s3_uri=options["s3_uri"],
        s3_secret=options["s3_secret"], s3_endpoint=options["s3_endpoint"], kserve=options["kserve"],
        hpa_target=options["hpa_target"], startup_timeout_s=options["startup_timeout"], shm_size=options["shm_size"],
        prometheus_release=options["prometheus_release"], prometheus_url=options["prometheus_url"],
        frontend=options["frontend"], baseline=options["baseline"], baseline_load=options["baseline_load"],
        alerts=AlertSettings(latency_factor=options["alert_latency_factor"], error_ratio=options["alert_error_ratio"],
                             queue_ratio=options["alert_queue_ratio"]),
        canary=options["canary"], canary_percent=options["canary_percent"],
    )
    plan = generate(repository, out, k8s_options, force=force)
    console.print(f"[green]wrote[/] {out}: {', '.join(manifest_files(plan))}")
    console.print(f"  {plan.name}: runtime {plan.runtime}, world size {plan.world_size}, {plan.gpus} GPU(s) per pod, "
                  f"image {plan.image}, {plan.options.replicas_min}-{plan.options.replicas_max} replicas")
    store = f"PVC {plan.pvc_name}" if k8s_options.model_source == "pvc" else k8s_options.s3_uri
    console.print(f"  1. {out}/extras/copy-model.sh  (copies the repository and {len(plan.mounts)} referenced "
                  f"folder(s) into {store})")
    console.print(f"  2. helm upgrade --install prometheus-adapter prometheus-community/prometheus-adapter "
                  f"-n monitoring -f {out}/extras/prometheus-adapter-values.yaml")
    console.print(f"  3. kubectl apply -f {out}/")
    if plan.canary is not None and plan.options.kserve:
        patch = f"kubectl patch inferenceservice {plan.name}" + (f" -n {plan.namespace}" if plan.namespace else "")
        console.print(f"  4. once ready, the canary revision ({plan.canary_share:.0%} of requests): kubectl apply -f {out}/canary/")
        console.print(f"    roll back: {patch} --type merge -p '{{\"spec\":{{\"predictor\":{{\"canaryTrafficPercent\":0}}}}}}'")
        console.print(f"    promote:   {patch} --type merge -p '{{\"spec\":{{\"predictor\":{{\"canaryTrafficPercent\":100}}}}}}'")
    elif plan.canary is not None:
        console.print(f"  canary {plan.canary.name}: {plan.canary.options.replicas_min} of "
                      f"{plan.canary.options.replicas_min + plan.options.replicas_min} pods ({plan.canary_share:.0%} of requests)")
        console.print(f"    roll back: kubectl scale deployment/{plan.canary.name} --replicas=0")
        console.print(f"    promote:   trtbuild k8s {plan.canary.repository} --out {out} --force ...; kubectl apply -f {out}/; "
                      f"kubectl delete deployment {plan.canary.name}")
    if plan.baseline is not None:
        console.print(f"  alerts against {plan.baseline.source} ({plan.baseline.load}, p99 {plan.baseline.latency_p99_ms:.1f} ms); "
                      f"runbook: {plan.rollback}")


@click.command("plan")
@click.argument("bench", type=click.Path(path_type=Path))
@click.option("--rps", type=float, required=True, help="Requests per second to serve.")
@click.option("--slo", required=True, help="Limits, e.g. ttft_ms=500,itl_ms=50 (keys ttft_ms, itl_ms, latency_ms).")
@click.option("--percentile", type=click.Choice(["50", "90", "95", "99"]), default="95", show_default=True,
              help="Percentile the SLO limits apply to.")
@click.option("--headroom", type=float, default=0.2, show_default=True,
              help="Fraction of each replica's SLO capacity kept free.")
@click.option("--gpu-hourly-cost", type=float, default=None, help="USD per GPU-hour.")
@click.option("--gpus-per-replica", type=int, default=1, show_default=True)
@click.option("--max-error-rate", type=float, default=0.01, show_default=True,
              help="A run with more failed requests than this misses the SLO.")
@click.option("--peak-factor", type=float, default=2.0, show_default=True,
              help="HPA maxReplicas covers this multiple of --rps.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the plan as JSON.")
def plan_cmd(bench: Path, rps: float, slo: str, percentile: str, headroom: float, gpu_hourly_cost: float | None,
             gpus_per_replica: int, max_error_rate: float, peak_factor: float, out: Path | None) -> None:
    """Replicas, GPUs, cost and HPA bounds for --rps within --slo, from a `trtbuild bench` sweep (BENCH)."""
    from trtbuild.deploy.plan import Objectives, load_sweep, make_plan
    from trtbuild.bench.metrics import SLO

    objectives = Objectives(SLO.parse(slo).as_dict(), int(percentile), max_error_rate)
    sweep = load_sweep(bench)
    plan = make_plan(sweep, objectives, rps, headroom=headroom, gpus_per_replica=gpus_per_replica,
                     gpu_hourly_cost=gpu_hourly_cost, peak_factor=peak_factor)
    cap = plan.capacity
    table = Table(title=f"capacity plan for {rps:g} requests/s (SLO p{percentile}: {slo})", show_header=False)
    kind = "concurrency" if sweep.load_kind == "concurrency" else "request rate"
    how = (f"interpolated between {cap.between[0]} and {cap.between[1]}, limited by {cap.limited_by}"
           if cap.bounded else "every run met the SLO: a lower bound, extend the sweep")
    table.add_row("capacity per replica", f"{cap.requests_per_s:.3f} requests/s at {kind} {cap.load:.3g} ({how})")
    table.add_row("replicas", f"{plan.replicas} (headroom {headroom:.0%}, utilisation at target "
                              f"{plan.to_json()['utilisation_at_target']:.0%})")
    table.add_row("GPUs", f"{plan.gpus} ({gpus_per_replica} per replica)")
    if plan.cost_per_hour is not None:
        table.add_row("cost", f"{plan.cost_per_hour:.2f} USD/h, {plan.cost_per_1k_requests:.4f} USD per 1k requests"
                      + (f", {plan.cost_per_1m_output_tokens:.3f} USD per 1M output tokens"
                         if plan.cost_per_1m_output_tokens is not None else ""))
    table.add_row("HPA", f"minReplicas {plan.hpa_min}, maxReplicas {plan.hpa_max} (peak {peak_factor:g} x --rps)")
    table.add_row("k8s", f"trtbuild k8s REPO --out deploy --replicas-min {plan.hpa_min} --replicas-max {plan.hpa_max}"
                  + (f" --gpu-per-pod {gpus_per_replica}" if gpus_per_replica > 1 else ""))
    console.print(table)
    if out is not None:
        try:
            Path(out).write_text(json.dumps(plan.to_json(), indent=2) + "\n")
        except OSError as e:
            raise TrtbuildError(f"cannot write {out}: {e.strerror}") from None
        console.print(f"[green]wrote[/] {out}")


@click.command("compose")
@click.argument("repository", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("docker-compose.yml"), show_default=True)
@click.option("--image", default=None, help="Container image [the engine's image, or the pinned Triton TRT-LLM image].")
@click.option("--http-port", type=int, default=8000, show_default=True, help="Host port for HTTP.")
@click.option("--grpc-port", type=int, default=8001, show_default=True, help="Host port for gRPC.")
@click.option("--metrics-port", type=int, default=8002, show_default=True, help="Host port for metrics.")
@click.option("--shm-size", default="2gb", show_default=True)
@click.option("--note", "notes", multiple=True, help="A comment line for the file's header (repeatable).")
@click.option("--validate/--no-validate", default=True, show_default=True, help="Run `docker compose config` on the result.")
@click.option("--monitoring", is_flag=True, help="Add Prometheus, Pushgateway and Grafana (profile `monitoring`).")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@frontend_option
def compose(repository: Path, out: Path, notes: tuple[str, ...], validate: bool, monitoring: bool, force: bool,
            **options) -> None:
    """Write a docker-compose.yml that serves REPOSITORY on its GPUs."""
    import dataclasses
    import tempfile

    from trtbuild.deploy.compose import install_compose_plugin, plan_compose, validate_compose, with_monitoring, write_compose

    plan = plan_compose(repository, **options)
    plan = dataclasses.replace(plan, notes=(*notes, *plan.notes))
    if monitoring:
        plan = with_monitoring(plan, Path(out).absolute().parent)
    written = write_compose(plan, out, force=force, invocation=invocation(click.get_current_context()))
    if validate:
        with tempfile.TemporaryDirectory() as docker_config:
            install_compose_plugin(Path(docker_config))
            validate_compose(written, Path(docker_config))
    console.print(f"[green]wrote[/] {written} ({plan.runtime}, {plan.gpu_count} GPU(s), {plan.image})", highlight=False)
