"""The package as a user installs it: a wheel that works without the source tree, and a module graph
without loops, whose command line nothing imports back."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trtbuild", "trtbuild_runtime")


def module_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports at load time (module level; lazy imports inside
    functions run after loading and cannot make a load-time loop)."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = module_graph()
    assert len(graph) > 60  # the walk saw the project
    assert cycles(graph) == []


def test_cycle_finder_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nothing_imports_the_command_line_back():
    graph = module_graph()
    def cli(name):
        return name == "trtbuild.cli" or name.startswith("trtbuild.cli.")

    importers = sorted(m for m, deps in graph.items()
                       if not cli(m) and m != "trtbuild.__main__" and any(cli(d) for d in deps))  # `python -m trtbuild`
    assert importers == []


def test_the_runtime_does_not_depend_on_the_builder():
    """trtbuild_runtime travels alone inside every generated repository."""
    graph = module_graph()
    assert sorted(m for m, deps in graph.items() if m.startswith("trtbuild_runtime") and any(d.startswith("trtbuild.") or d == "trtbuild" for d in deps)) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.server
def test_wheel_installs_and_serves_without_the_source_tree(tmp_path):
    """Build the wheel, install it into a fresh venv (dependencies from this environment, trtbuild
    only from the wheel), then run demo-checkpoint, repo, serve and generate from an empty folder."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, ROOT],
                   check=True, capture_output=True, cwd=tmp_path)
    wheel = next(dist.glob("trtbuild-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    # this environment's packages, but not its editable trtbuild (.pth files of a plain path entry are not read)
    (site / "zz-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], check=True, capture_output=True)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": ""}
    located = subprocess.check_output([python, "-c", "import trtbuild, trtbuild_runtime; print(trtbuild.__file__, trtbuild_runtime.__file__)"],
                                      text=True, cwd=work, env=env)
    assert str(ROOT) not in located and str(site) in located

    def trtbuild(*args, **kw):
        return subprocess.run([venv / "bin" / "trtbuild", *map(str, args)], cwd=work, env=env, text=True, capture_output=True, **kw)

    assert trtbuild("demo-checkpoint", "--model", "tiny-llama", "--out", "ckpt").returncode == 0
    result = trtbuild("repo", "ckpt", "--out", "repo", "--max-batch-size", 2, "--max-input-len", 64, "--max-output-len", 16)
    assert result.returncode == 0, result.stderr
    http, grpc, metrics = _free_port(), _free_port(), _free_port()
    server = subprocess.Popen([venv / "bin" / "trtbuild", "serve", "repo", "--http-port", str(http), "--grpc-port", str(grpc),
                               "--metrics-port", str(metrics), "--timeout", "240"],
                              cwd=work, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for line in server.stdout:
            if "ready" in line or "error" in line.lower():
                break
        assert server.poll() is None, line
        answer = trtbuild("generate", "Hello", "--url", f"127.0.0.1:{grpc}", "--max-tokens", 4, timeout=120)
        assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr
    finally:
        server.terminate()
        server.wait(timeout=60)
