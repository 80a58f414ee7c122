"""Build manifests: what produced an output directory, from what, and the hash of every file in it.

A manifest lets a later step (engine build, repository, deployment) check that its input is the
one that was measured, and lets a reviewer reproduce a build from the recorded tool versions.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any, Iterable

from trtbuild.errors import TrtbuildError, read_json_file

MANIFEST_NAME = "trtbuild-manifest.json"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` (relative POSIX path -> hex digest), manifest excluded."""
    directory = Path(directory)
    return {
        p.relative_to(directory).as_posix(): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }


def tool_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Installed distribution versions; None for a package that is not installed."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_manifest(directory: Path, data: dict[str, Any]) -> Path:
    """Write `data` plus the hashes of every other file in `directory` as trtbuild-manifest.json."""
    path = Path(directory) / MANIFEST_NAME
    payload = {**data, "files": file_hashes(directory)}
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    return path


def read_manifest(directory: Path) -> dict[str, Any]:
    return read_json_file(Path(directory) / MANIFEST_NAME, missing=f"{directory} has no {MANIFEST_NAME}",
                          hint="was it written by trtbuild?")


def verify_manifest(directory: Path) -> None:
    """Raise if a file listed in the manifest is missing or changed, or an unlisted file appeared."""
    recorded = read_manifest(directory).get("files", {})
    actual = file_hashes(directory)
    changed = sorted(k for k in recorded if actual.get(k) != recorded[k])
    extra = sorted(set(actual) - set(recorded))
    if changed or extra:
        detail = "; ".join(filter(None, [
            f"changed or missing: {', '.join(changed)}" if changed else "",
            f"not in the manifest: {', '.join(extra)}" if extra else "",
        ]))
        raise TrtbuildError(f"{directory} does not match its {MANIFEST_NAME}: {detail}",
                            hint="re-run the step that wrote it")
