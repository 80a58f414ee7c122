"""What a runtime is: one registered entry that says what CHECKPOINT must be for it, which `repo`
options it honours (and any of its own), how it makes its spec and how it writes its repository."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from trtbuild.errors import TrtbuildError
from trtbuild.repository.render import Written
from trtbuild.repository.serving import ServingPolicy


@dataclasses.dataclass(frozen=True)
class RepoRequest:
    """`trtbuild repo CHECKPOINT --out OUT --runtime NAME ...` as data."""

    checkpoint: Path
    out: Path
    options: dict[str, Any]  # every build option and runtime option, by its flag's name
    serving: ServingPolicy = ServingPolicy()
    explicit: frozenset[str] = frozenset()  # the options the user typed rather than left at their defaults
    force: bool = False


@dataclasses.dataclass(frozen=True)
class Runtime:
    name: str
    source: str  # what CHECKPOINT is for this runtime, for --help
    spec: Callable[[RepoRequest], Any]  # the typed spec it serves (a BuildSpec, or an OnnxServeSpec)
    write: Callable[[Any, Path, bool], Written]  # (spec, out, force): render, check and write the repository
    honours: frozenset[str] | None = None  # build options it reads; None: all of them
    refusal_hint: str = ""  # why the others do not apply
    options: tuple[Callable, ...] = ()  # click options of its own, added to `trtbuild repo`

    def check(self, request: RepoRequest, runtime_options: frozenset[str]) -> None:
        """An option this runtime does not read, typed explicitly, is an error rather than silently dropped."""
        honoured = (self.honours if self.honours is not None else frozenset(request.options) - runtime_options)
        ignored = sorted(request.explicit - honoured - {n for n in self.option_names})
        if ignored:
            names = ", ".join("--" + k.replace("_", "-") for k in ignored)
            raise TrtbuildError(f"{names} does not apply to the {self.name} runtime", hint=self.refusal_hint or None)

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(getattr(o, "trtbuild_name", "") for o in self.options)


def runtime_option(*decls: str, **attrs) -> Callable:
    """A click option a runtime declares; it remembers its parameter name so `check` can tell whose it is."""
    import click

    decorator = click.option(*decls, **attrs)
    decorator.trtbuild_name = next(d for d in decls if d.startswith("--")).lstrip("-").replace("-", "_")
    return decorator


def spec_from_options(checkpoint: Path, runtime: str, serving: ServingPolicy = ServingPolicy(), **o):
    """The BuildSpec of a Hugging Face checkpoint from `repo`'s build options: each option is the
    BuildSpec field of the same name (the KV-cache ones fill `kv_cache`); absent ones keep their defaults."""
    from trtbuild.checkpoint import check_tokenizer, load_model_spec
    from trtbuild.spec import BuildSpec, KVCacheSpec

    tokenizer_dir = o.get("tokenizer_dir")
    model = load_model_spec(checkpoint, need_tokenizer=tokenizer_dir is None)
    if tokenizer_dir is not None:
        check_tokenizer(tokenizer_dir)
    kv = {f.name: o["kv_cache_" + f.name] for f in dataclasses.fields(KVCacheSpec) if o.get("kv_cache_" + f.name) is not None}
    if "enable_kv_cache_reuse" in o:
        kv["enable_reuse"] = o["enable_kv_cache_reuse"]
    fields = {f.name for f in dataclasses.fields(BuildSpec)} - {"checkpoint", "model", "runtime", "kv_cache", "serving"}
    values = {k: v for k, v in o.items() if k in fields and v is not None}
    for name in ("tokenizer_dir", "text_env"):
        if values.get(name) is not None:
            values[name] = Path(values[name]).absolute()
    return BuildSpec(checkpoint=Path(checkpoint).absolute(), model=model, runtime=runtime, kv_cache=KVCacheSpec(**kv),
                     serving=serving, **values)
