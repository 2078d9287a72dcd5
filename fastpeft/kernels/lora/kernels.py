"""Triton kernels of the fused LoRA linear op (forward and backward).

Notation: x ``[M, K]``, W ``[N, K]``, A ``[R, K]``, B ``[N, R]``, dropout keep-mask ``D``
with kept values scaled by ``1/(1-p)``, ``x_hat = D * x / (1-p)``, ``s = x_hat A^T [M, R]``.

Forward   ``y = x W^T + bias + scaling * s B^T``
Backward  ``dS = scaling * dY B``, ``dB = scaling * dY^T s``, ``dA = dS^T x_hat``,
          ``dX = dY W + D * (dS A) / (1-p)``

Kernels (the launchers in ``fastpeft.kernels.lora.launch`` choose among them):
- ``lora_shrink_kernel``: partial sums of ``P_hat A^T`` over a range of P's columns, dropout
  applied on the fly (mask drawn once per element): ``s`` in the forward (P = x, split over
  K) when dropout is on or re-computing ``s`` per output tile would cost more than one
  extra pass over x; ``dS`` in the backward (P = dY, A = B^T, split over N).
- ``lora_fwd_kernel``: the base GEMM with the LoRA term in its epilogue; with
  ``FUSE_SHRINK`` it also computes ``s`` inside its K-loop from the x tiles it already has
  (x read once); otherwise it sums the shrink kernel's partials. The programs of the first
  column tile write ``s`` (fp32) for the backward.
- ``lora_fwd_tma_kernel`` (sm_90, opt-in: ``FASTPEFT_LORA_TMA=1``, or a dispatch table written
  from a GPU run where it won, ``fused-tma``; not yet run on a GPU): the
  non-fused ``lora_fwd_kernel`` with its x and W tiles loaded through TMA tensor descriptors
  and a persistent grid (one program per SM looping over the output tiles).
- ``lora_bwd_dx_kernel``: ``dX = dY W`` with the LoRA term and dropout in its epilogue.
- ``lora_gemm_split_kernel``: split-K for either GEMM when its output tiles leave SMs idle:
  fp32 partial products over a range of the reduction; ``lora_fwd_split_epilogue_kernel`` /
  ``lora_bwd_dx_split_epilogue_kernel`` sum them and apply the forward / dX epilogue.
- ``lora_bwd_wgrad_kernel``: ``dA`` from one pass over x (the mask regenerated) and ``dB``
  from one pass over dY; a program keeps its ``[R, 128]`` sum in registers over a range of
  rows. (Fusing dA into the dX epilogue kept the x tile, the mask and two accumulators
  live at once: register spills on every tile worth using. dB used to share a pass over dY
  with dS, but the two reduce over different dimensions, so one of them was summed with an
  fp32 atomic per element of dY at rank 64; a second read of dY is cheaper.)
- ``sum_partials_kernel``: adds fp32 partials (dS, dA, dB) into the output dtype.

No kernel uses atomics: every split reduction writes fp32 partials that a later program sums
in a fixed order (``tile_utils.sum_partials``), so results are bitwise reproducible
(``torch.use_deterministic_algorithms(True)`` holds with no other mode) and the compiled code
has no memory fences (``fastpeft check`` fails on GPU-scope ones).

Precision: the base GEMMs run in the activation dtype with fp32 accumulation. The rank-r
products inside them (``x A^T`` fused, ``s B^T``, ``dS A``) run in the LoRA weights' dtype
(``tile_utils.rank_dot``): fp32 adapters keep them in fp32 (tf32 tensor cores), as PEFT's
fp32 branch does. The separate rank-r passes (shrink, dS, dA, dB) are bandwidth-bound and
always take fp32 operands (tf32): free there, and neither ``s * scaling`` nor ``dS`` is
ever rounded to 16 bits in them. ``s`` and ``dS`` are stored in fp32.

``lora_fwd_kernel`` and ``lora_bwd_dx_kernel`` share the GEMM main loop (``_gemm_mainloop``):
the backward runs it on ``W`` with its strides swapped (reduction over N instead of K).
Rows past M are handled by wrapping row indices (loads stay in bounds, stores are masked)
wherever duplicated rows cannot leak into a reduction over M; the reductions over M mask
them to zero instead.

Launch-time specialization: Triton compiles one variant per class of each integer argument
(1, multiple of 16, other) and pointer (16-byte aligned or not). Arguments whose values are
arbitrary (M, the rank R, split and partial counts, the dropout threshold, strides equal to
R) are exempt (``do_not_specialize``), so one variant covers every value and that is the one
``fastpeft check`` compiles; the others (K, N, row strides, pointers) are aligned in every
launch the planners admit (``fastpeft.kernels.lora.configs.kernel_friendly``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastpeft.kernels.philox_dropout import keep_mask
from fastpeft.kernels.shrink_tile import shrink_rows
from fastpeft.kernels.tile_utils import grouped_tile, output_tile, rank_dot, sum_partials, to_compute


@triton.jit
def _gemm_mainloop(
    acc, p_ptr, q_ptr, a_ptr, offs_m, m_rows, offs_n, red_start, red_end,
    stride_pm, stride_pr, stride_qn, stride_qr, stride_ar, stride_ak,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_RED: tl.constexpr, BLOCK_R: tl.constexpr,
    R, FUSE_SHRINK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """``acc + P Q^T`` (``acc`` fp32 ``[BLOCK_M, BLOCK_N]``) for rows ``offs_m`` of P
    ``[m_rows, RED]`` and rows ``offs_n`` of Q ``[*, RED]``, over the reduction range
    ``[red_start, red_end)``. Rows of P past ``m_rows``
    are masked (they load nothing and give zero rows), not wrapped onto real rows: at M = 1 a
    16-row tile would otherwise load its one row 16 times.

    With ``FUSE_SHRINK`` it also returns ``s_acc = P A^T`` (A ``[R, RED]``, in A's dtype)
    from the same P tiles; otherwise ``s_acc`` is a zero placeholder.
    """
    # 64-bit: a split's start times a row stride exceeds i32 once the operand has 2**31
    # elements (dX's split-K reads W^T, whose reduction stride is W's row stride K).
    offs_red = tl.arange(0, BLOCK_RED)
    red = (red_start + offs_red).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < m_rows
    p_ptrs = p_ptr + offs_m.to(tl.int64)[:, None] * stride_pm + red[None, :] * stride_pr
    q_ptrs = q_ptr + offs_n.to(tl.int64)[None, :] * stride_qn + red[:, None] * stride_qr
    a_ptrs = a_ptr + offs_r[None, :] * stride_ar + red[:, None] * stride_ak
    s_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for red0 in range(red_start, red_end, BLOCK_RED):
        red_ok = offs_red < red_end - red0
        p = to_compute(tl.load(p_ptrs, mask=m_ok[:, None] & red_ok[None, :], other=0.0), p_ptr, UPCAST)
        q = to_compute(tl.load(q_ptrs, mask=red_ok[:, None], other=0.0), p_ptr, UPCAST)
        acc = tl.dot(p, q, acc, input_precision=PRECISION)
        if FUSE_SHRINK:
            a = tl.load(a_ptrs, mask=red_ok[:, None] & (offs_r[None, :] < R), other=0.0)
            s_acc = rank_dot(p, a, s_acc, a_ptr, UPCAST, PRECISION)
            a_ptrs += BLOCK_RED * stride_ak
        p_ptrs += BLOCK_RED * stride_pr
        q_ptrs += BLOCK_RED * stride_qr
    return acc, s_acc


@triton.jit(do_not_specialize=("M", "R", "threshold"))
def lora_shrink_kernel(
    x_ptr, a_ptr, part_ptr, seed_ptr,
    M, K, R, k_per_split,
    stride_xm, stride_xk, stride_ar, stride_ak,
    scale, threshold,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    """``part[split, m, :R] = scale * sum over this split's K range of x_hat[m, k] A[:, k]``.

    Grid ``(cdiv(M, BLOCK_M), splits)``; part is fp32 ``[splits, M, R]`` and its consumers
    sum the splits in a fixed order. The loop is ``shrink_tile.shrink_rows`` (shared with the
    hybrid forward): operands widened to fp32; ``scale`` (1/(1-p), or the LoRA scaling for
    dS) multiplies the fp32 sum here.
    """
    pid_k = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    k_start = pid_k * k_per_split
    s_acc = shrink_rows(
        x_ptr, a_ptr, seed_ptr, offs_m, m_ok, k_start, tl.minimum(k_start + k_per_split, K), K, R,
        stride_xm, stride_xk, stride_ar, stride_ak, threshold,
        HAS_DROPOUT, BLOCK_M, BLOCK_K, BLOCK_R, True, PRECISION,  # fp32 operands (a bandwidth-bound pass)
    )
    part_ptrs = part_ptr + (pid_k.to(tl.int64) * M + offs_m)[:, None] * R + offs_r[None, :]
    tl.store(part_ptrs, s_acc * scale, mask=m_ok[:, None] & (offs_r < R)[None, :])


@triton.jit
def _rank_partials(acc, part_ptr, rows, M, R, num_parts, BLOCK_R: tl.constexpr):
    """``acc`` plus rows ``rows`` of the ``num_parts`` fp32 partials ``[num_parts, M, R]`` of
    ``lora_shrink_kernel`` (zero past R)."""
    offs_r = tl.arange(0, BLOCK_R)
    ptrs = part_ptr + (rows % M).to(tl.int64)[:, None] * R + offs_r[None, :]
    return sum_partials(acc, ptrs, (offs_r < R)[None, :], num_parts, M.to(tl.int64) * R)


@triton.jit
def _store_s(s_acc, rows, pid_n, s_ptr, M, R, BLOCK_R: tl.constexpr):
    """Store the fp32 ``s`` tile (rows ``rows``) from the programs of the first column tile."""
    offs_r = tl.arange(0, BLOCK_R)
    if pid_n == 0:
        s_ptrs = s_ptr + rows.to(tl.int64)[:, None] * R + offs_r[None, :]
        tl.store(s_ptrs, s_acc, mask=(rows < M)[:, None] & (offs_r[None, :] < R))


@triton.jit
def _add_lora_term(
    acc, s_acc, cols, b_ptr, N, R, stride_bn, stride_br, scaling,
    BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """``acc + scaling * s B^T`` (in B's dtype) for the output columns ``cols``."""
    offs_r = tl.arange(0, BLOCK_R)
    b_ptrs = b_ptr + offs_r[:, None] * stride_br + (cols % N)[None, :] * stride_bn
    b = tl.load(b_ptrs, mask=offs_r[:, None] < R, other=0.0)
    return rank_dot(s_acc * scaling, b, acc, b_ptr, UPCAST, PRECISION)


@triton.jit
def _store_y(acc, rows, cols, bias_ptr, scale_ptr, u_ptr, y_ptr, M, N, HAS_BIAS: tl.constexpr,
             HAS_SCALE: tl.constexpr):
    """Add the bias to the fp32 tile ``acc`` and store it as ``y``'s tile at ``rows, cols``.
    ``HAS_SCALE`` (DoRA: ``y = c * (x W^T + s x A^T B^T) + b``): first store ``acc`` as ``u``'s
    tile (what DoRA's backward reads) and multiply it by the fp32 ``scale [N]`` per column."""
    col_ok = cols < N
    offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
    mask = (rows < M)[:, None] & col_ok[None, :]
    if HAS_SCALE:
        tl.store(u_ptr + offsets, acc.to(u_ptr.dtype.element_ty), mask=mask)
        acc = acc * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offsets, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_epilogue(
    acc, s_acc, rows, cols, pid_n, bias_ptr, b_ptr, s_ptr, y_ptr, scale_ptr, u_ptr,
    M, N, R, stride_bn, stride_br, scaling,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Finish a forward tile: store ``s`` (first column tile only), add
    ``scaling * s B^T`` (in B's dtype) to ``acc``, then (``_store_y``) DoRA's scale and the
    bias, store ``y``."""
    _store_s(s_acc, rows, pid_n, s_ptr, M, R, BLOCK_R)
    acc = _add_lora_term(acc, s_acc, cols, b_ptr, N, R, stride_bn, stride_br, scaling, BLOCK_R, UPCAST, PRECISION)
    _store_y(acc, rows, cols, bias_ptr, scale_ptr, u_ptr, y_ptr, M, N, HAS_BIAS, HAS_SCALE)


@triton.jit(do_not_specialize=("M", "R", "num_parts", "stride_bn"))
def lora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, part_ptr, s_ptr, y_ptr, scale_ptr, u_ptr,
    M, N, K, R, num_parts,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    scaling,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, FUSE_SHRINK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """``y[M, N] = x W^T + bias + scaling * s B^T``; also writes ``s [M, R]`` (fp32). With
    ``HAS_SCALE`` (DoRA) ``y = scale * (x W^T + scaling * s B^T) + bias`` and the unscaled sum
    is written to ``u [M, N]`` (``_store_y``).

    Grid ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),)``. Without ``FUSE_SHRINK``, ``s`` is the
    sum of ``num_parts`` shrink partials ``part [num_parts, M, R]``.
    """
    rows, cols, pid_n = output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc, s_acc = _gemm_mainloop(
        tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
        x_ptr, w_ptr, a_ptr, rows, M, cols % N, 0, K,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
        BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, R, FUSE_SHRINK, UPCAST, PRECISION,
    )
    if not FUSE_SHRINK:
        s_acc = _rank_partials(s_acc, part_ptr, rows, M, R, num_parts, BLOCK_R)
    _fwd_epilogue(
        acc, s_acc, rows, cols, pid_n, bias_ptr, b_ptr, s_ptr, y_ptr, scale_ptr, u_ptr, M, N, R, stride_bn,
        stride_br, scaling, HAS_BIAS, HAS_SCALE, BLOCK_R, UPCAST, PRECISION,
    )


@triton.jit(do_not_specialize=("M", "R", "num_parts", "num_programs", "stride_bn"))
def lora_fwd_tma_kernel(
    x_desc, w_desc, bias_ptr, b_ptr, part_ptr, s_ptr, y_ptr, scale_ptr, u_ptr,
    M, N, K, R, num_parts, num_programs,
    stride_bn, stride_br,
    scaling,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """``lora_fwd_kernel`` without ``FUSE_SHRINK`` (``s`` the sum of ``num_parts`` shrink
    partials), its x and W tiles loaded through TMA, on a persistent grid (sm_90 opt-in).

    ``x_desc`` / ``w_desc``: host-side tensor descriptors of x ``[M, K]`` (block
    ``[BLOCK_M, BLOCK_K]``) and W ``[N, K]`` (block ``[BLOCK_N, BLOCK_K]``); TMA fills rows
    and columns past the edges with zeros, so the main loop has no masks and no index math.
    Grid ``(num_programs,)``, at most one program per output tile: program ``p`` takes tile
    numbers ``p, p + num_programs, ...`` in ``grouped_tile``'s order (the same tile -> program
    map on every run, each tile owned by one program, no atomics). Why: one program per SM
    stays resident for the whole GEMM (no CTA launch and set-up per tile), and the grouped
    order keeps the concurrently running tiles on the same W columns in L2. Not overlapped:
    each tile's K-loop pipeline fills after the previous tile's stores (that would take a
    flattened loop or warp specialization, left until a GPU can time them). Bytes are those of
    ``lora_fwd_kernel``'s non-fused case: x once per column tile, W once per row tile (through
    L2), the partials, B and the bias per tile. Its pieces are ``_fwd_epilogue``'s, with the
    LoRA term moved before the main loop (so y's rounding order differs from
    ``lora_fwd_kernel``'s; ``s`` is the same sum, bitwise).
    """
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), num_tiles, num_programs):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # The LoRA term first, as the main loop's starting accumulator (as dX's masked term):
        # s and B are dead before the loop instead of live beside the finished accumulator
        # (at rank 64 that epilogue spills 76-324 B at 255 registers, fastpeft check).
        s_acc = _rank_partials(tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), part_ptr, rows, M, R, num_parts,
                               BLOCK_R)
        _store_s(s_acc, rows, pid_n, s_ptr, M, R, BLOCK_R)
        acc = _add_lora_term(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), s_acc, cols, b_ptr, N, R,
                             stride_bn, stride_br, scaling, BLOCK_R, UPCAST, PRECISION)
        for k0 in range(0, K, BLOCK_K):
            x = to_compute(x_desc.load([pid_m * BLOCK_M, k0]), y_ptr, UPCAST)
            w = to_compute(w_desc.load([pid_n * BLOCK_N, k0]), y_ptr, UPCAST)
            acc = tl.dot(x, w.T, acc, input_precision=PRECISION)
        _store_y(acc, rows, cols, bias_ptr, scale_ptr, u_ptr, y_ptr, M, N, HAS_BIAS, HAS_SCALE)


@triton.jit(do_not_specialize=("M",))
def lora_gemm_split_kernel(
    p_ptr, q_ptr, part_ptr,
    M, N, RED, red_per_split,
    stride_pm, stride_pr, stride_qn, stride_qr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_RED: tl.constexpr,
    GROUP_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """``part[split, :M, :N] = P Q^T`` (fp32) over this split's range of the reduction:
    split-K of the forward GEMM (P = x, Q = W) or of dX's (P = dY, Q = W^T: W's strides
    swapped).

    Grid ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), splits)``.
    """
    rows, cols, _ = output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    red_start = split * red_per_split
    red_end = tl.minimum(red_start + red_per_split, RED)
    acc, _ = _gemm_mainloop(
        tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), p_ptr, q_ptr, p_ptr, rows, M, cols % N, red_start, red_end,
        stride_pm, stride_pr, stride_qn, stride_qr, 0, 0,
        BLOCK_M, BLOCK_N, BLOCK_RED, 16, 0, False, UPCAST, PRECISION,
    )
    part_ptrs = part_ptr + (split.to(tl.int64) * M + rows)[:, None] * N + cols[None, :]
    tl.store(part_ptrs, acc, mask=(rows < M)[:, None] & (cols < N)[None, :])


@triton.jit
def _split_sum(gemm_part_ptr, rows, cols, M, N, num_splits, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The ``[BLOCK_M, BLOCK_N]`` tile at ``rows, cols`` of the sum of ``num_splits`` fp32
    partials ``[num_splits, M, N]`` of ``lora_gemm_split_kernel``."""
    ptrs = gemm_part_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return sum_partials(acc, ptrs, mask, num_splits, M.to(tl.int64) * N)


