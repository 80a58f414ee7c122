"""User-facing errors: one line that says what is wrong and what to do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class TrtbuildError(Exception):
    """An error caused by the user's input or environment, printed without a traceback."""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base} ({self.hint})" if self.hint else base


def read_json_file(path: Path, *, missing: str, hint: str | None = None) -> Any:
    """Parse a JSON file the user pointed at; a missing or broken file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise TrtbuildError(missing, hint=hint)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrtbuildError(f"{path} is not valid JSON: line {e.lineno}: {e.msg}") from None
