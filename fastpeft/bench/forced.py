"""``forced_backend``: ``FASTPEFT_BACKEND`` set around a block, which the ops read at every call
(the focused benchmark's fastpeft rows and the multi-LoRA rows force their path with it);
``forced_env`` for any such variable (the focused benchmark's opt-in TMA row)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def forced_env(name: str, value: str | None) -> Iterator[None]:
    """The environment variable ``name`` set to ``value`` for the block (nothing when None),
    restored after it."""
    if value is None:
        yield
        return
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def forced_backend(choice: str | None) -> contextlib.AbstractContextManager[None]:
    """``FASTPEFT_BACKEND=choice`` for the block (nothing when None), restored after it."""
    return forced_env("FASTPEFT_BACKEND", choice)
