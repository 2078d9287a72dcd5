"""The bottleneck adapter op's kernels, in one place.

    out = residual + scaling * (act(dropout(h) W_down^T + b_down) W_up^T + b_up)

- ``kernels.py``: the fused Triton kernels (forward; backward); ``launch.py``: their
  launchers, whose two public functions (``bottleneck_forward``, ``bottleneck_backward``)
  are the contract every implementation of the op follows.
- ``cuda_launch.py``: the same two functions over the CUDA C++ kernels (``csrc/``).
- ``configs.py``: the tile planner (block sizes per shape and architecture).
- ``specs.py``: every configuration the planner can pick, for ``fastpeft check``'s AOT compile.
- ``ref.py``: ``bottleneck_adapter_ref``, the pure-PyTorch reference the tests and benchmarks
  compare to, and the activation names (AdapterHub's) the op accepts.

Shared pieces (tile helpers, Philox dropout) live one level up in ``fastpeft.kernels``.
Importing this package imports neither Triton nor any kernel module.
"""
