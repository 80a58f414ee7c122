"""The `trtbuild` command line: a thin layer over the builder and clients functions."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import time
from pathlib import Path

import click
from rich.console import Console

from builder.cli_export import onnx_repo_options, pop_onnx_options
from builder.errors import TrtbuildError
from builder.onnx_repository import ONNX_RUNTIMES
from builder.serving import pop_serving_options, serving_options

console = Console(stderr=True)


class TrtbuildGroup(click.Group):
    """Prints a TrtbuildError as one red line and exits 2, never with a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TrtbuildError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            sys.exit(2)


@click.group(cls=TrtbuildGroup)
@click.version_option(package_name="trtbuild")
def main() -> None:
    """Hugging Face checkpoint -> TensorRT-LLM / ONNX build -> Triton model repository."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_options(f):
    """Options every LLM build shares; one place so `repo`, `engine` and `compose` agree."""
    options = [
        click.option("--max-batch-size", type=int, default=8, show_default=True, help="Largest in-flight batch."),
        click.option("--max-input-len", type=int, default=512, show_default=True, help="Longest prompt, in tokens."),
        click.option("--max-output-len", type=int, default=256, show_default=True, help="Most generated tokens."),
        click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto", show_default=True),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--tokenizer-dir", type=click.Path(path_type=Path), default=None, help="Defaults to the checkpoint."),
        click.option("--kv-cache-page-size", type=int, default=32, show_default=True, help="Tokens per KV-cache block."),
        click.option("--kv-cache-free-gpu-mem-fraction", type=float, default=0.9, show_default=True),
        click.option("--exclude-input-in-output/--include-input-in-output", default=True, show_default=True),
        click.option("--quantization", type=click.Choice(["none", "fp8"]), default="none", show_default=True,
                     help="transformers runtime: fp8 runs the Linear layers on FP8 tensor cores (W8A8; compute "
                          "capability 8.9+). A ModelOpt FP8 checkpoint (trtbuild quantize --format hf) runs FP8 by itself."),
        click.option("--kv-cache-dtype", type=click.Choice(["auto", "fp8", "int8"]), default="auto", show_default=True,
                     help="KV-cache pages: auto (the model dtype, or FP8 where the checkpoint calibrated it), fp8 "
                          "(e4m3, half the bytes of 16-bit pages)."),
        click.option("--speculative-decoding-mode", type=click.Choice(["none", "ngram"]), default="none", show_default=True,
                     help="ngram: prompt-lookup drafting verified in one step (greedy output unchanged)."),
        click.option("--max-draft-len", type=int, default=4, show_default=True, help="Draft tokens verified per step."),
        click.option("--max-matching-ngram-size", type=int, default=3, show_default=True,
                     help="Longest prompt suffix prompt lookup matches."),
        click.option("--text-env", type=click.Path(path_type=Path), default=None,
                     help="Python environment (EXECUTION_ENV_PATH) for the tokenizer and BLS models."),
        click.option("--llm-engine", type=click.Choice(["auto", "trtbuild", "transformers"]), default="auto", show_default=True,
                     help="transformers runtime: trtbuild's own engine (Llama family) or transformers' continuous batching."),
        click.option("--max-num-tokens", type=int, default=8192, show_default=True,
                     help="Token budget of one engine step; longer prefills are chunked."),
        click.option("--enable-kv-cache-reuse/--no-enable-kv-cache-reuse", default=False, show_default=True,
                     help="Reuse the KV blocks of shared prompt prefixes (prefix caching)."),
        click.option("--stream-interval-ms", type=float, default=0.0, show_default=True,
                     help="Streaming: at most one response per stream this often; tokens in between go together (0: no wait)."),
        click.option("--stream-max-tokens", type=int, default=0, show_default=True,
                     help="Streaming: at most this many tokens per response (0: all that accumulated; 1: one token each)."),
    ]
    return functools.reduce(lambda acc, opt: opt(acc), reversed(options), f)


def spec_from_options(checkpoint: Path, runtime: str, **o):
    from builder.checkpoint import check_tokenizer, load_model_spec
    from builder.spec import BuildSpec, KVCacheSpec

    model = load_model_spec(checkpoint, need_tokenizer=o.get("tokenizer_dir") is None)
    if o.get("tokenizer_dir") is not None:
        check_tokenizer(o["tokenizer_dir"])
    return BuildSpec(
        checkpoint=Path(checkpoint).absolute(),
        model=model,
        runtime=runtime,
        dtype=o["dtype"],
        device=o["device"],
        max_batch_size=o["max_batch_size"],
        max_input_len=o["max_input_len"],
        max_output_len=o["max_output_len"],
        tokenizer_dir=Path(o["tokenizer_dir"]).absolute() if o.get("tokenizer_dir") else None,
        kv_cache=KVCacheSpec(page_size=o["kv_cache_page_size"], free_gpu_mem_fraction=o["kv_cache_free_gpu_mem_fraction"],
                             enable_reuse=o.get("enable_kv_cache_reuse", False), dtype=o.get("kv_cache_dtype", "auto")),
        speculative_decoding_mode=o.get("speculative_decoding_mode", "none"),
        max_draft_len=o.get("max_draft_len", 4),
        max_matching_ngram_size=o.get("max_matching_ngram_size", 3),
        llm_engine=o.get("llm_engine", "auto"),
        max_num_tokens=o.get("max_num_tokens", 8192),
        stream_interval_ms=o.get("stream_interval_ms", 0.0),
        stream_max_tokens=o.get("stream_max_tokens", 0),
        exclude_input_in_output=o["exclude_input_in_output"],
        text_env=Path(o["text_env"]).absolute() if o.get("text_env") else None,
        quantization=o.get("quantization", "none"),
    )


@main.command("demo-checkpoint")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--model", "kind", type=click.Choice(["smollm2", "tiny-llama"]), default="smollm2", show_default=True,
              help="smollm2: trained SmolLM2-135M-Instruct; tiny-llama: random 2-layer Llama for tests.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
def demo_checkpoint(out: Path, kind: str, force: bool) -> None:
    """Write the embedded demo checkpoint (no download needed)."""
    from builder.checkpoint import write_demo_checkpoint

    with console.status(f"writing the {kind} checkpoint to {out}"):
        write_demo_checkpoint(out, kind, force=force)
    console.print(f"[green]wrote[/] {out}")


@main.command("repo")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Model repository to write.")
@click.option("--runtime", type=click.Choice(["transformers", "tensorrtllm", "llmapi", *ONNX_RUNTIMES]),
              default="transformers", show_default=True,
              help="tensorrtllm: CHECKPOINT is an engine dir (trtbuild engine); llmapi: a Hugging Face checkpoint; "
                   "onnxruntime/onnxruntime-python/tensorrt: an ONNX export dir (trtbuild export onnx).")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
@build_options
@serving_options
@onnx_repo_options
def repo(checkpoint: Path, out: Path, runtime: str, force: bool, **options) -> None:
    """Generate a Triton model repository for CHECKPOINT."""
    import dataclasses

    from builder.repository import generate, load_manifest
    from builder.serving import policy_from_options

    serving = pop_serving_options(options)
    onnx = pop_onnx_options(options, runtime)
    if runtime in ONNX_RUNTIMES:
        from builder.cli_export import onnx_repo

        onnx_repo(checkpoint, out, runtime, force, policy_from_options(options["max_batch_size"], **serving), **options, **onnx)
        return
    if runtime == "transformers":
        spec = spec_from_options(checkpoint, runtime, **options)
    else:
        from builder.cli_engine import engine_repo_spec

        spec = engine_repo_spec(checkpoint, runtime, **options)
    spec = dataclasses.replace(spec, serving=policy_from_options(spec.max_batch_size, **serving))
    entrypoints = load_manifest(generate(spec, out, force=force))["entrypoints"].values()
    console.print(f"[green]wrote[/] {out} ({', '.join(entrypoints)}; runtime {runtime})")


@main.command("serve")
@click.argument("repository", type=click.Path(path_type=Path))
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--grpc-port", type=int, default=8001, show_default=True)
@click.option("--metrics-port", type=int, default=8002, show_default=True)
@click.option("--tritonserver", "binary", type=click.Path(path_type=Path), default=None,
              help="A system tritonserver instead of the one in the nvidia-pytriton wheel.")
@click.option("--timeout", type=float, default=300, show_default=True, help="Seconds to wait for readiness.")
@click.option("--response-cache-bytes", type=int, default=0,
              help="Response cache size; 0: what the repository's serving policy asks for (trtbuild.json).")
@click.option("--rate-limit", type=click.Choice(["execution_count", "off"]), default=None,
              help="Default: execution_count where the repository's serving policy gives models rate-limiter resources.")
def serve(repository: Path, http_port: int, grpc_port: int, metrics_port: int, binary: Path | None, timeout: float,
          response_cache_bytes: int, rate_limit: str | None) -> None:
    """Start a local Triton server on REPOSITORY; Ctrl-C stops it."""
    from builder.server import ServerOptions, TritonInstall, TritonServer

    install = TritonInstall.from_binary(binary) if binary else None
    options = ServerOptions(http_port, grpc_port, metrics_port, response_cache_bytes=response_cache_bytes, rate_limit=rate_limit)
    server = TritonServer(repository, options, install=install)
    try:
        with _signals_interrupt():
            with console.status("starting tritonserver") as status:
                server.start(timeout=timeout, progress=lambda s: status.update(f"starting tritonserver ({s:.0f} s)"))
            console.print(
                f"[green]ready[/]: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}  log {server.log_path}"
            )
            while server.process.poll() is None:
                time.sleep(0.5)
            raise TrtbuildError(f"tritonserver exited with code {server.process.returncode}:\n{server.log_tail()}")
    except KeyboardInterrupt:
        console.print("stopping tritonserver")
    finally:
        server.stop()


@contextlib.contextmanager
def _signals_interrupt():
    """SIGTERM (`timeout`, `kill`, Kubernetes) and SIGHUP (a closed terminal) stop the server as Ctrl-C does."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@main.command("generate")
