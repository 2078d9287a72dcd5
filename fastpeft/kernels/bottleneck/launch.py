"""Launchers of the bottleneck adapter's Triton kernels: the contract every implementation
of the op follows (``cuda_launch`` mirrors these two functions, its products' rounding
aside: see Arithmetic).

    z   = dropout(h) W_down^T + b_down            (fp32, [M, R]; saved for the backward)
    out = residual + scaling * (act(z) W_up^T + b_up)

Contract (both functions):

- ``h``, ``residual``, ``grad_out``: 2-D ``[M, D]``, any strides (no copies; on a GPU the
  Triton op takes only ``configs.kernel_friendly`` h and residual, and copies an unaligned
  grad_out), ``M >= 1``, ``D >= 1``; fp32, fp16 or bf16 (float64 always takes the torch path). ``residual`` and
  ``grad_out`` in h's dtype.
- ``w_down [R, D]``, ``w_up [D, R]``, any strides, ``1 <= R <= 256`` (``configs.MAX_RANK``
  for the Triton launchers, ``CUDA_MAX_RANK`` for the CUDA C++ ones); both in one
  dtype, h's dtype or fp32 (an fp32 adapter on a 16-bit model). Biases ``b_down [R]``,
  ``b_up [D]`` in the weights' dtype, any stride, or None.
- ``activation``: a canonical name from ``ref.CANONICAL_ACTIVATIONS`` ("relu", "gelu",
  "gelu_tanh", "silu", "identity"); the op resolves AdapterHub's aliases before calling.
- ``scaling``: a Python float, or a 0-d fp32 tensor on h's device (AdapterHub's learned
  scaling), read on the device (no host sync; CUDA-graph safe).
- ``dropout_p`` in ``[0, 1)``; ``seed`` a 1-element int64 tensor on h's device, read only when
  ``dropout_p > 0`` (it may be empty otherwise). The keep-mask is
  ``fastpeft.kernels.dropout_mask.keep_mask_philox(seed, M, D, dropout_p)`` (Philox counters of
  element ``(m, d)``), regenerated in the backward, never stored.
- Arithmetic: fp32 accumulation; ``z``, ``act(z)`` and the products' sums are fp32; every
  product of two 16-bit values is exact; ``out = residual + scaling * u`` is formed in fp32
  and rounded once to h's dtype. Here ``act(z)`` and ``dz`` meet the weights in fp32 (tf32
  tensor cores on a GPU); the CUDA C++ kernels round fp32 weights, ``act(z)`` and ``dz`` to a
  16-bit h's dtype for their tensor-core products (``cuda_launch``), a difference within
  the 16-bit tolerances.
- Outputs are fresh contiguous tensors; launches run on h's device (not torch's current one);
  no atomics, so results are bitwise reproducible run to run.
"""

from __future__ import annotations

import torch

