"""``forced_backend``: ``FASTPEFT_BACKEND`` set around a block, which the ops read at every call
(the focused benchmark's fastpeft rows and the multi-LoRA rows force their path with it)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def forced_backend(choice: str | None) -> Iterator[None]:
    """``FASTPEFT_BACKEND=choice`` for the block (nothing when None), restored after it."""
    if choice is None:
        yield
        return
    previous = os.environ.get("FASTPEFT_BACKEND")
    os.environ["FASTPEFT_BACKEND"] = choice
    try:
        yield
    finally:
        if previous is None:
            del os.environ["FASTPEFT_BACKEND"]
        else:
            os.environ["FASTPEFT_BACKEND"] = previous
