"""User-facing errors: one line that says what is wrong and what to do."""

from __future__ import annotations


class TrtbuildError(Exception):
    """An error caused by the user's input or environment, printed without a traceback."""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base} ({self.hint})" if self.hint else base
