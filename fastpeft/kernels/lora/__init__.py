"""The LoRA linear op's kernels, in one place.

- ``kernels.py``: the fused Triton kernels (base GEMM with the LoRA term in its epilogue, and the
  backward passes); ``launch.py``: their launchers.
- ``hybrid_kernels.py`` / ``hybrid_launch.py``: the cuBLAS-hybrid path's Triton pieces.
- ``configs.py``: tile tables and the planners that pick a tile per shape and architecture.
- ``dispatch.py`` + ``dispatch_table.json``: which implementation runs a call (fused, fused-tma, hybrid, torch).
- ``specs.py``: every configuration the planners can pick, for ``fastpeft check``'s AOT compile.
- ``ref.py``: ``lora_linear_ref``, the pure-PyTorch reference the tests and benchmarks compare to.

Shared pieces (tile helpers, Philox dropout, the rank-r shrink tile) live one level up in
``fastpeft.kernels``. Importing this package imports neither Triton nor any kernel module.
"""
