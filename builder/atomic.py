"""Outputs are written to a temporary sibling directory and renamed into place when complete.

A failed build therefore never leaves a half-written repository, engine or export behind.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from builder.errors import TrtbuildError


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse to overwrite a non-empty directory unless asked to."""
    if out.exists() and not out.is_dir():
        raise TrtbuildError(f"{out} exists and is not a directory", hint="choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise TrtbuildError(f"output directory {out} exists and is not empty", hint="pass --force to replace it")


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a staging directory that replaces `out` only if the block succeeds."""
    out = Path(out).absolute()
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
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
