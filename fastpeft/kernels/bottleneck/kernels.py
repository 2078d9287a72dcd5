"""Triton kernels of the fused bottleneck adapter (forward and backward).

Notation: h ``[M, D]``, W_down ``[R, D]``, W_up ``[D, R]``, dropout keep-mask ``K`` with kept
values scaled by ``1/(1-p)``, ``h_hat = K * h / (1-p)``, s the scaling, g = dOut.

Forward   ``z = h_hat W_down^T + b_down``, ``a = act(z)``, ``out = residual + s (a W_up^T + b_up)``
Backward  ``dA = g W_up``, ``dz = s dA act'(z)``, ``db_down = sum_m dz``,
          ``dW_up = s g^T a``, ``db_up = s sum_m g``, ``ds = sum(dA a) + (sum_m g) . b_up``,
          ``dW_down = dz^T h_hat``, ``dh = K (dz W_down) / (1-p) [+ g when the residual is h]``

Kernels (launched by ``launch.py``):
- The forward is a down projection, then an up projection in GEMM-shaped tiles:
  ``bottleneck_down_kernel``, one program per ``BLOCK_M`` rows (64 rows; 16 at decode), block
  of ranks (up to 128; 64 at decode) and range of D (one range, or at decode
  and small M a split that fills the GPU), sums ``z`` over its range
  (``shrink_tile.shrink_rows``, the mask drawn on the fly; 16-bit h and weights meet on the
  bf16/fp16 tensor cores). With one range it stores ``z`` (fp32, for the backward) and
  ``act(z)`` (fp32, for the up projection); with several, fp32 partials that
  ``bottleneck_down_sum_kernel`` adds in split order. ``bottleneck_up_kernel``: one program
  per ``[BLOCK_M, BLOCK_N]`` tile of out, ``act(z) W_up^T`` with the rank walked in steps,
  then ``out = residual + s (... + b_up)``. Memory traffic: h once per rank block (from L2
  after the first); W_down once per row tile; ``act(z)`` ([M, R] fp32) once per column tile
  and W_up once per row tile (both from L2 at the shapes that matter); the residual once, out
  written once; z and act(z) written once.
- ``bottleneck_bwd_dz_kernel``: the same row pass as the down projection, over g against
  W_up^T: one program per ``BLOCK_M`` rows and block of ranks walks its range of D (g read
  once per rank block): ``dA = g W_up``; with one range it stores ``dz`` and ``a = act(z)``
  (fp32 ``[M, R]``) and per-program partials of ``db_down`` and of ``sum(dA a)`` (the
  scaling's gradient); with several (decode and small M), fp32 partials of dA that
  ``bottleneck_bwd_dz_sum_kernel`` adds in split order before doing the same.
- ``bottleneck_bwd_wgrad_dh_kernel`` (up to ``configs.COLUMN_MAX_RANK`` ranks): one program
  per ``(BLOCK_D columns, row range)`` walks its rows once, reading g and h tiles once each:
  sums ``g^T a``, ``sum_m g`` and ``dz^T h_hat`` in registers over its rows (a and dz,
  ``[M, R]`` fp32, come from L2) and, with ``NEED_DH``, writes ``dh`` for its tiles
  (``dz W_down``, the mask regenerated, plus g when the residual is h). Each program stores
  its sums once as fp32 partials; the launcher adds the partials of the row ranges in a
  fixed order (a few per column). Wider bottlenecks (whose two sums would narrow the column
  tile until dz and a are re-read per 32 columns) run the weight gradients as two GEMMs on
  ``fastpeft.kernels.lora.kernels.lora_bwd_wgrad_kernel`` (the same products as LoRA's dA
  and dB, in blocks of 128 ranks), ``sum_m g`` as a torch column sum, and dh in
- ``bottleneck_bwd_dh_kernel``: one program per ``[BLOCK_M, BLOCK_D]`` tile of dh: ``dz W_down``
  with the rank walked in steps, the mask regenerated, plus g when the residual is h.

So the backward (up to 64 ranks) reads g twice -- once for ``dz`` (which needs all of D before anything else
can use it), once for ``dW_up``, ``db_up`` and dh's residual term together -- h once, and
writes dh once. (Reading g once for both ``dz`` and ``dW_up`` would need fp32 partials of one
of them per tile of the other's reduction: ``4 R / BLOCK`` times g's bytes, more than a
second read of g for R >= 32, and with the residual h the second read of g is needed for dh
anyway.)

Compile-time variants: only the tiles, ``HAS_DROPOUT``, ``NEED_DH``, ``UPCAST`` and
``PRECISION`` are constexprs, and
Triton's launch-time specialization (multiples of 16) of D, the row strides and the pointers;
arguments with arbitrary values (M, R, W_up's row stride R, the flags below) are exempt
(``do_not_specialize``). The
activation, the presence of each bias, whether the scaling is read from memory and whether
the residual is h are runtime scalars: each selects a uniform branch (or an empty load mask)
taken once per tile, so one compiled kernel serves all their combinations and ``fastpeft
check`` compiles every variant the launchers can produce.

The dz kernel re-reads W_up (``R D`` elements) per ``BLOCK_M`` rows, from L2: ``R / BLOCK_M``
times dOut's bytes of L2 traffic (2x at R = 64 with 32-row tiles) -- untuned; a GPU run
decides whether larger row tiles pay for their fewer programs.

No kernel uses atomics: results are bitwise reproducible. The dropout mask is
``philox_dropout.keep_mask`` (the counters of element ``(m, d)`` of h), drawn in the forward
and regenerated in the backward, never stored.

Precision: every product accumulates in fp32 and every product of two 16-bit values is exact
there. The down projection meets in the weights' dtype (``tile_utils.to_compute``: 16-bit h
and weights on their own tensor cores; h widened to meet fp32 weights; ``UPCAST`` widens
everything in the interpreter, whose bf16 arithmetic is wrong); every other product takes
fp32 operands (``PRECISION`` "tf32" for the tensor cores on a GPU with 16-bit h, "ieee" for
fp32 h and in the interpreter), so ``act(z)`` meets W_up unrounded. z, a, dA and dz live
in fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastpeft.kernels.philox_dropout import keep_mask
from fastpeft.kernels.shrink_tile import shrink_rows
from fastpeft.kernels.tile_utils import sum_partials

# Activation codes of the kernels' runtime ``activation`` argument, by canonical name
# (``fastpeft.kernels.bottleneck.ref.CANONICAL_ACTIVATIONS``).
ACTIVATION_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "identity": 4}

# GELU constants: 1/sqrt(2) (erf form), 1/sqrt(2 pi) (its derivative), sqrt(2/pi) and 0.044715
# (the tanh approximation of Hendrycks & Gimpel, transformers' "gelu_new").
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_CUBIC = tl.constexpr(0.044715)


@triton.jit
def _sigmoid(x):
    """The logistic function ``1 / (1 + exp(-x))`` (``tl.sigmoid`` fails in the interpreter of
    Triton 3.9); overflow of ``exp`` for x < -88 gives the right limit 0."""
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    """tanh via the logistic function (``2 sigmoid(2x) - 1``): exact in fp32 up to rounding,
    and available on every Triton version and in the interpreter."""
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def activate(z, activation):
    """``act(z)`` elementwise on an fp32 tile, ``activation`` a code of ``ACTIVATION_CODES``
    (a runtime scalar: the branch is uniform and taken once per tile, so one compiled kernel
    serves every activation); ``act(0) = 0`` for each, so padded rows and rank columns stay
    zero."""
    if activation == 0:
        a = tl.maximum(z, 0.0)
    elif activation == 1:
        a = 0.5 * z * (1.0 + tl.erf(z * _INV_SQRT2))
    elif activation == 2:
        a = 0.5 * z * (1.0 + _tanh((z + z * z * z * _GELU_CUBIC) * _SQRT_2_OVER_PI))
    elif activation == 3:
        a = z * _sigmoid(z)
    else:
        a = z
    return a


@triton.jit
def activation_grad(z, activation):
    """``act'(z)`` elementwise on an fp32 tile (relu: 1 for z > 0, as torch's ``relu``)."""
    if activation == 0:
        d = tl.where(z > 0.0, 1.0, 0.0)
    elif activation == 1:
        d = 0.5 * (1.0 + tl.erf(z * _INV_SQRT2)) + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    elif activation == 2:
        t = _tanh((z + z * z * z * _GELU_CUBIC) * _SQRT_2_OVER_PI)
        d = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + z * z * (3.0 * _GELU_CUBIC))
    elif activation == 3:
        sig = _sigmoid(z)
        d = sig * (1.0 + z * (1.0 - sig))
    else:
        d = tl.full(z.shape, 1.0, tl.float32)
    return d


@triton.jit
def _scale(scale_ptr, scaling, scale_in_memory):
    """The adapter's scaling: the fp32 scalar at ``scale_ptr`` (a learned scaling, read on the
    device) when ``scale_in_memory`` is non-zero, else the float argument."""
    s = scaling
    if scale_in_memory != 0:
        s = tl.load(scale_ptr)
    return s


@triton.jit
def _rank_tile(ptr, rows, row_ok, offs_r, r_ok, R):
    """The ``[BLOCK_M, BLOCK_R]`` tile of a contiguous fp32 ``[M, R]`` buffer (0 outside)."""
    return tl.load(ptr + rows.to(tl.int64)[:, None] * R + offs_r[None, :], mask=row_ok[:, None] & r_ok[None, :],
                   other=0.0)


@triton.jit
def _store_z(z, bd_ptr, stride_bd, has_b_down, z_ptr, act_ptr, rows, row_ok, offs_r, r_ok, R, activation):
    """Add ``b_down`` (when ``has_b_down`` is non-zero) to the ``[BLOCK_M, BLOCK_R]`` tile
    ``z`` at ``rows, offs_r`` and store it into ``z [M, R]`` and ``act(z)`` into
    ``act [M, R]`` (both fp32, contiguous)."""
    z += tl.load(bd_ptr + offs_r * stride_bd, mask=offs_r < R * has_b_down, other=0.0).to(tl.float32)[None, :]
    offs = rows.to(tl.int64)[:, None] * R + offs_r[None, :]
    ok = row_ok[:, None] & r_ok[None, :]
    tl.store(z_ptr + offs, z, mask=ok)
    tl.store(act_ptr + offs, activate(z, activation), mask=ok)


@triton.jit(do_not_specialize=["M", "R", "d_per_split", "num_splits", "threshold", "activation", "has_b_down"])
def bottleneck_down_kernel(
    h_ptr, wd_ptr, bd_ptr, seed_ptr, part_ptr, z_ptr, act_ptr,
    M, D, R, d_per_split, num_splits,
    stride_hm, stride_hd, stride_wdr, stride_wdd, stride_bd,
    threshold, keep_scale, activation, has_b_down,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """The down projection for ``BLOCK_M`` rows and ``BLOCK_R`` ranks (axis 0: the rank blocks
    of a row tile are consecutive programs, which share its rows of h through L2) and the
    ``d_per_split`` columns of h of split ``program_id(1)``:
    ``dropout(h) W_down^T`` over those columns (``shrink_tile.shrink_rows``, the mask drawn on
    the fly, ``1/(1-p)`` applied). With one split it is all of z: ``z = ... + b_down`` and
    ``act(z)`` are stored (``_store_z``); with several, the fp32 partial goes to
    ``part [num_splits, M, R]`` for ``bottleneck_down_sum_kernel``."""
    split = tl.program_id(1)
    rank_blocks = tl.cdiv(R, BLOCK_R)
    rows = (tl.program_id(0) // rank_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    r0 = (tl.program_id(0) % rank_blocks) * BLOCK_R
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    d_start = split * d_per_split
    z = shrink_rows(h_ptr, wd_ptr + r0 * stride_wdr, seed_ptr, rows, row_ok, d_start,
                    tl.minimum(d_start + d_per_split, D), D, R - r0, stride_hm, stride_hd, stride_wdr, stride_wdd,
                    threshold, HAS_DROPOUT, BLOCK_M, BLOCK_D, BLOCK_R, UPCAST, PRECISION)
    if HAS_DROPOUT:
        z = z * keep_scale
    if num_splits == 1:
        _store_z(z, bd_ptr, stride_bd, has_b_down, z_ptr, act_ptr, rows, row_ok, offs_r, r_ok, R, activation)
    else:
        tl.store(part_ptr + (split.to(tl.int64) * M + rows)[:, None] * R + offs_r[None, :], z,
                 mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _summed_partials(part_ptr, rows, row_ok, offs_r, r_ok, M, R, num_splits, BLOCK_M: tl.constexpr,
                     BLOCK_R: tl.constexpr):
    """The ``[BLOCK_M, BLOCK_R]`` tile at ``rows, offs_r`` of the sum over splits of the fp32
    partials ``part [num_splits, M, R]``, added in split order (bitwise reproducible)."""
    return sum_partials(tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32),
                        part_ptr + rows.to(tl.int64)[:, None] * R + offs_r[None, :], row_ok[:, None] & r_ok[None, :],
                        num_splits, M * R)


@triton.jit(do_not_specialize=["M", "R", "num_splits", "activation", "has_b_down"])
def bottleneck_down_sum_kernel(
    part_ptr, bd_ptr, z_ptr, act_ptr,
    M, R, num_splits, stride_bd, activation, has_b_down,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``z = sum over splits of part + b_down`` and ``act(z)`` (``_store_z``) for the
    ``[BLOCK_M, BLOCK_R]`` tile ``program_id(0), program_id(1)``: the split down projection's
    partials ``part [num_splits, M, R]`` added in split order (bitwise reproducible)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    z = _summed_partials(part_ptr, rows, row_ok, offs_r, r_ok, M, R, num_splits, BLOCK_M, BLOCK_R)
    _store_z(z, bd_ptr, stride_bd, has_b_down, z_ptr, act_ptr, rows, row_ok, offs_r, r_ok, R, activation)


@triton.jit(do_not_specialize=["M", "R", "stride_wud", "has_b_up", "scale_in_memory"])
def bottleneck_up_kernel(
    act_ptr, wu_ptr, bu_ptr, res_ptr, scale_ptr, out_ptr,
    M, D, R,
    stride_wud, stride_wur, stride_bu, stride_resm, stride_resd,
    scaling, has_b_up, scale_in_memory,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    """The ``[BLOCK_M, BLOCK_N]`` tile (axes 0, 1) of ``out = residual + s (act(z) W_up^T +
    b_up)`` (out's dtype, contiguous): a GEMM tile whose reduction is the rank, walked
    ``BLOCK_R`` at a time over ``act [M, R]`` (fp32) and W_up (widened to fp32: the bottleneck
    side stays fp32), the bias, scaling and residual in its epilogue, ``out`` rounded once."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d_ok = cols < D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        wu = tl.load(wu_ptr + offs_r[:, None] * stride_wur + cols[None, :] * stride_wud,
                     mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(_rank_tile(act_ptr, rows, row_ok, offs_r, r_ok, R), wu, acc, input_precision=PRECISION)
    acc += tl.load(bu_ptr + cols * stride_bu, mask=cols < D * has_b_up, other=0.0).to(tl.float32)[None, :]
    row64 = rows.to(tl.int64)[:, None]
    ok = row_ok[:, None] & d_ok[None, :]
    res = tl.load(res_ptr + row64 * stride_resm + cols[None, :] * stride_resd, mask=ok, other=0.0)
    out = res.to(tl.float32) + _scale(scale_ptr, scaling, scale_in_memory) * acc
    tl.store(out_ptr + row64 * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _store_dz(da, z_ptr, scale_ptr, scaling, scale_in_memory, activation, dz_ptr, a_ptr, dbd_part_ptr, ds_part_ptr,
              rows, row_ok, offs_r, r_ok, R, row_tile, program):
    """From the ``[BLOCK_M, BLOCK_R]`` tile ``da = g W_up`` at ``rows, offs_r``: store
    ``dz = s da act'(z)`` into ``dz [M, R]`` and ``a = act(z)`` into ``a [M, R]`` (fp32: the
    column kernel's operands, so it needs no activation code), the tile's ``sum_m dz`` into row
    ``row_tile`` of ``dbd_part [row tiles, R]`` and its ``sum(dA a)`` into
    ``ds_part[program]``."""
    z = _rank_tile(z_ptr, rows, row_ok, offs_r, r_ok, R)
    a = activate(z, activation)
    dz = _scale(scale_ptr, scaling, scale_in_memory) * da * activation_grad(z, activation)
    # Padded rows and columns: dA is 0 there (masked loads), so dz is too.
    offs = rows.to(tl.int64)[:, None] * R + offs_r[None, :]
    ok = row_ok[:, None] & r_ok[None, :]
    tl.store(dz_ptr + offs, dz, mask=ok)
    tl.store(a_ptr + offs, a, mask=ok)
    tl.store(dbd_part_ptr + row_tile * R + offs_r, tl.sum(dz, axis=0), mask=r_ok)
    tl.store(ds_part_ptr + program, tl.sum(tl.sum(da * a, axis=1), axis=0))


@triton.jit(do_not_specialize=["M", "R", "d_per_split", "num_splits", "stride_wud", "activation", "scale_in_memory"])
def bottleneck_bwd_dz_kernel(
    g_ptr, wu_ptr, z_ptr, scale_ptr, part_ptr, dz_ptr, a_ptr, dbd_part_ptr, ds_part_ptr,
    M, D, R, d_per_split, num_splits,
    stride_gm, stride_gd, stride_wud, stride_wur,
    scaling, activation, scale_in_memory,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``da = g W_up`` for ``BLOCK_M`` rows and ``BLOCK_R`` ranks (axis 0, the rank blocks of
    a row tile consecutive) over the ``d_per_split`` columns of split ``program_id(1)``: with
    one split, ``_store_dz`` (program ``program_id(0)``); with several, the fp32 partial into
    ``part [num_splits, M, R]`` for ``bottleneck_bwd_dz_sum_kernel``."""
    split = tl.program_id(1)
    rank_blocks = tl.cdiv(R, BLOCK_R)
    row_tile = tl.program_id(0) // rank_blocks
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    r0 = (tl.program_id(0) % rank_blocks) * BLOCK_R
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    d_start = split * d_per_split
    # g W_up is the shrink loop of g against W_up^T ([R, D] with W_up's strides swapped).
    da = shrink_rows(g_ptr, wu_ptr + r0 * stride_wur, g_ptr, rows, row_ok, d_start, tl.minimum(d_start + d_per_split, D),
                     D, R - r0, stride_gm, stride_gd, stride_wur, stride_wud, 0, False, BLOCK_M, BLOCK_D, BLOCK_R,
                     UPCAST, PRECISION)
    if num_splits == 1:
        _store_dz(da, z_ptr, scale_ptr, scaling, scale_in_memory, activation, dz_ptr, a_ptr, dbd_part_ptr,
                  ds_part_ptr, rows, row_ok, offs_r, r_ok, R, row_tile, tl.program_id(0))
    else:
        tl.store(part_ptr + (split.to(tl.int64) * M + rows)[:, None] * R + offs_r[None, :], da,
                 mask=row_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=["M", "R", "num_splits", "activation", "scale_in_memory"])
def bottleneck_bwd_dz_sum_kernel(
    part_ptr, z_ptr, scale_ptr, dz_ptr, a_ptr, dbd_part_ptr, ds_part_ptr,
    M, R, num_splits, scaling, activation, scale_in_memory,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``da`` = the split dz pass's partials ``part [num_splits, M, R]`` added in split order,
    then ``_store_dz`` for the ``[BLOCK_M, BLOCK_R]`` tile ``program_id(0), program_id(1)``
    (its ``sum(dA a)`` into ``ds_part`` at the flattened program index)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    da = _summed_partials(part_ptr, rows, row_ok, offs_r, r_ok, M, R, num_splits, BLOCK_M, BLOCK_R)
    _store_dz(da, z_ptr, scale_ptr, scaling, scale_in_memory, activation, dz_ptr, a_ptr, dbd_part_ptr, ds_part_ptr,
              rows, row_ok, offs_r, r_ok, R, tl.program_id(0), tl.program_id(0) * tl.num_programs(1) + tl.program_id(1))


@triton.jit(do_not_specialize=["M", "R", "rows_per_split", "threshold", "residual_is_h"])
def bottleneck_bwd_wgrad_dh_kernel(
    g_ptr, h_ptr, wd_ptr, a_ptr, dz_ptr, seed_ptr, dh_ptr, dwu_part_ptr, dbu_part_ptr, dwd_part_ptr,
    M, D, R, rows_per_split,
    stride_gm, stride_gd, stride_hm, stride_hd, stride_wdr, stride_wdd,
    threshold, keep_scale, residual_is_h,
    HAS_DROPOUT: tl.constexpr, NEED_DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    """For ``BLOCK_D`` columns (axis 0) and the rows of split ``program_id(1)``
    (``rows_per_split`` rows, a multiple of BLOCK_M), every rank (R <= BLOCK_R): the partials
    ``g^T a`` into ``dwu_part [splits, D, R]``, ``sum_m g`` into ``dbu_part [splits, D]``
    (both without the scaling) and ``dz^T h_hat`` (without ``1/(1-p)``) into
    ``dwd_part [splits, R, D]``; with ``NEED_DH`` the tiles of ``dh [M, D]`` (dh's dtype,
    contiguous), plus g when ``residual_is_h`` is non-zero."""
    split = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = cols < D
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    m_start = split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    if NEED_DH:
        wd = tl.load(wd_ptr + offs_r[:, None] * stride_wdr + cols[None, :] * stride_wdd,
                     mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    acc_wu = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
    acc_bu = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_wd = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < m_end
        row64 = rows.to(tl.int64)[:, None]
        ok = row_ok[:, None] & d_ok[None, :]
        g = tl.load(g_ptr + row64 * stride_gm + cols[None, :] * stride_gd, mask=ok, other=0.0).to(tl.float32)
        acc_wu = tl.dot(tl.trans(g), _rank_tile(a_ptr, rows, row_ok, offs_r, r_ok, R), acc_wu,
                        input_precision=PRECISION)
        acc_bu += tl.sum(g, axis=0)
        dz = _rank_tile(dz_ptr, rows, row_ok, offs_r, r_ok, R)
        x = tl.load(h_ptr + row64 * stride_hm + cols[None, :] * stride_hd, mask=ok, other=0.0).to(tl.float32)
        keep = ok  # (read only with HAS_DROPOUT)
        if HAS_DROPOUT:
            keep = keep_mask(seed, rows, tl.program_id(0) * BLOCK_D, D, threshold, BLOCK_M, BLOCK_D)
            x = tl.where(keep, x, 0.0)
        acc_wd = tl.dot(tl.trans(dz), x, acc_wd, input_precision=PRECISION)
        if NEED_DH:
            _store_dh(tl.dot(dz, wd, input_precision=PRECISION), g, keep, keep_scale, residual_is_h,
                      dh_ptr + row64 * D + cols[None, :], ok, HAS_DROPOUT)
    base = split.to(tl.int64) * D
    tl.store(dwu_part_ptr + (base + cols)[:, None] * R + offs_r[None, :], acc_wu, mask=d_ok[:, None] & r_ok[None, :])
    tl.store(dbu_part_ptr + base + cols, acc_bu, mask=d_ok)
    base_wd = split.to(tl.int64) * R
    tl.store(dwd_part_ptr + (base_wd + offs_r)[:, None] * D + cols[None, :], acc_wd, mask=r_ok[:, None] & d_ok[None, :])


@triton.jit
def _store_dh(dz_wd, g, keep, keep_scale, residual_is_h, dh_ptrs, ok, HAS_DROPOUT: tl.constexpr):
    """Store a tile of ``dh = K (dz W_down) / (1-p)``, plus g when ``residual_is_h`` is
    non-zero, from ``dz_wd = dz W_down`` (fp32), rounded once to dh's dtype."""
    dh = dz_wd
    if HAS_DROPOUT:
        dh = tl.where(keep, dh * keep_scale, 0.0)
    if residual_is_h != 0:
        dh += g
    tl.store(dh_ptrs, dh.to(dh_ptrs.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["M", "R", "threshold", "residual_is_h"])
def bottleneck_bwd_dh_kernel(
    g_ptr, wd_ptr, dz_ptr, seed_ptr, dh_ptr,
    M, D, R,
    stride_gm, stride_gd, stride_wdr, stride_wdd,
    threshold, keep_scale, residual_is_h,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The ``[BLOCK_M, BLOCK_D]`` tile (axes 0, 1) of ``dh [M, D]`` (dh's dtype, contiguous)
    for bottlenecks wider than the column kernel's widest rank tile: ``dz W_down`` summed ``BLOCK_R``
    ranks at a time, then the mask, ``1/(1-p)`` and g as in ``bottleneck_bwd_wgrad_dh_kernel``
    (g is read only when ``residual_is_h`` is non-zero)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    d0 = tl.program_id(1) * BLOCK_D
    cols = d0 + tl.arange(0, BLOCK_D)
    d_ok = cols < D
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        wd = tl.load(wd_ptr + offs_r[:, None] * stride_wdr + cols[None, :] * stride_wdd,
                     mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(_rank_tile(dz_ptr, rows, row_ok, offs_r, r_ok, R), wd, acc, input_precision=PRECISION)
    row64 = rows.to(tl.int64)[:, None]
    ok = row_ok[:, None] & d_ok[None, :]
    g = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if residual_is_h != 0:
        g = tl.load(g_ptr + row64 * stride_gm + cols[None, :] * stride_gd, mask=ok, other=0.0).to(tl.float32)
    keep = ok  # (read only with HAS_DROPOUT)
    if HAS_DROPOUT:
        keep = keep_mask(tl.load(seed_ptr), rows, d0, D, threshold, BLOCK_M, BLOCK_D)
    _store_dh(acc, g, keep, keep_scale, residual_is_h, dh_ptr + row64 * D + cols[None, :], ok,
              HAS_DROPOUT)
