"""Small ``@triton.jit`` helpers shared by every fastpeft kernel."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)``: the row and column tile of output tile number ``tile`` of an
    ``M x N`` output cut into ``BLOCK_M x BLOCK_N`` tiles.

    Tile numbers run in groups of GROUP_M row-tiles: tiles numbered close together share the
    same few row-tiles of the left operand and sweep the columns, so the right operand's
    tiles are reused from L2 (the ordering of Triton's matmul tutorial). One program per tile
    (``output_tile``) and persistent programs walking tile numbers use the same order.
    """
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_in_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_pid_m = (tile // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(rows, cols, pid_n)``: this program's ``BLOCK_M x BLOCK_N`` tile of an ``M x N`` output,
    tile number ``program_id(0)`` in ``grouped_tile``'s order."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N), pid_n


@triton.jit
def to_compute(v, dtype_ref_ptr, UPCAST: tl.constexpr):
    """Cast a loaded tile to the dtype the tensor cores run in.

    That is the element type of ``dtype_ref_ptr`` (the activation), so fp32 LoRA weights
    meet a bf16 activation in bf16 with fp32 accumulation. ``UPCAST`` computes in fp32
    instead: Triton's interpreter mishandles bf16 arithmetic (see KERNEL_NOTES.md), so the
    launcher sets it there for bf16 inputs.
    """
    if UPCAST:
        return v.to(tl.float32)
    else:
        return v.to(dtype_ref_ptr.dtype.element_ty)


@triton.jit
def rank_dot(a, b, acc, dtype_ref_ptr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` (``acc`` may be None) for a rank-r product inside a GEMM kernel, its
    operands in the LoRA weight ``dtype_ref_ptr``'s dtype (``to_compute``), as PEFT runs the
    LoRA branch in the adapter's dtype: fp32 adapters keep the rank-r side in fp32 (tf32
    tensor cores; no 16-bit overflow of ``s * scaling``, no flush of a tiny dS), 16-bit
    adapters use their own tensor-core path."""
    return tl.dot(to_compute(a, dtype_ref_ptr, UPCAST), to_compute(b, dtype_ref_ptr, UPCAST), acc,
                  input_precision=PRECISION)


@triton.jit
def sum_partials(acc, ptrs, mask, num_parts, part_stride):
    """``acc`` plus the ``num_parts`` tiles at ``ptrs``, ``ptrs + part_stride``, ... (masked
    lanes read 0), added in that order: a split reduction's fp32 partials summed the same
    way on every run (no atomics), so its result is bitwise reproducible."""
    for _ in range(num_parts):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += part_stride
    return acc
