"""The multi-adapter LoRA op's kernels (many adapters, one batch; issue 11), in one place.

- ``kernels.py``: the Triton kernels: decode (BGMV: one row per token, its own adapter) and
  segments (tokens sorted by adapter, tiles of rows sharing one: shrink, expand, and the
  per-adapter dA / dB reduction of the backward).
- ``segments.py``: the device-side grouping of tokens by adapter (sort, segment bounds, tile
  list of static length: no host sync).
- ``launch.py``: the launchers and the argument contract they share with the CUDA C++ decode
  launcher ``cuda_launch.py`` (``multi_lora_decode``).
- ``configs.py``: tile choices and the decode / segments threshold, with their reasons.
- ``specs.py``: every configuration the launchers can pick, for ``fastpeft check``.
- ``ref.py``: ``multi_lora_linear_ref``, the per-token pure-PyTorch reference.

The op is ``fastpeft.ops.multi_lora_linear`` (its torch path in
``fastpeft.ops.multi_lora_linear_torch``). Importing this package imports neither Triton nor
any kernel module.
"""
