"""Outputs are written to a temporary sibling directory and renamed into place when complete.

A failed build therefore never leaves a half-written repository, engine or export behind, and no
command can replace its own inputs: every writer names what it reads, and an `--out` that is, holds
or lies inside one of them is refused whatever `--force` says.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from trtbuild.errors import TrtbuildError

Inputs = Iterable["Path | str | None"]


def _overlap(out: Path, source: Path) -> str | None:
    if out == source:
        return "is"
    if out in source.parents:
        return "contains"
    if source.is_dir() and source in out.parents:
        return "lies inside"
    return None


def check_output_dir(out: Path, force: bool, *, inputs: Inputs) -> None:
    """Refuse to overwrite a non-empty directory unless asked to, and an input always."""
    out = Path(out).expanduser().resolve()
    for source in inputs:
        if source is None:
            continue
        source = Path(source).expanduser().resolve()
        relation = _overlap(out, source)
        if relation:
            raise TrtbuildError(f"--out {out} {relation} the input {source}; writing there would destroy what this command reads",
                                hint="choose an --out outside every input (--force never overrides this)")
    if out.exists() and not out.is_dir():
        raise TrtbuildError(f"{out} exists and is not a directory", hint="choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise TrtbuildError(f"output directory {out} exists and is not empty", hint="pass --force to replace it")


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool = False, *, inputs: Inputs) -> Iterator[Path]:
    """Yield a staging directory that replaces `out` only if the block succeeds."""
    inputs = list(inputs)
    out = Path(out).absolute()
    check_output_dir(out, force, inputs=inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise TrtbuildError(f"cannot write under {out.parent}: {e.strerror or e}", hint="choose a writable --out") from None
    staging.chmod(0o755)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    backup = None
    if out.exists():
        backup = out.with_name(f".{out.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        out.rename(backup)
    staging.rename(out)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
