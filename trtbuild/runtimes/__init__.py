"""The runtimes a repository can be generated for, one registered entry each.

Adding a runtime is one module here that defines a `Runtime` (what CHECKPOINT is, the options it
honours or adds, how it makes its spec and writes its repository) and one line below.
"""

from __future__ import annotations

from pathlib import Path

from trtbuild.errors import TrtbuildError
from trtbuild.repository.render import Written
from trtbuild.runtimes import llmapi, onnx, tensorrtllm, transformers
from trtbuild.runtimes.base import RepoRequest, Runtime

REGISTRY: dict[str, Runtime] = {r.name: r for r in (transformers.RUNTIME, tensorrtllm.RUNTIME, llmapi.RUNTIME, *onnx.RUNTIMES)}
NAMES = tuple(REGISTRY)


def get(name: str) -> Runtime:
    if name not in REGISTRY:
        raise TrtbuildError(f"unknown runtime '{name}'", hint=f"choose one of {', '.join(NAMES)}")
    return REGISTRY[name]


def own_options() -> frozenset[str]:
    """Options some runtime adds to `repo` (not build options)."""
    return frozenset(n for r in REGISTRY.values() for n in r.option_names)


def write_repository(runtime: str, request: RepoRequest) -> Written:
    """`trtbuild repo`: refuse options the runtime does not read, make its spec, write its repository."""
    entry = get(runtime)
    entry.check(request, own_options())
    return entry.write(entry.spec(request), request.out, request.force)


def generate(spec, out: Path, *, force: bool = False) -> Path:
    """Write the repository of a spec already made (demo, benchmarks, tests)."""
    return get(spec.runtime).write(spec, out, force).out
