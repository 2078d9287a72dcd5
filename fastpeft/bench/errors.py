"""How every benchmark records a failure: one short line per failed case, row or step."""

from __future__ import annotations

# Longest error message kept per failure: the first line says what went wrong.
MAX_ERROR_CHARS = 300


def describe_error(exc: Exception) -> str:
    """One short line for a failure: the exception type and its first message line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:MAX_ERROR_CHARS]