@triton.jit(do_not_specialize=("M", "R", "num_splits", "num_parts", "stride_bn"))
def lora_fwd_split_epilogue_kernel(
    gemm_part_ptr, bias_ptr, b_ptr, part_ptr, s_ptr, y_ptr, scale_ptr, u_ptr,
    M, N, R, num_splits, num_parts,
    stride_bn, stride_br,
    scaling,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """The forward's epilogue after a split-K GEMM: ``y`` from the sum of the GEMM's
    ``num_splits`` partials and of the shrink's ``num_parts`` partials (``s``, also stored).

    Grid ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),)``.
    """
    rows, cols, pid_n = output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _split_sum(gemm_part_ptr, rows, cols, M, N, num_splits, BLOCK_M, BLOCK_N)
    s_acc = _rank_partials(tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), part_ptr, rows, M, R, num_parts, BLOCK_R)
    _fwd_epilogue(
        acc, s_acc, rows, cols, pid_n, bias_ptr, b_ptr, s_ptr, y_ptr, scale_ptr, u_ptr, M, N, R, stride_bn,
        stride_br, scaling, HAS_BIAS, HAS_SCALE, BLOCK_R, UPCAST, PRECISION,
    )


@triton.jit
def _ds_tile(ds_ptr, rows, row_ok, offs_r, R, dtype_ref_ptr, UPCAST: tl.constexpr):
    """Rows ``rows`` of the fp32 ``dS [M, R]`` (zero past M and R), in the compute dtype."""
    ds = tl.load(ds_ptr + rows.to(tl.int64)[:, None] * R + offs_r[None, :],
                 mask=row_ok[:, None] & (offs_r[None, :] < R), other=0.0)
    return to_compute(ds, dtype_ref_ptr, UPCAST)


