"""Run a real Triton Inference Server locally.

The server binary comes from the `nvidia-pytriton` wheel (Triton 2.51, Python backend) unless a
system `tritonserver` is given. Its Python-backend stub runs in isolated mode and takes its
interpreter from the first `python3` on PATH, so the server is started with this interpreter's
`bin` first on PATH and its `libpython` on LD_LIBRARY_PATH.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from trtbuild.errors import TrtbuildError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on host:port (a bind test, as tritonserver's own would fail;
    SO_REUSEADDR as the server sets it, so connections of a stopped server in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _die_with_parent() -> None:
    """Runs in the child before exec: its own process group (so stop() reaches the Python stubs) and
    SIGTERM when the trtbuild process that started it dies, even by SIGKILL (Linux PR_SET_PDEATHSIG)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


@dataclasses.dataclass(frozen=True)
class TritonInstall:
    """Where the server binary, the Python backend and its libraries live."""

    binary: Path
    backend_dir: Path
    library_paths: tuple[Path, ...]
    cache_dir: Path | None

    @classmethod
    def from_pytriton(cls) -> "TritonInstall":
        """The server inside the wheel, or an unpacked copy of it under $TRTBUILD_PYTRITON_ROOT."""
        if os.environ.get("TRTBUILD_PYTRITON_ROOT"):
            site = Path(os.environ["TRTBUILD_PYTRITON_ROOT"])
        else:
            spec = importlib.util.find_spec("pytriton")
            if spec is None or not spec.submodule_search_locations:
                raise TrtbuildError(
                    "no tritonserver found: the nvidia-pytriton wheel is not installed",
                    hint="run `make setup`, or pass --tritonserver PATH",
                )
            site = Path(list(spec.submodule_search_locations)[0]).parent
        root = site / "pytriton" / "tritonserver"
        libs = site / "nvidia_pytriton.libs"
        return cls(
            binary=root / "bin" / "tritonserver",
            backend_dir=_python_backend_dir(root),
            library_paths=(Path(sysconfig.get_config_var("LIBDIR")), libs),
            cache_dir=root / "caches",
        )

    @classmethod
    def from_binary(cls, binary: Path) -> "TritonInstall":
        binary = Path(binary)
        if not binary.is_file():
            raise TrtbuildError(f"--tritonserver {binary} does not exist")
        root = binary.resolve().parent.parent  # /opt/tritonserver/bin/tritonserver -> /opt/tritonserver
        return cls(binary=binary, backend_dir=root / "backends", library_paths=(), cache_dir=root / "caches")


