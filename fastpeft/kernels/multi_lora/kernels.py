"""Triton kernels of the multi-adapter LoRA linear op (many adapters, one batch).

Notation: tokens x ``[T, K]``, adapter slots A ``[L, R_MAX, K]``, B ``[L, N, R_MAX]``,
``scalings [L]``, ``ranks [L]``, one adapter id per token (``-1`` or any id outside
``[0, L)``: no adapter). Adapter ``i`` uses the first ``r_i = clamp(ranks[i], 0, R_MAX)``
rows of ``A_i`` and columns of ``B_i``; the rest of the slot is never read.

Forward   ``y[t] += s_i x[t] A_i^T B_i^T`` (y holds the base ``x W^T + b`` from cuBLAS)
Backward  ``dS = s_i dY B_i``, ``dX += dS A_i``, ``dA_i = dS_i^T x_i``, ``dB_i = dY_i^T (s_i x_i A_i^T)``
(``x_i``, ``dY_i``: the rows of the tokens of adapter i, in token order).

Two families:

- Decode (BGMV, one row per token, its own adapter; no sorting):
  ``multi_lora_decode_shrink_kernel`` writes fp32 partials of ``s[t] = s_i x[t] A_i^T``, one
  per block of 4 ranks and split of K (a few tokens alone would leave most SMs idle), and
  ``multi_lora_decode_expand_kernel`` sums them in a fixed order and adds ``s[t] B_i^T`` into
  ``y[t]`` in place, in column blocks narrow enough to fill the GPU. Both are vector
  products (a row per token is too few for ``tl.dot``'s 16), bandwidth-bound on the
  adapters' rows, read in 16-byte vectors.
- Segments (prefill and training; SGMV-style): tokens are sorted by adapter on the device
  (``multi_lora.segments``) and cut into tiles of ``BLOCK_M`` rows that never straddle two
  adapters. ``multi_lora_shrink_kernel`` (``s`` = P A^T per tile, written in sorted order;
  in the forward, fp32 partials over splits of K when the tiles alone would leave SMs idle),
  ``multi_lora_expand_kernel`` (sums the partials in a fixed order, ``out[token] += s B^T``
  in place, the rows scattered back through the sort permutation) and
  ``multi_lora_wgrad_kernel`` (one program per adapter and output tile, looping over that
  adapter's tokens in sorted order: dA and dB without atomics, bitwise reproducible). The
  backward reuses shrink for ``dS`` (B read as ``[R, N]``) and expand for dX's term (A read
  as ``[K, R]``), through strides.

Every kernel's grid is sized from static bounds (T, L, R_MAX, N or K): programs without work
(a tile past the last segment, a rank block past ``r_i``, a token without adapter) return at
once, so nothing is read back on the host and a step can be captured in a CUDA graph. Ids
outside ``[0, L)`` never index the slots (they are masked before any address is formed);
ranks are clamped to ``[0, R_MAX]``. The rank-r loops stop at ``r_i``: a small adapter in a
large slot costs its own rank, not ``R_MAX``.

Precision: every operand is widened to fp32 after loading (exact for 16-bit values, and what
Triton's interpreter needs for bf16); ``PRECISION`` is ``"tf32"`` for 16-bit activations
(their values are exact in tf32; fp32 adapters are rounded to tf32 in the products, as the
LoRA kernels' rank-r side is) and ``"ieee"`` for fp32 activations, which reach the kernels
only in the interpreter. ``s`` and ``dS`` stay fp32 (scaling included); y is read and
written once in its own dtype.

Launch-time specialization: token counts, ranks and other arbitrary values are exempt
(``do_not_specialize``) so one compiled variant covers them (``multi_lora.specs``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _adapter_rank(ranks_ptr, adapter, R_MAX):
    """Rank of slot ``adapter`` (a valid index), clamped to ``[0, R_MAX]``."""
    rank = tl.load(ranks_ptr + adapter).to(tl.int32)
    return tl.minimum(tl.maximum(rank, 0), R_MAX)


@triton.jit
def _token_adapter(ids_ptr, t, L):
    """``(adapter, valid)`` for token ``t``: its id as int64, 0 when the id is outside ``[0, L)``
    (so no address is ever formed from an invalid id), and whether it was valid."""
    adapter = tl.load(ids_ptr + t).to(tl.int64)
    valid = (adapter >= 0) & (adapter < L)
    return tl.where(valid, adapter, 0), valid


@triton.jit
def _split_range(size, BLOCK: tl.constexpr):
    """``[start, end)`` of split ``program_id(2)`` of ``num_programs(2)`` over a reduction of
    ``size`` walked ``BLOCK`` at a time: the ``cdiv(size, BLOCK)`` steps dealt out evenly, split
    p taking steps ``[p * steps // S, (p + 1) * steps // S)`` (S <= steps: each at least one),
    so any split count S fills a grid, not only the divisors of the step count."""
    split, num_splits = tl.program_id(2), tl.num_programs(2)
    steps = tl.cdiv(size, BLOCK)
    start = (split * steps // num_splits) * BLOCK
    end = tl.minimum(((split + 1) * steps // num_splits) * BLOCK, size)
    return start, end


@triton.jit(do_not_specialize=("L", "R_MAX"))
def multi_lora_decode_shrink_kernel(
    x_ptr, a_ptr, scal_ptr, ids_ptr, ranks_ptr, s_ptr,
    K, L, R_MAX, stride_xm,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``s[p, t, r] = scalings[i] * sum_{k in split p} x[t, k] A[i, r, k]`` for ``r < r_i``: the
    fp32 partial of split ``p`` (``_split_range`` of K; ``s [S, T, R_MAX]``); program
    ``(t, rank block, p)``, grid ``(T, cdiv(R_MAX, BLOCK_R), S)``. Bytes per program: its rank
    block's rows of A_i and x's row over the split's columns (x's row is so read once per
    rank block), ``BLOCK_R`` fp32 written. Nothing is written for tokens without adapter or
    ``r >= r_i``."""
    t = tl.program_id(0)
    r0 = tl.program_id(1) * BLOCK_R
    split = tl.program_id(2)
    adapter, valid = _token_adapter(ids_ptr, t, L)
    rank = _adapter_rank(ranks_ptr, adapter, R_MAX)
    if (not valid) or r0 >= rank:
        return
    offs_r = r0 + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    r_ok = offs_r < rank
    x_row = x_ptr + t.to(tl.int64) * stride_xm
    a_rows = a_ptr + adapter * R_MAX * K + offs_r.to(tl.int64)[:, None] * K
    k_start, k_end = _split_range(K, BLOCK_K)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < k_end
        xv = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)
        a = tl.load(a_rows + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(a * xv[None, :], axis=1)
    acc *= tl.load(scal_ptr + adapter).to(tl.float32)
    row = split.to(tl.int64) * tl.num_programs(0) + t
    tl.store(s_ptr + row * R_MAX + offs_r, acc, mask=r_ok)


@triton.jit
def _sum_split_partials(part_ptr, offs_r, r_ok, num_splits, part_stride, BLOCK_R: tl.constexpr,
                        SPLIT_BLOCK: tl.constexpr):
    """Sum over p of ``part_ptr[p * part_stride + offs_r]`` (fp32, masked lanes 0) in a fixed
    order: split p goes to row ``p % SPLIT_BLOCK`` of a ``[SPLIT_BLOCK, BLOCK_R]`` tile, added
    in order of p, and the rows are then reduced by ``tl.sum``'s fixed tree. The same on every
    run for a given split count (no atomics). ``SPLIT_BLOCK`` splits per load rather than one
    (``tile_utils.sum_partials``): a chain of dependent L2 loads, one per split, would cost
    about as long as the decode shrink it sums."""
    offs_p = tl.arange(0, SPLIT_BLOCK)
    acc = tl.zeros((SPLIT_BLOCK, BLOCK_R), dtype=tl.float32)
    for p0 in range(0, num_splits, SPLIT_BLOCK):
        p = p0 + offs_p
        ptrs = part_ptr + p.to(tl.int64)[:, None] * part_stride + offs_r[None, :]
        acc += tl.load(ptrs, mask=(p < num_splits)[:, None] & r_ok[None, :], other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _decode_rank_block(acc, b_rows, s_row, n_ok, r0, rank, num_splits, part_stride, BLOCK_R: tl.constexpr,
                       SPLIT_BLOCK: tl.constexpr, TAIL: tl.constexpr):
    """``acc + B[:, r0:r0 + BLOCK_R] s[r0:r0 + BLOCK_R]`` for the decode expand, the partials of
    s summed first (``_sum_split_partials``). ``TAIL``: the last, partial block (ranks masked
    at ``rank``); otherwise every rank of the block is below ``rank`` and only the columns are
    masked, so the loads stay whole 16-byte vectors along the rank."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    if TAIL:
        r_ok = offs_r < rank
    else:
        r_ok = tl.full((BLOCK_R,), 1, tl.int1)
    sv = _sum_split_partials(s_row, offs_r, r_ok, num_splits, part_stride, BLOCK_R, SPLIT_BLOCK)
    b = tl.load(b_rows + offs_r[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
    return acc + tl.sum(b * sv[None, :], axis=1)


@triton.jit(do_not_specialize=("L", "R_MAX", "num_splits"))
def multi_lora_decode_expand_kernel(
    y_ptr, b_ptr, ids_ptr, ranks_ptr, s_ptr,
    N, L, R_MAX, stride_ym, num_splits,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT_BLOCK: tl.constexpr, R_ALIGN: tl.constexpr,
):
    """``y[t, n] += sum_{r < r_i} s[t, r] B[i, n, r]`` in place, ``s[t] = sum_p s[p, t]`` the
    shrink's ``num_splits`` partials (``s [num_splits, T, R_MAX]``, summed in a fixed order:
    ``_sum_split_partials``); program ``(t, column block)``, grid ``(T, cdiv(N, BLOCK_N))``;
    rows of tokens without adapter are not touched. ``R_ALIGN`` divides R_MAX (the launcher's
    promise): B's rows and the partials' are then known to be ``R_ALIGN`` elements apart, and
    the whole rank blocks load as 16-byte vectors once that is 8 (bf16) or 4 (fp32).
    Bytes per program: ``BLOCK_N x r_i`` of B_i, y's ``BLOCK_N`` columns read and written,
    and all ``num_splits x r_i`` fp32 partials of the token: every column block re-reads
    them (from L2), so a launch reads ``T x cdiv(N, BLOCK_N) x num_splits x r_i x 4`` bytes
    of partials (``configs.decode_expand_tile`` weighs that against filling the GPU)."""
    R_MAX = R_MAX // R_ALIGN * R_ALIGN  # the same value, with its divisibility visible to the compiler
    t = tl.program_id(0)
    adapter, valid = _token_adapter(ids_ptr, t, L)
    if not valid:
        return
    rank = _adapter_rank(ranks_ptr, adapter, R_MAX)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    b_rows = b_ptr + adapter * N * R_MAX + offs_n.to(tl.int64)[:, None] * R_MAX
    s_row = s_ptr + t.to(tl.int64) * R_MAX
    part_stride = tl.num_programs(0).to(tl.int64) * R_MAX
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    whole = rank // BLOCK_R * BLOCK_R
    for r0 in range(0, whole, BLOCK_R):
        acc = _decode_rank_block(acc, b_rows, s_row, n_ok, r0, rank, num_splits, part_stride, BLOCK_R, SPLIT_BLOCK,
                                 False)
    if whole < rank:
        acc = _decode_rank_block(acc, b_rows, s_row, n_ok, whole, rank, num_splits, part_stride, BLOCK_R,
                                 SPLIT_BLOCK, True)
    y_ptrs = y_ptr + t.to(tl.int64) * stride_ym + offs_n
    y = tl.load(y_ptrs, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _segment_rows(tile_row_ptr, seg_end_ptr, order_ptr, j, adapter, BLOCK_M: tl.constexpr):
    """Tile ``j`` of the tokens sorted by adapter (its adapter a valid slot):
    ``(rows, row_ok, tokens)``, rows in sorted order, tokens their original indices (0 where
    masked). A tile never straddles two adapters' segments."""
    rows = tl.load(tile_row_ptr + j) + tl.arange(0, BLOCK_M)
    row_ok = rows < tl.load(seg_end_ptr + adapter)
    tokens = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    return rows, row_ok, tokens


@triton.jit(do_not_specialize=("L", "R_MAX", "stride_al", "stride_ar", "stride_ak", "split_stride"))
def multi_lora_shrink_kernel(
    x_ptr, a_ptr, scal_ptr, ranks_ptr, order_ptr, tile_adapter_ptr, tile_row_ptr, seg_end_ptr, s_ptr,
    K, L, R_MAX, stride_xm, stride_al, stride_ar, stride_ak, split_stride,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """``s[p, row, r] = scalings[i] * sum_{k in split p} P[order[row], k] Q[i, r, k]``: the fp32
    partial of split p (``_split_range`` of the reduction; ``s [S, T, R_MAX]`` in sorted
    order, ``split_stride = T x R_MAX`` apart) for the rows of tile ``program_id(0)``
    (adapter i), ``r`` in the rank block ``program_id(1)`` (``r < r_i``) and the split
    ``program_id(2)``. Q is A (forward: ``s``) or B read as ``[R, N]`` (backward: ``dS``),
    given by its strides; P has unit column stride. ``SPLIT_K`` False: one split, the whole
    reduction from 0 to K, with no split range to compute; the range's runtime bounds cost the
    64-row tiles registers (sm_90: 201 -> 245 at rank step 64 with fp32 adapters, 164 -> 200
    at rank step 32 with bf16: three CTAs per SM to two). Bytes per program: the tile's rows
    of P and the block's r_i rows of Q over the split's columns, ``BLOCK_M x BLOCK_R`` fp32
    written."""
    j = tl.program_id(0)
    r0 = tl.program_id(1) * BLOCK_R
    adapter = tl.load(tile_adapter_ptr + j).to(tl.int64)
    if adapter >= L:
        return
    rank = _adapter_rank(ranks_ptr, adapter, R_MAX)
    if r0 >= rank:
        return
    rows, row_ok, tokens = _segment_rows(tile_row_ptr, seg_end_ptr, order_ptr, j, adapter, BLOCK_M)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    r_ok = offs_r < rank
    p_rows = x_ptr + tokens[:, None] * stride_xm
    q_cols = a_ptr + adapter * stride_al + offs_r.to(tl.int64)[None, :] * stride_ar
    if SPLIT_K:
        k_start, k_end = _split_range(K, BLOCK_K)
    else:
        k_start, k_end = 0, K
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < k_end
        p = tl.load(p_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        q = tl.load(q_cols + k.to(tl.int64)[:, None] * stride_ak, mask=k_ok[:, None] & r_ok[None, :],
                    other=0.0).to(tl.float32)
        acc = tl.dot(p, q, acc, input_precision=PRECISION)
    acc *= tl.load(scal_ptr + adapter).to(tl.float32)
    s_rows = s_ptr + tl.program_id(2).to(tl.int64) * split_stride + rows.to(tl.int64)[:, None] * R_MAX
    tl.store(s_rows + offs_r[None, :], acc, mask=row_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=("L", "R_MAX", "stride_bl", "stride_bn", "stride_br", "num_splits", "split_stride"))
def multi_lora_expand_kernel(
    y_ptr, b_ptr, ranks_ptr, order_ptr, tile_adapter_ptr, tile_row_ptr, seg_end_ptr, s_ptr,
    N, L, R_MAX, stride_ym, stride_bl, stride_bn, stride_br, num_splits, split_stride,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    SUM_SPLITS: tl.constexpr,
):
    """``out[order[row], n] += sum_{r < r_i} s[row, r] Q[i, n, r]`` in place for the rows of tile
    ``program_id(0)`` (adapter i) and the column block ``program_id(1)``, ``s[row] = sum_p
    s[p, row]`` the shrink's ``num_splits`` partials (``split_stride`` apart), added in order
    of p (fixed: the same on every run). ``SUM_SPLITS`` False: one partial (``num_splits`` 1),
    loaded without the loop over splits, which would keep Triton from pipelining the rank
    loop's loads (cp.async) and raise the 64 x 64 tile of rank step 32 from 139 to 226
    registers (bf16 on sm_90).
    Q is B (forward) or A read as ``[K, R]`` (backward's
    dX term), given by its strides. Each token lies in one tile, so every element of ``out``
    has at most one writer. Bytes per program: the block of Q_i (``BLOCK_N x r_i``), the
    tile's rows of every partial (re-read by each column block) and the tile's rows of
    ``out`` read and written."""
    j = tl.program_id(0)
    adapter = tl.load(tile_adapter_ptr + j).to(tl.int64)
    if adapter >= L:
        return
    rank = _adapter_rank(ranks_ptr, adapter, R_MAX)
    rows, row_ok, tokens = _segment_rows(tile_row_ptr, seg_end_ptr, order_ptr, j, adapter, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    q_rows = b_ptr + adapter * stride_bl + offs_n.to(tl.int64)[None, :] * stride_bn
    s_rows = s_ptr + rows.to(tl.int64)[:, None] * R_MAX
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < rank
        s_ptrs = s_rows + offs_r[None, :]
        s_mask = row_ok[:, None] & r_ok[None, :]
        if SUM_SPLITS:
            s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for _ in range(0, num_splits):  # partial p at s_ptrs + p * split_stride, in order of p
                s += tl.load(s_ptrs, mask=s_mask, other=0.0)
                s_ptrs += split_stride
        else:
            s = tl.load(s_ptrs, mask=s_mask, other=0.0)
        q = tl.load(q_rows + offs_r.to(tl.int64)[:, None] * stride_br, mask=r_ok[:, None] & n_ok[None, :],
                    other=0.0).to(tl.float32)
        acc = tl.dot(s, q, acc, input_precision=PRECISION)
    out_ptrs = y_ptr + tokens[:, None] * stride_ym + offs_n[None, :]
    mask = row_ok[:, None] & n_ok[None, :]
    out = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (out + acc).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=("L", "R_MAX", "stride_ol", "stride_or", "stride_oc"))
def multi_lora_wgrad_kernel(
    lhs_ptr, x_ptr, ranks_ptr, order_ptr, seg_start_ptr, seg_end_ptr, out_ptr,
    C, L, R_MAX, stride_xm, stride_ol, stride_or, stride_oc,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr,
):
    """``out[i, r, c] = sum over adapter i's sorted rows of lhs[row, r] X[order[row], c]`` for the
    slot ``program_id(0)``, rank block ``program_id(1)`` and column block ``program_id(2)``:
    dA (lhs = dS, X = x, out ``[L, R_MAX, K]``) or dB (lhs = s, X = dY, out ``[L, N, R_MAX]``
    through its strides). One program owns each output element and sums its rows in order
    (no atomics); rows ``r >= r_i`` of the slot (the padding) and absent adapters get zeros."""
    adapter = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    rank = _adapter_rank(ranks_ptr, adapter, R_MAX)
    r_ok = offs_r < rank
    c_ok = offs_c < C
    start = tl.load(seg_start_ptr + adapter)
    end = tl.load(seg_end_ptr + adapter)
    # A rank block entirely past r_i has nothing to sum: an empty loop.
    end = tl.where(tl.program_id(1) * BLOCK_R < rank, end, start)
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + offs_m
        row_ok = rows < end
        tokens = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        lhs = tl.load(lhs_ptr + rows.to(tl.int64)[:, None] * R_MAX + offs_r[None, :],
                      mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        xt = tl.load(x_ptr + tokens[:, None] * stride_xm + offs_c[None, :], mask=row_ok[:, None] & c_ok[None, :],
                     other=0.0).to(tl.float32)
        acc = tl.dot(tl.trans(lhs), xt, acc, input_precision=PRECISION)
    out_ptrs = out_ptr + adapter * stride_ol + offs_r.to(tl.int64)[:, None] * stride_or + offs_c[None, :] * stride_oc
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_r < R_MAX)[:, None] & c_ok[None, :])