@triton.jit
def _dx_lora_term(
    acc, rows, cols, pid_k, a_ptr, ds_ptr, seed_ptr, M, K, R, stride_ar, stride_ak, threshold, keep_scale,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """``acc + D * (dS A) / (1-p)`` (the product in A's dtype) for dX's tile at ``rows,
    cols``; without dropout the LoRA product accumulates straight into ``acc``."""
    offs_r = tl.arange(0, BLOCK_R)
    ds = _ds_tile(ds_ptr, rows, rows < M, offs_r, R, a_ptr, UPCAST)
    a = tl.load(a_ptr + offs_r[:, None] * stride_ar + cols[None, :] * stride_ak,
                mask=(offs_r[:, None] < R) & (cols < K)[None, :], other=0.0)
    if HAS_DROPOUT:
        keep = keep_mask(tl.load(seed_ptr), rows, pid_k * BLOCK_K, K, threshold, BLOCK_M, BLOCK_K)
        acc += tl.where(keep, rank_dot(ds, a, None, a_ptr, UPCAST, PRECISION) * keep_scale, 0.0)
    else:
        acc = rank_dot(ds, a, acc, a_ptr, UPCAST, PRECISION)
    return acc


@triton.jit
def _store_dx(acc, rows, cols, dx_ptr, M, K):
    """Store dX's fp32 tile ``acc`` at ``rows, cols``, rounded to dX's dtype."""
    dx_ptrs = dx_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < K)[None, :])