def _python_backend_dir(root: Path) -> Path:
    """A backends/ folder holding the Python backend with the stub built for this interpreter."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise TrtbuildError(f"the pytriton wheel has no Python-backend stub for Python {version}")
    key = hashlib.sha1(str(root).encode()).hexdigest()[:10]  # one per installation: servers of two venvs never share
    cache = Path(os.environ.get("TRTBUILD_CACHE", Path.home() / ".cache" / "trtbuild")) / f"backends-py{version}-{key}"
    target = cache / "python"
    marker = target / ".source"
    if not marker.exists() or marker.read_text() != str(root):
        shutil.rmtree(cache, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix="backends.", dir=cache.parent if cache.parent.exists() else None))
        shutil.copytree(root / "backends" / "python", staging / "python", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, staging / "python" / stub.name)
        (staging / "python" / ".source").write_text(str(root))
        cache.parent.mkdir(parents=True, exist_ok=True)
        try:
            staging.rename(cache)
        except OSError:  # another process won the race
            shutil.rmtree(staging, ignore_errors=True)
    return cache


@dataclasses.dataclass
class ServerOptions:
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    host: str = "127.0.0.1"
    log_verbose: int = 0
    exit_timeout_s: int = 10  # how long shutdown waits for requests in flight
    response_cache_bytes: int = 0
    rate_limit: str | None = None  # "execution_count" or "off"
    extra_args: tuple[str, ...] = ()
    repository_policy: bool = True  # take what is unset above from the repository's serving policy

    def with_repository_policy(self, repository: Path) -> "ServerOptions":
        """The response cache and rate limiter the repository's trtbuild.json policy needs (trtbuild.repository.serving),
        where these options leave them unset."""
        from trtbuild.repository.render import MANIFEST
        from trtbuild.repository.serving import ServerFlags, repository_policy

        manifest = Path(repository) / MANIFEST
        if not self.repository_policy or not manifest.is_file():
            return self
        flags = ServerFlags.for_policy(repository_policy(json.loads(manifest.read_text())))
        rate_limit = self.rate_limit or flags.rate_limit
        extra = tuple(a for a in flags.args if a not in self.extra_args) if rate_limit != "off" else ()
        return dataclasses.replace(self, response_cache_bytes=self.response_cache_bytes or flags.response_cache_bytes,
                                   rate_limit=rate_limit, extra_args=(*self.extra_args, *extra))

    def resolved(self) -> "ServerOptions":
        return dataclasses.replace(
            self,
            http_port=self.http_port or free_port(),
            grpc_port=self.grpc_port or free_port(),
            metrics_port=self.metrics_port or free_port(),
        )


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class TritonServer:
    """A tritonserver process serving one model repository; use as a context manager."""

    def __init__(
        self,
        repository: Path,
        options: ServerOptions | None = None,
        install: TritonInstall | None = None,
        log_path: Path | None = None,
    ):
        self.repository = Path(repository).absolute()
        if not self.repository.is_dir():
            raise TrtbuildError(f"model repository {self.repository} does not exist", hint="run `trtbuild repo` first")
        self.options = (options or ServerOptions()).with_repository_policy(self.repository).resolved()
        self.install = install or TritonInstall.from_pytriton()
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="tritonserver.", suffix=".log")[1])
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"{self.options.host}:{self.options.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.options.host}:{self.options.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.options.host}:{self.options.metrics_port}/metrics"

    def command(self) -> list[str]:
        o = self.options
        cmd = [
            str(self.install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.install.backend_dir}",
            f"--http-address={o.host}",
            f"--http-port={o.http_port}",
            f"--grpc-address={o.host}",
            f"--grpc-port={o.grpc_port}",
            f"--metrics-address={o.host}",
            f"--metrics-port={o.metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            f"--log-verbose={o.log_verbose}",
            f"--exit-timeout-secs={o.exit_timeout_s}",
        ]
        if o.response_cache_bytes:
            cmd.append(f"--cache-config=local,size={o.response_cache_bytes}")
            if self.install.cache_dir is not None:
                cmd.append(f"--cache-directory={self.install.cache_dir}")
        if o.rate_limit:
            cmd.append(f"--rate-limit={o.rate_limit}")
        cmd.extend(o.extra_args)
        return cmd

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        libs = [str(p) for p in self.install.library_paths]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        if libs:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    def check_ports(self) -> None:
        """Refuse ports that something else holds: a leftover server there would answer our readiness check."""
        o = self.options
        taken = [f"{name} {port}" for name, port in (("HTTP", o.http_port), ("gRPC", o.grpc_port), ("metrics", o.metrics_port))
                 if port_in_use(o.host, port)]
        if taken:
            raise TrtbuildError(
                f"port{'s' if len(taken) > 1 else ''} {', '.join(taken)} on {o.host} already in use",
                hint="another server (perhaps a leftover tritonserver: `pgrep -a tritonserver`) holds it; stop it "
                     "or pick other ports with --http-port/--grpc-port/--metrics-port",
            )

    def start(self, timeout: float = 300.0, progress: Callable[[float], None] | None = None) -> "TritonServer":
        self.check_ports()
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.environment(), preexec_fn=_die_with_parent
        )
        log.close()
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                causes = self.load_failures()
                raise TrtbuildError(
                    f"tritonserver exited with code {self.process.returncode} while loading {self.repository}:\n"
                    + ("\n".join(causes) if causes else self.log_tail()),
                    hint=f"full log: {self.log_path}",
                )
            if self.is_ready():
                return self
            if progress:
                progress(time.monotonic() - started)
            time.sleep(0.25)
        self.stop()
        raise TrtbuildError(
            f"tritonserver was not ready after {timeout:.0f} s:\n{self.log_tail()}", hint=f"full log: {self.log_path}"
        )

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def load_failures(self) -> list[str]:
        """Why models failed to load, one line each, from Triton's log: the cause, not "failed to load all models"."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        found = {}
        for model, why in re.findall(r'failed to load \'([^\']+)\' version \d+: (.*?)(?:\\n|"$)', text, re.M):
            found.setdefault(model, f"model '{model}': {why.strip()}")
        return list(found.values())

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        interesting = [l for l in text if "CUDA" not in l and "NVML" not in l and "DCGM" not in l]
        return "\n".join(interesting[-lines:])

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop the server and everything in its process group (the Python backend stubs)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait()
        _signal_group(self.process.pid, signal.SIGKILL)  # stubs that outlived the server
        return self.process.returncode

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            return r.read().decode()

    def unhealthy_engines(self) -> dict[str, str]:
        """Models whose LLM engine reports itself unhealthy (gauge trtbuild_engine_healthy 0), with the
        reason it logged. Ready is not healthy: Triton keeps answering /v2/health/ready for a wedged engine."""
        try:
            text = self.metrics()
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return {}
        down = [m.group(1) for m in re.finditer(r'^trtbuild_engine_healthy\{model="([^"]+)"\} 0(?:\.0)?$', text, re.M)]
        log = self.log_path.read_text(errors="replace") if down else ""
        reasons = re.findall(r"LLM engine unhealthy: (.+?);", log)
        return {model: reasons[-1] if reasons else "see the server log" for model in down}

    def __enter__(self) -> "TritonServer":
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
