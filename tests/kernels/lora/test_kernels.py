"""Index arithmetic of the LoRA kernels' GEMM main loop (``fastpeft.kernels.lora.kernels``)
where it leaves 32 bits: dX's split-K reads W^T from a split start ``red_start`` whose
offset ``red_start * K`` passes 2**31 once W has 2**31 elements (Llama-3-70B's 28672 x 8192
``down_proj`` does), which ``aligned_rows`` admits.

Allocating such a W would take gigabytes, so a probe kernel runs the main loop at such a
``red_start`` on small tensors and passes base pointers moved back by the (64-bit) offsets:
only 64-bit index math lands on the tensors. 32-bit math lands gigabytes before them, which
makes the interpreter fault; the probe therefore runs in a child process, and the test
checks that it exits cleanly with the float64 product.
"""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = r'''
import torch, triton, triton.language as tl
from fastpeft.kernels.lora.kernels import _gemm_mainloop

@triton.jit
def probe(p_ptr, q_ptr, out_ptr, shift_q, red_start, stride_qr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    # P [BLOCK, *] (stride_pm = BLOCK, stride_pr = 1) and Q [BLOCK, *] (stride_qn = 1,
    # stride_qr) seen from column / row red_start on: p and q hold exactly that range.
    acc, _ = _gemm_mainloop(tl.zeros((BLOCK, BLOCK), dtype=tl.float32), p_ptr - red_start, q_ptr - shift_q, p_ptr,
                            offs, BLOCK, offs, red_start, red_start + BLOCK,
                            BLOCK, 1, 1, stride_qr, 0, 0, BLOCK, BLOCK, BLOCK, 16, 0, False, True, "ieee")
    tl.store(out_ptr + offs[:, None] * BLOCK + offs[None, :], acc)

BLOCK, K = 16, 4096
red_start = 2**31 // K + 5  # red_start * K > 2**31
p = torch.randn(BLOCK, BLOCK, dtype=torch.float64).float()
q = torch.randn(BLOCK, K, dtype=torch.float64).float()
out = torch.full((BLOCK, BLOCK), float("nan"))
probe[(1,)](p, q, out, red_start * K, red_start, K, BLOCK=BLOCK)
expected = p.double() @ q[:, :BLOCK].double()
print(float((out.double() - expected).abs().max() / expected.abs().max()))
'''


def test_split_k_offsets_past_2_to_the_31_use_64_bit_math():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    child = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, f"the probe crashed (exit {child.returncode}): {child.stderr[-2000:]}"
    assert float(child.stdout.split()[-1]) < 1e-6  # fp32 products of 16 terms, IEEE in the interpreter
