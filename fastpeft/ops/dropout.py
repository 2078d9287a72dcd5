"""Which dropout keep-mask an op draws, by device and backend, and whether its backward
redraws it or reads the one the forward kept.

Three masks, all bool ``[rows, cols]`` with keep probability ``1 - p``
(``fastpeft.kernels.dropout_mask`` describes the bits):

- the kernels' Philox mask, a pure function of the op's seed: wherever the Triton kernels
  are in use (``backend.use_triton``), so a pass the dispatch table sends to the torch path
  drops what a kernel pass of the same call drops. On CUDA it is drawn by the Triton mask
  kernel (one pass writing one byte per element), under the interpreter by its torch-ops
  twin (``keep_mask_philox``). The backward redraws it, so the forward keeps nothing but
  ``M x r`` beyond x.
- on CPU without the kernels: torch's CPU generator seeded with the op's seed
  (``keep_mask_cpu``; Philox in torch ops costs tens of passes over the mask there).
- on CUDA without the kernels (``auto`` until they are validated on a GPU, or
  ``FASTPEFT_BACKEND=torch``): torch's CUDA generator, as ``nn.Dropout`` (PEFT's dropout)
  draws it -- one kernel, no host sync, CUDA-graph safe, reproducible under
  ``torch.manual_seed`` and replayed by activation checkpointing's RNG restore. It is not
  a function of the seed: the forward keeps it (one byte per element of x, half of PEFT's
  dropped-out 16-bit copy of x). Drawing the kernels' Philox bits there with torch ops would
  take ~94 int64 passes over the mask (est. ~7.6 GB of traffic for a 4096 x 4096 mask, several
  times the layer's GEMMs), and the Triton mask kernel is not used where the kernels are
  off (no GPU has validated it yet).
"""

from __future__ import annotations

import torch

from fastpeft.backend import triton_available, use_triton
from fastpeft.kernels.dropout_mask import keep_mask_cpu, keep_mask_philox


def kernel_keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    """The kernels' Philox keep-mask for ``seed`` (a 1-element int64 tensor) on its device:
    the Triton mask kernel on CUDA, ``keep_mask_philox`` (torch ops) elsewhere."""
    if seed.device.type == "cuda" and triton_available():
        from fastpeft.kernels.lora.launch import dropout_keep_mask

        return dropout_keep_mask(seed, rows, cols, p)
    return keep_mask_philox(seed, rows, cols, p)


def mask_follows_seed(device: torch.device) -> bool:
    """Whether the torch path's mask on ``device`` is a function of the op's seed (all but
    CUDA without the kernels, where torch's CUDA generator draws it)."""
    return device.type != "cuda" or use_triton(device)


def redraws_mask(device: torch.device) -> bool:
    """Whether the backward redraws the torch path's mask from the seed instead of reading a
    kept one: where the kernels (and so their mask kernel) are in use."""
    return use_triton(device)


def kept_mask(keep: torch.Tensor) -> torch.Tensor:
    """What the op's forward keeps of the torch path's mask ``keep`` for its backward:
    nothing (an empty tensor) where the backward redraws it (``redraws_mask``)."""
    return keep.new_empty(0) if keep.numel() and redraws_mask(keep.device) else keep


def saved_or_redrawn_mask(keep: torch.Tensor, x2: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """The forward's keep-mask for 2-D x ``[M, K]``, for a backward on the torch path:
    ``keep`` as the torch path kept it, or (a kernel path ran the forward, or the mask is
    redrawn: either keeps none) the kernels' Philox mask redrawn from ``seed``."""
    if p > 0.0 and not keep.numel():
        return kernel_keep_mask(seed, x2.shape[0], x2.shape[1], p)
    return keep


def keep_mask_torch_path(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    """The keep-mask the torch path draws on ``seed.device`` (see the module docstring)."""
    device = seed.device
    if use_triton(device):
        return kernel_keep_mask(seed, rows, cols, p)
    if device.type == "cuda":
        return torch.empty((rows, cols), dtype=torch.bool, device=device).bernoulli_(1.0 - p)
    return keep_mask_cpu(seed, rows, cols, p)


def rebuilt_keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float, kernel_path: bool,
                      keep: torch.Tensor | None = None) -> torch.Tensor:
    """The mask an op call with ``seed`` drew (``kernel_path``: the backend setting sends the
    call to a kernel path), for tests and users that rebuild a forward's dropout. With
    ``keep``, the op's own ``keep`` output of that call, the answer holds whatever ran it (a
    tuned table's pick included): the torch path's kept mask when it kept one, else the
    kernels' Philox mask (a kernel path ran it, or the torch path draws and redraws that one).

    Raises:
        ValueError: without ``keep``, the torch path on CUDA without the kernels, whose mask
            comes from torch's CUDA generator and is returned by the op itself (its ``keep``
            output).
    """
    if keep is not None:
        return keep.reshape(rows, cols) if keep.numel() else kernel_keep_mask(seed, rows, cols, p)
    if kernel_path:
        return kernel_keep_mask(seed, rows, cols, p)
    if not mask_follows_seed(seed.device):
        raise ValueError(f"the torch path on {seed.device} draws its dropout mask from torch's CUDA generator, as "
                         "nn.Dropout does, not from the seed: it cannot be rebuilt from the seed; the op returns it "
                         "(the keep output of torch.ops.fastpeft.lora_linear / bottleneck_adapter)")
    return keep_mask_torch_path(seed, rows, cols, p)