from fastpeft.backend import interpreting
from fastpeft.kernels import launch_device
from fastpeft.kernels.bottleneck.configs import (
    DH_RANK_STEP,
    DH_TILE,
    SUM_TILE,
    ForwardPlan,
    Plan,
    RowPass,
    aligned_rows,
    cdiv,
    plan,
    plan_forward,
)
from fastpeft.kernels.bottleneck.kernels import (
    ACTIVATION_CODES,
    bottleneck_bwd_dh_kernel,
    bottleneck_bwd_dz_kernel,
    bottleneck_bwd_dz_sum_kernel,
    bottleneck_bwd_wgrad_dh_kernel,
    bottleneck_down_kernel,
    bottleneck_down_sum_kernel,
    bottleneck_up_kernel,
)
from fastpeft.kernels.launch_device import dropout_args, kernel_numerics, on_device_of
from fastpeft.kernels.lora.configs import wgrad_tile
from fastpeft.kernels.lora.launch import weight_grad


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for fp32 operands widened from h's ``dtype``: tf32 tensor
    cores on a GPU for 16-bit h (exact for 16-bit inputs), IEEE for fp32 h and in the
    interpreter."""
    return "ieee" if dtype == torch.float32 or interpreting() else "tf32"


def _scale_args(scaling: float | torch.Tensor, device: torch.device) -> tuple[torch.Tensor | None, float, bool]:
    """``(scale tensor or None, float scaling, whether the kernels read the scale from memory)``:
    a tensor scaling is read by the kernels on the device (fp32, no host sync); a float is
    passed as is."""
    if isinstance(scaling, torch.Tensor):
        return scaling.detach().to(device=device, dtype=torch.float32).reshape(1), 1.0, True
    return None, float(scaling), False


def _launchable(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t``, or on a GPU a contiguous copy when it would not launch the specialization
    ``fastpeft check`` compiles (``aligned_rows``): the weights and biases (a few KB) and dOut
    (e.g. the zero-stride gradient of ``out.sum()``). The interpreter takes any strides."""
    if t is None or t.device.type != "cuda" or aligned_rows(t):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _strides(t: torch.Tensor) -> tuple[int, int]:
    """2-D ``t``'s strides as passed to a kernel: a dimension of size 1 gets the stride of a
    contiguous tensor (its own is never used and may be anything), so such a launch (e.g. a
    one-token decode) gets the specialization ``fastpeft check`` compiles."""
    rows, cols = t.shape
    return (t.stride(0) if rows > 1 else cols, t.stride(1) if cols > 1 else 1)


def _vector_stride(t: torch.Tensor | None) -> int:
    """A bias's element stride (1 when absent, or of one element: the kernel then masks its
    loads off, or reads only element 0)."""
    return t.stride(0) if t is not None and t.shape[0] > 1 else 1


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
    """``(out [M, D] in h's dtype, z [M, R] fp32)``; ``residual`` None means h.

    ``z`` is the pre-activation ``dropout(h) W_down^T + b_down`` (dropout's ``1/(1-p)``
    included), the only activation the backward needs besides its inputs.
    """
    m, d = h.shape
    rank = w_down.shape[0]
    res = h if residual is None else residual
    w_down, b_down, w_up, b_up = (_launchable(t) for t in (w_down, b_down, w_up, b_up))
    with on_device_of(h):
        p = plan_forward(m, d, rank, h.element_size(), w_down.element_size(), h.device)
        out = launch_device.empty_output((m, d), h.dtype, h.device)
        z = launch_device.empty_output((m, rank), torch.float32, h.device)
        act = launch_device.empty_output((m, rank), torch.float32, h.device)
        _down_projection(h, w_down, b_down, activation, dropout_p, seed, z, act, p)
        scale_t, scale_f, from_ptr = _scale_args(scaling, h.device)
        up = p.up
        bottleneck_up_kernel[(cdiv(m, up.block_m), cdiv(d, up.block_d))](
            act, w_up, b_up if b_up is not None else w_up, res, scale_t if from_ptr else z, out,
            m, d, rank,
            *_strides(w_up), _vector_stride(b_up), *_strides(res),
            scale_f, int(b_up is not None), int(from_ptr),
            BLOCK_M=up.block_m, BLOCK_N=up.block_d, BLOCK_R=p.up_r, PRECISION=_precision(h.dtype),
            num_warps=up.num_warps, num_stages=up.num_stages,
        )
    return out, z


