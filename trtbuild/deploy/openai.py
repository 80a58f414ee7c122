"""Triton's OpenAI-compatible frontend as the deployment's entry point (`--frontend openai`).

NVIDIA ships it in its Python-backend images (`/opt/tritonserver/python/openai`): one process that
runs Triton in-process on the repository and serves `/v1/chat/completions` and `/v1/completions`
on port 9000, applying the tokenizer's chat template itself. It calls the text model (or either
ensemble) with the TensorRT-LLM request format, which the repository's text model answers
(tests/test_openai_contract.py). The KServe frontends stay on so the generate probe and gRPC
clients keep working.
"""

from __future__ import annotations

from trtbuild.errors import TrtbuildError

FRONTENDS = ("triton", "openai")
OPENAI_PORT = 9000
MAIN = "/opt/tritonserver/python/openai/openai_frontend/main.py"


def openai_command(repository: str, spec: dict, http_port: int, grpc_port: int) -> tuple[str, ...]:
    """The frontend's command line in the serving container."""
    if int(spec.get("world_size") or 1) > 1:
        raise TrtbuildError(f"--frontend openai serves one process; this repository has world size {spec['world_size']}",
                            hint="use --frontend triton (mpirun starts one server per rank)")
    tokenizer = spec.get("tokenizer_dir") or spec.get("checkpoint")
    return ("python3", MAIN, f"--model-repository={repository}", f"--tokenizer={tokenizer}", f"--openai-port={OPENAI_PORT}",
            "--enable-kserve-frontends", f"--kserve-http-port={http_port}", f"--kserve-grpc-port={grpc_port}")
