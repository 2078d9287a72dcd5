"""Two-process CPU runs of the distributed tests: ``spawn_ranks`` starts ``WORLD`` ranks
(gloo on 127.0.0.1 only), bounded in time so that a hang fails the test instead of stalling
CI, and collects what each rank saved; the sizes and seeds the ranks share; what each rank
does with a model (``shard_decoder_layers``, ``shard_adapters_apart``, ``adamw_steps``,
``full``) and how it reports an error (``outcome``)."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from torch.distributed.tensor import DTensor  # noqa: E402

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6 has FSDP2 only under its old private path
    from torch.distributed._composable.fsdp import fully_shard

from tests.helpers.training import lora_grads, shift_batch  # noqa: E402

WORLD = 2  # ranks
PER_RANK = 2  # sequences per rank and step; a single process takes WORLD * PER_RANK
BATCH_SEED = 1234  # seeds the generator of the full batches the ranks split
COLLECTIVE_TIMEOUT_S = 60  # any one collective (a rank stuck in a hang raises after this)
SPAWN_TIMEOUT_S = 150  # the whole spawn, start-up (imports) included


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for the ranks' rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _loopback_interface() -> str | None:
    """The loopback interface's name (``lo`` on Linux), for gloo's own connections."""
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)


@contextlib.contextmanager
def rank_process_group(rank: int, port: int) -> Iterator[None]:
    """Rank ``rank``'s gloo process group on 127.0.0.1:``port`` for the block (one thread per
    rank; every collective bounded by ``COLLECTIVE_TIMEOUT_S``)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        yield
    finally:
        dist.destroy_process_group()


def spawn_ranks(worker: Callable[[int, int, str], None], out_dir: Path, what: str, ranks: int = WORLD) -> list[dict]:
    """Spawn ``ranks`` processes running ``worker(rank, port, out_dir)`` (bounded by
    ``SPAWN_TIMEOUT_S``); the results each saved as ``rank{r}.pt`` in ``out_dir``."""
    loopback = _loopback_interface()
    with pytest.MonkeyPatch.context() as env:
        if loopback is not None and "GLOO_SOCKET_IFNAME" not in os.environ:
            env.setenv("GLOO_SOCKET_IFNAME", loopback)  # else gloo binds the hostname's interface
        context = mp.start_processes(worker, args=(_free_port(), str(out_dir)), nprocs=ranks,
                                     join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
            if time.monotonic() >= deadline:
                pytest.fail(f"{what} workers still running after {SPAWN_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(ranks)]


def outcome(call: Callable[[], object]) -> str:
    """What ``call()`` did, as a rank reports it to the parent: ``"ExceptionType: message"``,
    or ``"no error"``."""
    try:
        call()
    except Exception as error:  # recorded for the parent
        return f"{type(error).__name__}: {error}"
    return "no error"


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: DTensors (FSDP2 shards) are gathered in full."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_decoder_layers(model: torch.nn.Module, **options) -> torch.nn.Module:
    """FSDP2 over each decoder layer of a transformers causal LM and over the model:
    ``fully_shard(..., **options)`` on each, so every parameter is sharded, base weights too."""
    for layer in model.model.layers:
        fully_shard(layer, **options)
    return fully_shard(model, **options)


# The submodules of fastpeft's layers that hold an adapter's weights: LoRA's A and B, a bottleneck
# adapter's projections.
ADAPTER_SUBMODULES = ("lora_A", "lora_B", "adapter_down", "adapter_up")


def shard_adapters_apart(model: torch.nn.Module, **options) -> torch.nn.Module:
    """``fully_shard(..., **options)`` on every adapter submodule (``ADAPTER_SUBMODULES``), then
    on the fastpeft layer holding them, then ``shard_decoder_layers``: the adapter's weights are
    FSDP units of their own, gathered only around their own forwards."""
    layers = [m for m in model.modules() if any(hasattr(m, name) for name in ADAPTER_SUBMODULES)]
    for layer in layers:
        for name in ADAPTER_SUBMODULES:
            if hasattr(layer, name):
                fully_shard(getattr(layer, name), **options)
        fully_shard(layer, **options)
    return shard_decoder_layers(model, **options)


def adamw_steps(model: torch.nn.Module, wrapped: torch.nn.Module, rows: slice, steps: int) -> dict[str, torch.Tensor]:
    """``steps`` AdamW steps on ``model``'s trainable parameters through ``wrapped`` (the
    model, or its DDP / FSDP2 wrapping), each on ``rows`` of a fresh full batch (``WORLD *
    PER_RANK`` sequences from ``BATCH_SEED``); the first step's gradients, whole, by name."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(BATCH_SEED)
    for step in range(steps):
        ids = shift_batch(generator, batch=WORLD * PER_RANK, length=8)[rows]
        loss = wrapped(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            grads = {n: full(g) for n, g in lora_grads(model).items()}
        optimizer.step()
    return grads
