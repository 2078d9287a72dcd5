"""Small ``@triton.jit`` helpers shared by every fastpeft kernel."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a linear program id to (pid_m, pid_n) in groups of GROUP_M row-tiles.

    Programs that run together then share the same few row-tiles of the left operand and
    sweep the columns, so the right operand's tiles are reused from L2 (the ordering of
    Triton's matmul tutorial).
    """
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


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
