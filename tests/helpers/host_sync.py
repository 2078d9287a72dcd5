"""A guard that fails a CPU run of code meant to run on a GPU without host synchronisation.

On CPU tensors nothing syncs, so CUDA's ``torch.cuda.set_sync_debug_mode("error")`` has no
CPU counterpart; ``no_host_sync`` makes the would-be syncs fail instead, at two levels:

- ATen (``HostSyncGuard``, a ``TorchDispatchMode``): ops that read a tensor's value on the
  host (``aten._local_scalar_dense``, ``aten.item``, ``aten.is_nonzero``, ``aten.equal``, any
  op returning a Python number) and ops whose output shape depends on the data
  (``nonzero``, ``unique*``, ``masked_select``, ``bincount``, ``repeat_interleave`` without
  ``output_size``, indexing with a bool mask, which runs ``nonzero`` inside the kernel);
- Python: ``Tensor.item``, ``tolist``, ``numpy``, ``__bool__``, ``__int__``, ``__index__``,
  ``__float__``, ``__complex__``, ``__format__`` and ``__repr__`` raise while it is active.
  A CPU tensor's ``tolist`` or ``bool`` reads its memory below the dispatcher, where the
  mode does not see it.

The mode also records each op with the shapes of its outputs (``HostSyncGuard.trace``), so a
test can check that two inputs of the same shapes but other values run the same ops on the
same shapes (no data-dependent shape the lists above missed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class HostSyncError(AssertionError):
    """Code under ``no_host_sync`` read a tensor on the host or made a data-dependent shape."""


# aten ops (overload packets) that read values on the host or size their output by the data.
_SYNCING_OPS = frozenset({
    "_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "nonzero", "argwhere", "masked_select",
    "bincount", "unique", "unique_dim", "unique_consecutive", "_unique", "_unique2", "unique_dim_consecutive",
})
# Ops that take index tensors: a bool (or uint8) mask among them means a nonzero inside.
_INDEXING_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index"})
# Python-level reads of a tensor's value.
_PYTHON_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__index__", "__float__", "__complex__",
                 "__format__", "__repr__")


def _problem(func, args, kwargs) -> str | None:
    """Why ``func(*args, **kwargs)`` would sync with the host, or None."""
    name = func.overloadpacket.__name__
    if name in _SYNCING_OPS:
        return "reads a value on the host or sizes its output by the data"
    if name == "repeat_interleave" and func._overloadname != "self_int" and kwargs.get("output_size") is None:
        return "repeat_interleave with tensor repeats and no output_size reads the total on the host"
    if name in _INDEXING_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        for index in indices or ():
            if isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8):
                return "indexing with a bool mask (a nonzero inside: a data-dependent shape)"
    return None


class HostSyncGuard(TorchDispatchMode):
    """Raises ``HostSyncError`` on an op that would sync (see the module docstring); records
    ``trace``: ``(op, output shapes)`` for every op run."""

    def __init__(self) -> None:
        super().__init__()
        self.trace: list[tuple[str, tuple[tuple[int, ...], ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        problem = _problem(func, args, kwargs)
        if problem is not None:
            raise HostSyncError(f"{func}: {problem}")
        out = func(*args, **kwargs)
        leaves = tree_leaves(out)
        reads_tensor = any(isinstance(v, torch.Tensor) for v in tree_leaves((args, kwargs)))
        if reads_tensor and any(isinstance(v, (bool, int, float, complex)) for v in leaves):
            raise HostSyncError(f"{func} returned a Python value from a tensor: it read it on the host")
        self.trace.append((str(func), tuple(tuple(v.shape) for v in leaves if isinstance(v, torch.Tensor))))
        return out


def _refuse(name: str):
    def refuse(self, *args, **kwargs):
        raise HostSyncError(f"Tensor.{name} reads the tensor on the host (a sync on a GPU)")

    return refuse


@contextlib.contextmanager
def python_reads_refused() -> Iterator[None]:
    """``Tensor.item``, ``tolist``, ``__bool__``... (``_PYTHON_READS``) raise
    ``HostSyncError`` inside the block; restored after."""
    saved = {name: torch.Tensor.__dict__.get(name) for name in _PYTHON_READS}
    try:
        for name in _PYTHON_READS:
            setattr(torch.Tensor, name, _refuse(name))
        yield
    finally:
        for name, original in saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def no_host_sync() -> Iterator[HostSyncGuard]:
    """Inside the block, any host read or data-dependent shape raises ``HostSyncError`` (the
    module docstring says which); yields the guard, whose ``trace`` lists the ops run."""
    guard = HostSyncGuard()
    with python_reads_refused(), guard:
        yield guard
    assert guard.trace, "no op ran under the guard: it guarded nothing"
