"""Where the tests run: the device their tensors live on and the op backends they run on.

``KERNELS_RUN`` reads ``TRITON_INTERPRET``, which ``tests/conftest.py`` sets (on a machine
without CUDA) before anything imports this module.
"""

from __future__ import annotations

import torch

from fastpeft.backend import interpreting, triton_available

# The device every op test puts its tensors on: the GPU where there is one.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Backends every op test runs on: the Triton kernels (interpreted on CPU) and the torch path.
# "triton" only where it runs kernels on DEVICE's tensors: elsewhere (a CPU run with
# TRITON_INTERPRET=0) it would run the torch path a second time under the kernels' name.
KERNELS_RUN = triton_available() and (DEVICE.type == "cuda" or interpreting())
BACKENDS = ["triton", "torch"] if KERNELS_RUN else ["torch"]


def dtype_id(dtype: torch.dtype) -> str:
    """Test id of an activation dtype in the LoRA op's tests: ``str(dtype)``, but for bf16 where
    the kernels run in Triton's interpreter, "bf16_io_fp32_math". There the LoRA kernels read and
    write bf16 but compute in fp32 with IEEE products (``fastpeft.kernels.launch_device.
    kernel_numerics``: UPCAST, as the interpreter's bf16 arithmetic is wrong), not with the bf16
    tensor-core and tf32 arithmetic a GPU runs, so those cases are no coverage of the kernels'
    bf16 arithmetic (a GPU run is: tests/test_gpu.py). The torch path's run of the same case
    (the ``backend`` fixture) carries the same id."""
    if dtype == torch.bfloat16 and DEVICE.type != "cuda" and interpreting():
        return "bf16_io_fp32_math"
    return str(dtype)
