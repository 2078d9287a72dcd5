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
