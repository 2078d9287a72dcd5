"""The bottleneck adapter's two launch functions over the CUDA C++ kernels (``csrc/bottleneck.cu``).

Same signatures, shapes, dtypes, strides and outputs as ``launch.py`` (the contract, described
there), including the saved fp32 pre-activation ``z``; selected with ``FASTPEFT_BACKEND=cuda``.
**Opt-in: no GPU has run these kernels yet.**

    z   = dropout(h) W_down^T + b_down            (fp32, [M, R])
    out = residual + scaling * (act(z) W_up^T + b_up)

For 16-bit h every product runs on tensor cores (wmma m16n16k16, fp32 accumulation): the
forward and the backward's row step (``dz``, ``dh``, the scaling's partials) one block per 32
rows, the weight gradients one block per 64 x 64 tile and row split; fp32 weights, ``act(z)``
and ``dz`` are rounded to h's dtype for the products, sums stay fp32. fp32 h keeps fp32
products on CUDA cores. The kernels read every operand through its strides (no copies), a tensor ``scaling`` and the
dropout seed on the device (no host sync: CUDA-graph safe), and launch on h's device's current
stream. The backward's weight and bias gradients come as per-split fp32 partial sums (one
split per ``rows_per_split`` rows) that this module adds in split order with torch: no
atomics, bitwise reproducible.
"""

from __future__ import annotations

import torch

from fastpeft import cuda_ext
from fastpeft.kernels import launch_device
from fastpeft.kernels.dropout_mask import dropout_threshold
from fastpeft.kernels.launch_device import on_device_of

# Blocks per SM to aim for in the weight-gradient kernel (64 x 64 tiles of [D, R] times the
# row splits): 2 keeps every SM busy while one block waits on memory, and each extra split
# only adds one fp32 [D, R] partial for the launcher to sum.
_BLOCKS_PER_SM = 2


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dropout(dropout_p: float, seed: torch.Tensor) -> tuple[int, int, float]:
    """The extension's ``(seed address or 0, threshold, 1/(1-p))``."""
    if dropout_p == 0.0:
        return 0, 0, 1.0
    return seed.data_ptr(), dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


def _scaling(scaling: float | torch.Tensor, device: torch.device) -> tuple[tuple[int, float], torch.Tensor | None]:
    """The extension's ``(fp32 device address or 0, value)`` and the fp32 tensor to keep alive."""
    if isinstance(scaling, torch.Tensor):
        t = scaling.detach().to(device=device, dtype=torch.float32).reshape(1)
        return (t.data_ptr(), 1.0), t
    return (0, float(scaling)), None


def _splits(m: int, d: int, rank: int, device: torch.device, rows_step: int, tile: int) -> tuple[int, int]:
    """``(splits, rows_per_split)`` of the weight-gradient kernel (``tile`` x ``tile`` blocks
    of [D, R]): enough row splits for ``_BLOCKS_PER_SM`` blocks per SM, each a multiple of
    ``rows_step`` rows."""
    sms = cuda_ext.sm_count(device)
    tiles = _cdiv(d, tile) * _cdiv(rank, tile)
    splits = max(1, min(_cdiv(_BLOCKS_PER_SM * sms, tiles), _cdiv(m, rows_step)))
    rows_per_split = rows_step * _cdiv(_cdiv(max(m, 1), splits), rows_step)
    return _cdiv(max(m, 1), rows_per_split), rows_per_split