@triton.jit(do_not_specialize=("M", "R", "threshold"))
def lora_bwd_dx_kernel(
    dy_ptr, w_ptr, a_ptr, ds_ptr, seed_ptr, dx_ptr,
    M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak,
    threshold, keep_scale,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """``dX[M, K] = dY W + D * (dS A) / (1-p)``: one GEMM with the LoRA term in its epilogue.

    Grid ``(cdiv(M, BLOCK_M) * cdiv(K, BLOCK_K),)``. ``dS`` is fp32 ``[M, R]``, already
    scaled by ``scaling``.
    """
    rows, cols, pid_k = output_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if HAS_DROPOUT:
        # The masked LoRA term first, as the main loop's starting accumulator: the mask's
        # Philox state and the separate product are dead before the loop starts, instead of
        # live beside the finished accumulator in an epilogue (which spills 128 x 256 tiles).
        acc = _dx_lora_term(acc, rows, cols, pid_k, a_ptr, ds_ptr, seed_ptr, M, K, R, stride_ar, stride_ak,
                            threshold, keep_scale, HAS_DROPOUT, BLOCK_M, BLOCK_K, BLOCK_R, UPCAST, PRECISION)
    # dY W: P = dY [M, N], Q = W^T viewed as [K, N] (W's strides swapped).
    acc, _ = _gemm_mainloop(
        acc, dy_ptr, w_ptr, a_ptr, rows, M, cols % K, 0, N,
        stride_dym, stride_dyn, stride_wk, stride_wn, stride_ar, stride_ak,
        BLOCK_M, BLOCK_K, BLOCK_N, BLOCK_R, R, False, UPCAST, PRECISION,
    )
    if not HAS_DROPOUT:
        acc = _dx_lora_term(acc, rows, cols, pid_k, a_ptr, ds_ptr, seed_ptr, M, K, R, stride_ar, stride_ak,
                            threshold, keep_scale, HAS_DROPOUT, BLOCK_M, BLOCK_K, BLOCK_R, UPCAST, PRECISION)
    _store_dx(acc, rows, cols, dx_ptr, M, K)


@triton.jit(do_not_specialize=("M", "R", "num_splits", "threshold"))
def lora_bwd_dx_split_epilogue_kernel(
    gemm_part_ptr, a_ptr, ds_ptr, seed_ptr, dx_ptr,
    M, K, R, num_splits,
    stride_ar, stride_ak,
    threshold, keep_scale,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dX's epilogue after a split-K GEMM: ``dX`` from the sum of the ``num_splits`` partials
    of ``dY W`` plus the LoRA term. Grid ``(cdiv(M, BLOCK_M) * cdiv(K, BLOCK_K),)``."""
    rows, cols, pid_k = output_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    acc = _split_sum(gemm_part_ptr, rows, cols, M, K, num_splits, BLOCK_M, BLOCK_K)
    acc = _dx_lora_term(acc, rows, cols, pid_k, a_ptr, ds_ptr, seed_ptr, M, K, R, stride_ar, stride_ak, threshold,
                        keep_scale, HAS_DROPOUT, BLOCK_M, BLOCK_K, BLOCK_R, UPCAST, PRECISION)
    _store_dx(acc, rows, cols, dx_ptr, M, K)


@triton.jit(do_not_specialize=("M", "R", "stride_lm", "stride_or", "stride_oc", "threshold"))
def lora_bwd_wgrad_kernel(
    l_ptr, x_ptr, seed_ptr, part_ptr,
    M, C, R, rows_per_split,
    stride_lm, stride_xm, stride_xc, stride_or, stride_oc,
    scale, threshold,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``part[split] = scale * L^T X_hat`` summed over this split's rows: an fp32 ``[R, C]``
    stored with strides ``(stride_or, stride_oc)``, partials ``R * C`` elements apart.

    ``L`` is fp32 ``[M, R]`` (unit column stride), ``X`` ``[M, C]``, ``X_hat`` X with the
    dropout mask when ``HAS_DROPOUT``. dA: ``L = dS``, ``X = x``, ``scale = 1/(1-p)``,
    partials ``[splits, R, K]``; dB: ``L = s``, ``X = dY``, ``scale = scaling``, partials
    ``[splits, N, R]`` (transposed strides). The bottleneck adapter's wide backward
    (``fastpeft.kernels.bottleneck.launch``) runs the same products: ``dW_down`` (``L = dz``,
    ``X = h``, the mask of h) and ``dW_up`` (``L = act(z)``, ``X = dOut``).
    Grid ``(cdiv(R, BLOCK_R) * cdiv(C, BLOCK_C), splits)``: a program owns ``BLOCK_R`` ranks
    (LoRA's one block covers its rank) of ``BLOCK_C`` columns, the rank blocks of a column
    tile consecutive programs (they read the same X tiles together, so X comes from DRAM
    once), and walks its ``rows_per_split`` rows ``BLOCK_M`` at a time, the sum in registers.
    """
    rank_blocks = tl.cdiv(R, BLOCK_R)
    pid_c = tl.program_id(0) // rank_blocks
    split = tl.program_id(1)
    c0 = pid_c * BLOCK_C
    cols = c0 + tl.arange(0, BLOCK_C)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = (tl.program_id(0) % rank_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    col_ok = cols < C
    r_ok = offs_r < R
    m_start = split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + offs_m
        row_ok = rows < m_end
        lt = tl.load(l_ptr + rows.to(tl.int64)[:, None] * stride_lm + offs_r[None, :],
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :] * stride_xc,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            # Exact masking; the 1/(1-p) scale goes on the fp32 sum.
            x = tl.where(keep_mask(seed, rows, c0, C, threshold, BLOCK_M, BLOCK_C), x, 0.0)
        acc = tl.dot(tl.trans(lt), x, acc, input_precision=PRECISION)
    part_ptrs = part_ptr + split.to(tl.int64) * R * C + offs_r[:, None] * stride_or + cols[None, :] * stride_oc
    tl.store(part_ptrs, acc * scale, mask=r_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=("numel", "num_parts"))
def sum_partials_kernel(part_ptr, total_ptr, numel, num_parts, BLOCK: tl.constexpr):
    """``total[i] = sum over p of part[p, i]`` in order of p, for fp32 ``part [num_parts,
    numel]``, rounded once to total's dtype. Grid ``(cdiv(numel, BLOCK),)``."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    acc = sum_partials(tl.zeros((BLOCK,), dtype=tl.float32), part_ptr + offs, ok, num_parts, numel)
    tl.store(total_ptr + offs, acc.to(total_ptr.dtype.element_ty), mask=ok)
