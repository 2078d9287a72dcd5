"""Small ``@triton.jit`` helpers shared by every fastpeft kernel."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(rows, cols, pid_n)``: this program's ``BLOCK_M x BLOCK_N`` tile of an ``M x N`` output.

    Program ids run in groups of GROUP_M row-tiles: programs that run together share the
    same few row-tiles of the left operand and sweep the columns, so the right operand's
    tiles are reused from L2 (the ordering of Triton's matmul tutorial).
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_in_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
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