def bottleneck_forward(
    h: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str,
    scaling: float | torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [M, D] in h's dtype, z [M, R] fp32)``; ``residual`` None means h (``launch.py``)."""
    ext = cuda_ext.load()
    m, d = h.shape
    rank = w_down.shape[0]
    with on_device_of(h):
        out = launch_device.empty_output((m, d), h.dtype, h.device)
        z = launch_device.empty_output((m, rank), torch.float32, h.device)
        scale, _keep_alive = _scaling(scaling, h.device)
        ext.bottleneck_forward(
            h=cuda_ext.matrix(h), w_down=cuda_ext.matrix(w_down), b_down=cuda_ext.vector(b_down),
            w_up=cuda_ext.matrix(w_up), b_up=cuda_ext.vector(b_up),
            residual=(0, 0, 0) if residual is None else cuda_ext.matrix(residual),
            out=out.data_ptr(), z=z.data_ptr(), M=m, D=d, R=rank, activation=ext.ACTIVATIONS[activation],
            scaling=scale, dropout=_dropout(dropout_p, seed), dtype=cuda_ext.dtype_code(h.dtype),
            weight_dtype=cuda_ext.dtype_code(w_down.dtype), stream=cuda_ext.stream_of(h),
        )
    return out, z


def bottleneck_backward(
    grad_out: torch.Tensor,
    h: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    z: torch.Tensor,
    activation: str,
    scaling: float | torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor,
    residual_is_h: bool,
    needs_grad: tuple[bool, bool, bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """``(grad_h, grad_w_down, grad_b_down, grad_w_up, grad_b_up, grad_scaling)``, each None
    unless ``needs_grad`` asks for it (``launch.py``: shapes, dtypes and math)."""
    ext = cuda_ext.load()
    need_h, need_wd, need_bd, need_wu, need_bu, need_s = needs_grad
    m, d = h.shape
    rank = w_down.shape[0]
    w_dtype = w_down.dtype
    dev = h.device
    need_dz = need_h or need_wd or need_bd or need_s
    with on_device_of(h):
        splits, rows_per_split = _splits(m, d, rank, dev, ext.OUTER_ROWS, ext.OUTER_TILE)

        def buffer(shape: tuple[int, ...], needed: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
            return launch_device.empty_output(shape, dtype, dev) if needed else None

        dz = buffer((m, rank), need_dz)
        ds_parts = buffer((_cdiv(m, ext.ROW_BLOCK),), need_s)
        dh = buffer((m, d), need_h, h.dtype)
        wu_parts = buffer((splits, d, rank), need_wu)
        bu_parts = buffer((splits, d), need_bu or (need_s and b_up is not None))
        wd_parts = buffer((splits, rank, d), need_wd)
        bd_parts = buffer((splits, rank), need_bd)
        scale, scale_t = _scaling(scaling, dev)
        ext.bottleneck_backward(
            dout=cuda_ext.matrix(grad_out), h=cuda_ext.matrix(h), w_down=cuda_ext.matrix(w_down),
            w_up=cuda_ext.matrix(w_up), z=z.data_ptr(), dz=cuda_ext.address(dz),
            ds_partials=cuda_ext.address(ds_parts), dh=cuda_ext.address(dh),
            wu_partials=cuda_ext.address(wu_parts), bu_partials=cuda_ext.address(bu_parts),
            wd_partials=cuda_ext.address(wd_parts), bd_partials=cuda_ext.address(bd_parts),
            M=m, D=d, R=rank, splits=splits, rows_per_split=rows_per_split, activation=ext.ACTIVATIONS[activation],
            scaling=scale, add_dout=residual_is_h, dropout=_dropout(dropout_p, seed),
            dtype=cuda_ext.dtype_code(h.dtype), weight_dtype=cuda_ext.dtype_code(w_dtype), stream=cuda_ext.stream_of(h),
        )
        s = scale_t.reshape(()) if scale_t is not None else scale[1]
        dbu = bu_parts.sum(0) if bu_parts is not None else None
        grad_s = None
        if need_s:
            grad_s = ds_parts.sum()
            if b_up is not None:
                grad_s = grad_s + dbu @ b_up.to(torch.float32)
        return (
            dh,
            wd_parts.sum(0).to(w_dtype) if need_wd else None,
            bd_parts.sum(0).to(w_dtype) if need_bd else None,
            (wu_parts.sum(0) * s).to(w_dtype) if need_wu else None,
            (dbu * s).to(w_dtype) if need_bu else None,
            grad_s,
        )
