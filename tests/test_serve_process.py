"""`trtbuild serve` owns its server: ports checked first, and every stop signal ends it and its stubs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from trtbuild.deploy.server import free_port

pytestmark = pytest.mark.server

TRTBUILD = [str(Path(sys.executable).with_name("trtbuild"))]


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention text (the server and its Python stubs name the repository)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(f"{pid}: {cmdline.strip()}")
    return found


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: signal.Signals(s).name)
def test_every_stop_signal_leaves_no_process(sig, tiny_repository, tmp_path):
    repository = tmp_path / f"repo-{signal.Signals(sig).name}"
    shutil.copytree(tiny_repository, repository)
    http, grpc, metrics = free_port(), free_port(), free_port()
    serve = subprocess.Popen(
        [*TRTBUILD, "serve", str(repository), "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not _ready(http):
            assert serve.poll() is None, serve.stdout.read().decode()
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.5)
        assert _processes_mentioning(str(repository)), "the server's processes should be visible while it runs"
        serve.send_signal(sig)
        assert serve.wait(timeout=60) is not None
        deadline = time.monotonic() + 30
        while _processes_mentioning(str(repository)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _processes_mentioning(str(repository)) == []
        assert not _ready(http)
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
        for line in _processes_mentioning(str(repository)):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)


def test_a_taken_port_is_refused_before_starting(tiny_server, tiny_repository):
    """A leftover server on the port would answer the health check: refuse instead of printing "ready"."""
    taken = tiny_server.options.http_port
    result = subprocess.run(
        [*TRTBUILD, "serve", str(tiny_repository), "--http-port", str(taken), "--grpc-port", str(free_port()),
         "--metrics-port", str(free_port())],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert f"HTTP {taken}" in output and "already in use" in output
    assert "ready" not in output.replace("already", "")
    assert "Traceback" not in output