def _down_projection(
    h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None, activation: str, dropout_p: float,
    seed: torch.Tensor, z: torch.Tensor, act: torch.Tensor, p: ForwardPlan,
) -> None:
    """Fill ``z = dropout(h) W_down^T + b_down`` and ``act = act(z)`` (fp32 ``[M, R]``):
    ``bottleneck_down_kernel`` over ``p``'s row tiles, rank blocks and D-split, then, with
    several splits, ``bottleneck_down_sum_kernel`` adding the partials in split order."""
    m, d = h.shape
    rank = w_down.shape[0]
    rp = p.down
    t, split = rp.tile, rp.split
    parts = launch_device.empty_output((split.count if split.count > 1 else 0, m, rank), torch.float32, h.device)
    threshold, keep_scale = dropout_args(dropout_p)
    bd = b_down if b_down is not None else w_down
    code, has_bd = ACTIVATION_CODES[activation], int(b_down is not None)
    bottleneck_down_kernel[(cdiv(m, t.block_m) * rp.rank_blocks, split.count)](
        h, w_down, bd, seed, parts, z, act,
        m, d, rank, split.length, split.count,
        *_strides(h), *_strides(w_down), _vector_stride(b_down),
        threshold, keep_scale, code, has_bd,
        HAS_DROPOUT=dropout_p > 0.0, BLOCK_M=t.block_m, BLOCK_D=t.block_d, BLOCK_R=rp.rank_block,
        **kernel_numerics(h.dtype, w_down.dtype), num_warps=t.num_warps, num_stages=t.num_stages,
    )
    if split.count > 1:
        st = SUM_TILE
        bottleneck_down_sum_kernel[(cdiv(m, st.block_m), cdiv(rank, st.block_d))](
            parts, bd, z, act, m, rank, split.count, _vector_stride(b_down), code, has_bd,
            BLOCK_M=st.block_m, BLOCK_R=st.block_d, num_warps=st.num_warps, num_stages=st.num_stages,
        )


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
    """``(grad_h, grad_w_down, grad_b_down, grad_w_up, grad_b_up, grad_scaling)``.

    ``needs_grad``: which of ``(h, w_down, b_down, w_up, b_up, scaling)`` to compute; the
    others are None. ``z``: the forward's fp32 ``[M, R]`` output (contiguous). ``b_up`` is
    read only for ``grad_scaling`` (``sum(grad_out * (act(z) W_up^T + b_up))``).

    ``grad_h [M, D]`` in h's dtype, contiguous: ``keep/(1-p) * (dz W_down)``, plus
    ``grad_out`` when ``residual_is_h`` (a separate residual's gradient is ``grad_out``
    itself; the op returns that). ``grad_w_down [R, D]``, ``grad_b_down [R]``,
    ``grad_w_up [D, R]``, ``grad_b_up [D]`` in the weights' dtype; ``grad_scaling`` a 0-d
    fp32 tensor. Here ``dz = scaling * (grad_out W_up) * act'(z)``.
    """
    need_h, need_wd, need_bd, need_wu, need_bu, need_s = needs_grad
    grad_out, w_down, w_up = (_launchable(t) for t in (grad_out, w_down, w_up))
    m, d = h.shape
    rank = w_down.shape[0]
    w_dtype = w_down.dtype
    grad_h = grad_wd = grad_bd = grad_wu = grad_bu = grad_s = None
    with on_device_of(h):
        p = plan(m, d, rank, grad_out.element_size(), w_down.element_size(), h.device)
        scale_t, scale_f, from_ptr = _scale_args(scaling, h.device)
        scale = scale_t.reshape(()) if from_ptr else scale_f
        precision = _precision(h.dtype)
        dz, a, dbd_parts, ds_parts = _dz_pass(grad_out, w_up, z, activation, scale_t if from_ptr else z, scale_f,
                                              from_ptr, p.dz)
        if need_bd:
            grad_bd = _split_sum(dbd_parts).to(w_dtype)
        if need_s:
            grad_s = ds_parts.sum()
        need_sum_g = need_bu or (need_s and b_up is not None)
        if need_h or need_wd or need_wu or need_sum_g:
            if p.wide:
                dwu, dbu, dwd, grad_h = _wide_pass(grad_out, h, w_down, a, dz, seed, dropout_p, residual_is_h, p,
                                                   precision, (need_wu, need_sum_g, need_wd, need_h))
            else:
                dwu, dbu, dwd, grad_h = _column_pass(grad_out, h, w_down, a, dz, seed, dropout_p, residual_is_h,
                                                     need_h, p, precision)
            _, keep_scale = dropout_args(dropout_p)
            grad_wd = (dwd * keep_scale).to(w_dtype) if need_wd else None
            grad_wu = (dwu * scale).to(w_dtype) if need_wu else None
            grad_bu = (dbu * scale).to(w_dtype) if need_bu else None
            if need_s and b_up is not None:
                grad_s = grad_s + dbu @ b_up.to(torch.float32)
    return grad_h, grad_wd, grad_bd, grad_wu, grad_bu, grad_s


