"""`trtbuild serve` (a local Triton server until Ctrl-C) and `trtbuild generate` (one request)."""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path

import click

from trtbuild.cli.console import console
from trtbuild.errors import TrtbuildError

HEALTH_CHECK_S = 1.0  # how often `serve` reads the engines' health gauges


@click.command("serve")
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
@click.option("--trace-file", type=click.Path(path_type=Path), default=None,
              help="Where Triton writes traces (off until `trtbuild profile --server` turns them on).")
def serve(repository: Path, http_port: int, grpc_port: int, metrics_port: int, binary: Path | None, timeout: float,
          response_cache_bytes: int, rate_limit: str | None, trace_file: Path | None) -> None:
    """Start a local Triton server on REPOSITORY; Ctrl-C stops it."""
    from trtbuild.deploy.server import ServerOptions, TritonInstall, TritonServer

    install = TritonInstall.from_binary(binary) if binary else None
    from trtbuild.bench.trace import trace_config_args

    options = ServerOptions(http_port, grpc_port, metrics_port, response_cache_bytes=response_cache_bytes, rate_limit=rate_limit,
                            extra_args=trace_config_args(trace_file) if trace_file else ())
    server = TritonServer(repository, options, install=install)
    try:
        with _signals_interrupt():
            with console.status("starting tritonserver") as status:
                server.start(timeout=timeout, progress=lambda s: status.update(f"starting tritonserver ({s:.0f} s)"))
            console.print(
                f"[green]ready[/]: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}  log {server.log_path}"
            )
            while server.process.poll() is None:
                time.sleep(HEALTH_CHECK_S)
                unhealthy = server.unhealthy_engines()
                if unhealthy:
                    model, why = next(iter(unhealthy.items()))
                    raise TrtbuildError(f"the LLM engine of model '{model}' is unhealthy ({why}); stopping the server",
                                        hint=f"restart it (a supervisor restarts it on this exit code); log {server.log_path}")
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


@click.command("generate")
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
    from trtbuild.clients.generate import GenerationError, ServerUnavailable, make_generator

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