@click.argument("prompt")
@click.option("--url", default="127.0.0.1:8001", show_default=True, help="host:port (gRPC port for grpc, HTTP port for http).")
@click.option("--protocol", type=click.Choice(["grpc", "http"]), default="grpc", show_default=True)
@click.option("--model", default="ensemble", show_default=True)
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--stream/--no-stream", default=False)
@click.option("--temperature", type=float, default=None)
@click.option("--top-k", type=int, default=None)
@click.option("--top-p", type=float, default=None)
def generate_cmd(prompt: str, url: str, protocol: str, model: str, max_tokens: int, stream: bool, **sampling) -> None:
    """Send PROMPT to a running server and print the answer."""
    from clients.generate import GenerationError, ServerUnavailable, make_generator

    client = make_generator(url, protocol, model)
    try:
        for _, text, _ in client.stream(prompt, max_tokens, stream, **sampling):
            click.echo(text, nl=False)
        click.echo()
    except ServerUnavailable as e:
        raise TrtbuildError(f"cannot reach a {protocol} server at {url}", hint="is `trtbuild serve` running? check --url and --protocol") from e
    except GenerationError as e:
        raise TrtbuildError(f"the server refused the request: {e}") from None
    finally:
        client.close()


@main.command("demo")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("artifacts/demo"), show_default=True)
@click.option("--model", "kind", type=click.Choice(["smollm2", "tiny-llama"]), default="smollm2", show_default=True)
@click.option("--max-tokens", type=int, default=32, show_default=True)
def demo(workdir: Path, kind: str, max_tokens: int) -> None:
    """The main job on the embedded default: checkpoint -> repository -> server -> gRPC/HTTP generations."""
    from builder.demo import run_demo

    run_demo(workdir, kind=kind, max_tokens=max_tokens, console=console)


# Each stage's commands live beside the code they drive.
from builder.cli_bench import bench  # noqa: E402
from builder.cli_deploy import k8s_cmd, plan_cmd  # noqa: E402
from builder.cli_engine import compose, engine, inspect_cmd  # noqa: E402
from builder.cli_export import export  # noqa: E402
from builder.cli_quantize import quantize_cmd  # noqa: E402
from builder.cli_validate import validate_cmd  # noqa: E402

for _command in (quantize_cmd, engine, inspect_cmd, export, compose, bench, validate_cmd, k8s_cmd, plan_cmd):
    main.add_command(_command)