def _dz_pass(
    grad_out: torch.Tensor, w_up: torch.Tensor, z: torch.Tensor, activation: str, scale_ptr: torch.Tensor,
    scaling: float, scale_in_memory: bool, rp: RowPass,
) -> tuple[torch.Tensor, ...]:
    """``(dz, act(z), dbd partials [row tiles, R], ds partials)``, fp32: ``dz = s (g W_up)
    act'(z)`` by ``bottleneck_bwd_dz_kernel`` over ``rp``'s row tiles, rank blocks and D-split,
    then, with several splits, ``bottleneck_bwd_dz_sum_kernel`` (whose grid the partial sums
    follow)."""
    m, d = grad_out.shape
    rank = w_up.shape[1]
    t, split = rp.tile, rp.split
    dev = grad_out.device
    row_tiles = cdiv(m, t.block_m)
    grid = (row_tiles * rp.rank_blocks, split.count)
    sum_grid = (cdiv(m, SUM_TILE.block_m), cdiv(rank, SUM_TILE.block_d)) if split.count > 1 else None
    # The programs that finish dz (the sum kernel's, or the dz kernel's with one split) store
    # a row of dbd partials per row tile and one ds partial each.
    finishers = sum_grid or (row_tiles, rp.rank_blocks)
    parts = launch_device.empty_output((split.count if split.count > 1 else 0, m, rank), torch.float32, dev)
    dz = launch_device.empty_output((m, rank), torch.float32, dev)
    a = launch_device.empty_output((m, rank), torch.float32, dev)
    dbd_parts = launch_device.empty_output((finishers[0], rank), torch.float32, dev)
    ds_parts = launch_device.empty_output((finishers[0] * finishers[1],), torch.float32, dev)
    code = ACTIVATION_CODES[activation]
    bottleneck_bwd_dz_kernel[grid](
        grad_out, w_up, z, scale_ptr, parts, dz, a, dbd_parts, ds_parts,
        m, d, rank, split.length, split.count,
        *_strides(grad_out), *_strides(w_up),
        scaling, code, int(scale_in_memory),
        BLOCK_M=t.block_m, BLOCK_D=t.block_d, BLOCK_R=rp.rank_block,
        **kernel_numerics(grad_out.dtype, w_up.dtype), num_warps=t.num_warps, num_stages=t.num_stages,
    )
    if sum_grid is not None:
        bottleneck_bwd_dz_sum_kernel[sum_grid](
            parts, z, scale_ptr, dz, a, dbd_parts, ds_parts, m, rank, split.count, scaling, code, int(scale_in_memory),
            BLOCK_M=SUM_TILE.block_m, BLOCK_R=SUM_TILE.block_d, num_warps=SUM_TILE.num_warps,
            num_stages=SUM_TILE.num_stages,
        )
    return dz, a, dbd_parts, ds_parts


