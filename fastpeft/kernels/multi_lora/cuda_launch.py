"""The multi-LoRA decode (BGMV) launcher over the CUDA C++ kernels (``csrc/bgmv.cu``).

``multi_lora_decode`` has the signature and semantics of ``launch.multi_lora_decode`` (the
argument contract is in ``launch.py``): ``y[t] += scalings[i] * (x[t] A_i[:r_i]^T)
B_i[:, :r_i]^T`` in place for every row t whose ``i = adapter_ids[t]`` lies in ``[0, L)``, with
``r_i = clamp(ranks[i], 0, R_MAX)``; other rows are not touched and no slot is read for them,
so ids and ranks never make the kernels read out of bounds. **Opt-in: no GPU has run these
kernels yet** (``FASTPEFT_BACKEND=cuda``).

Two launches on x's device's current stream, sized by bytes rather than tokens so that even
one token spreads over every SM (``csrc/bgmv.cu`` has the plan):

- shrink, grid ``(T, S, ceil(R_MAX / 4))`` with ``S = ceil(K / BGMV_SLICE_K)`` (512): each block
  reads 4 rank rows x 512 columns of ``A_i`` (one 8-element group per thread, 16-byte loads)
  and writes their fp32 partial sums into the scratch ``[T, S, R_MAX]``;
- expand, grid ``(T, ceil(N / cols))`` with ``cols = 256 / ceil(R_MAX / 8)``: each block adds
  its token's S partials per rank in slice order, reads ``cols`` rows of ``B_i`` (one group per
  thread) and updates those columns of y.

Bytes moved per call: ``sum_t (r_t K + N r_t)`` adapter elements (tokens sharing an adapter
re-read it, mostly from L2), x read and y read and written once, ``T S R_MAX`` fp32 partials
written once and read by each expand block of their token (``S r_t`` floats each, from L2).
At K = N = 4096, R_MAX = 64, one token: 128 shrink and 128 expand blocks, 1 MB of bf16
adapter. Ids, ranks and scalings are read on the device (no host sync: CUDA-graph safe); every
sum runs in a fixed order, with no atomics: bitwise reproducible.
"""

from __future__ import annotations

import torch

from fastpeft import cuda_ext
from fastpeft.kernels import launch_device
from fastpeft.kernels.launch_device import on_device_of


def multi_lora_decode(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scalings: torch.Tensor,
    adapter_ids: torch.Tensor,
    ranks: torch.Tensor,
) -> None:
    """Decode (BGMV) into ``y [T, N]`` in place; shapes and dtypes as ``launch.multi_lora_decode``.

    x ``[T, K]`` (unit column stride), ``lora_a [L, R_MAX, K]``, ``lora_b [L, N, R_MAX]``
    (contiguous, x's dtype or fp32), ``scalings [L]`` fp32, ``adapter_ids [T]`` and
    ``ranks [L]`` int64. Grids and bytes: the module's docstring. Returns None.
    """
    ext = cuda_ext.load()
    num_tokens, k = x.shape
    num_slots, r_max, _ = lora_a.shape
    n = lora_b.shape[1]
    if num_tokens == 0 or num_slots == 0:
        return
    slices = -(-k // ext.BGMV_SLICE_K)
    with on_device_of(x):
        shrunk = launch_device.empty_output((num_tokens, slices, r_max), torch.float32, x.device)
        ext.bgmv_forward(
            x=x.data_ptr(), lora_a=lora_a.data_ptr(), lora_b=lora_b.data_ptr(), scalings=scalings.data_ptr(),
            adapter_ids=adapter_ids.data_ptr(), ranks=ranks.data_ptr(), y=y.data_ptr(), shrunk=shrunk.data_ptr(),
            T=num_tokens, K=k, N=n, L=num_slots, R_max=r_max, ld_x=x.stride(0), ld_y=y.stride(0),
            dtype=cuda_ext.dtype_code(x.dtype), lora_dtype=cuda_ext.dtype_code(lora_a.dtype),
            stream=cuda_ext.stream_of(x),
        )