def _column_pass(
    grad_out: torch.Tensor, h: torch.Tensor, w_down: torch.Tensor, a: torch.Tensor, dz: torch.Tensor,
    seed: torch.Tensor, dropout_p: float, residual_is_h: bool, need_h: bool, p: Plan, precision: str,
) -> tuple[torch.Tensor | None, ...]:
    """``(g^T a [D, R], sum_m g [D], dz^T h_hat [R, D] without 1/(1-p), dh [M, D] or None)``:
    fp32 sums of the per-split partials, added in split order (torch's reduction over the
    first dimension: no atomics), and dh in h's dtype when ``need_h``
    (``bottleneck_bwd_wgrad_dh_kernel``)."""
    m, d = h.shape
    rank = w_down.shape[0]
    t = p.columns
    dev = h.device
    dwu_parts = launch_device.empty_output((p.rows.count, d, rank), torch.float32, dev)
    dbu_parts = launch_device.empty_output((p.rows.count, d), torch.float32, dev)
    dwd_parts = launch_device.empty_output((p.rows.count, rank, d), torch.float32, dev)
    dh = launch_device.empty_output((m, d) if need_h else (0,), h.dtype, dev)
    threshold, keep_scale = dropout_args(dropout_p)
    bottleneck_bwd_wgrad_dh_kernel[(cdiv(d, t.block_d), p.rows.count)](
        grad_out, h, w_down, a, dz, seed, dh, dwu_parts, dbu_parts, dwd_parts,
        m, d, rank, p.rows.length,
        *_strides(grad_out), *_strides(h), *_strides(w_down),
        threshold, keep_scale, int(residual_is_h),
        HAS_DROPOUT=dropout_p > 0.0, NEED_DH=need_h,
        BLOCK_M=t.block_m, BLOCK_D=t.block_d, BLOCK_R=p.column_r, PRECISION=precision,
        num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return _split_sum(dwu_parts), _split_sum(dbu_parts), _split_sum(dwd_parts), dh if need_h else None


def _wide_pass(
    grad_out: torch.Tensor, h: torch.Tensor, w_down: torch.Tensor, a: torch.Tensor, dz: torch.Tensor,
    seed: torch.Tensor, dropout_p: float, residual_is_h: bool, p: Plan, precision: str,
    needs: tuple[bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """``_column_pass``'s four results for a bottleneck wider than ``COLUMN_MAX_RANK``, each
    only where ``needs`` (g^T a, sum_m g, dz^T h_hat, dh) asks (else None): the weight
    gradients as GEMMs over ``p.rows``'s row ranges in blocks of ``p.column_r`` ranks
    (``lora_launch.weight_grad``: partials summed in split order), ``sum_m g`` as torch's
    column sum (no atomics), dh from ``bottleneck_bwd_dh_kernel``."""
    need_wu, need_sum_g, need_wd, need_h = needs
    tile, f32 = wgrad_tile(), torch.float32
    dwu = weight_grad(a, grad_out, seed, 1.0, 0.0, tile, p.rows, True, f32, p.column_r) if need_wu else None
    dwd = weight_grad(dz, h, seed, 1.0, dropout_p, tile, p.rows, False, f32, p.column_r) if need_wd else None
    dbu = grad_out.sum(0, dtype=f32) if need_sum_g else None
    dh = _dh_pass(grad_out, w_down, dz, seed, dropout_p, residual_is_h, h.dtype, precision) if need_h else None
    return dwu, dbu, dwd, dh


def _dh_pass(
    grad_out: torch.Tensor, w_down: torch.Tensor, dz: torch.Tensor, seed: torch.Tensor, dropout_p: float,
    residual_is_h: bool, dtype: torch.dtype, precision: str,
) -> torch.Tensor:
    """``dh [M, D]`` in ``dtype`` (``bottleneck_bwd_dh_kernel`` on DH_TILE): ``keep/(1-p) *
    (dz W_down)``, plus ``grad_out`` when ``residual_is_h``."""
    m, d = grad_out.shape
    dh = launch_device.empty_output((m, d), dtype, grad_out.device)
    threshold, keep_scale = dropout_args(dropout_p)
    bottleneck_bwd_dh_kernel[(cdiv(m, DH_TILE.block_m), cdiv(d, DH_TILE.block_d))](
        grad_out, w_down, dz, seed, dh,
        m, d, w_down.shape[0],
        *_strides(grad_out), *_strides(w_down),
        threshold, keep_scale, int(residual_is_h),
        HAS_DROPOUT=dropout_p > 0.0,
        BLOCK_M=DH_TILE.block_m, BLOCK_D=DH_TILE.block_d, BLOCK_R=DH_RANK_STEP, PRECISION=precision,
        num_warps=DH_TILE.num_warps, num_stages=DH_TILE.num_stages,
    )
    return dh


def _split_sum(parts: torch.Tensor) -> torch.Tensor:
    """The sum over the first dimension of fp32 per-split partials, in split order (torch's
    reduction: no atomics); one split is its own sum (no copy: at decode the weight
    gradients' partials are the largest tensors of the backward)."""
    return parts[0] if parts.shape[0] == 1 else parts.sum(0)
