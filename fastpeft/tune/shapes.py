"""What ``fastpeft tune`` tunes: the LoRA layer shapes of a model, its hidden size (the
bottleneck adapter's width), the row counts M its training steps and decode steps run, and the
ranks (``Grid``).

The shapes come from a transformers config (``hidden_size``, ``intermediate_size``,
``num_attention_heads``, ``num_key_value_heads``, ``head_dim``): the attention projections
q / o (hidden -> hidden), k / v (hidden -> kv heads x head dim), and the MLP's gate / up
(hidden -> intermediate) and down (intermediate -> hidden), the layers PEFT's
``target_modules="all-linear"`` adapts on Llama-style models; without a config, Llama-3-8B's.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastpeft.bench.cases import LLAMA3_8B_SHAPES, LayerShape

# Rows M per call: a decode step of one sequence and of a batch of 16, and a training step of
# 4096 tokens (e.g. 4 x 1024, 1 x 4096: the size the dispatch decides between GEMM tiles at).
DECODE_MS = (1, 16)
TRAIN_MS = (4096,)
# LoRA ranks: PEFT's default 8's neighbour 16, and 64 (the kernels' largest padded rank).
RANKS = (16, 64)
# Bottleneck widths R: AdapterHub's default reduction factor 16 (seq_bn, par_bn: R = D / 16,
# 256 on Llama-3-8B, the kernels' largest) and 64 (reduction factor 64 there).
BOTTLENECK_REDUCTION = 16
BOTTLENECK_FIXED_RANK = 64
# A config.json is a few KB; anything much larger is not one.
MAX_CONFIG_BYTES = 1024 * 1024


def shapes_from_config(config: Mapping[str, Any]) -> tuple[LayerShape, ...]:
    """The distinct LoRA layer shapes of a Llama-style transformers config (module docstring);
    ValueError naming the missing or bad key."""
    def positive(key: str, default: int | None = None) -> int:
        value = config.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"model config: {key!r} must be a positive integer, got {value!r}")
        return value

    hidden, inter = positive("hidden_size"), positive("intermediate_size")
    heads = positive("num_attention_heads")
    kv_heads = positive("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    if not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"model config: 'head_dim' must be a positive integer, got {head_dim!r}")
    shapes = (LayerShape("q/o", hidden, heads * head_dim), LayerShape("k/v", hidden, kv_heads * head_dim),
              LayerShape("gate/up", hidden, inter), LayerShape("down", inter, hidden))
    unique: dict[tuple[int, int], LayerShape] = {}
    for shape in shapes:
        unique.setdefault((shape.in_features, shape.out_features), shape)
    return tuple(unique.values())


def load_model_config(name_or_path: str) -> dict[str, Any]:
    """A transformers config as a dict: a ``config.json`` file (or a directory holding one),
    read as JSON (a regular file, at most MAX_CONFIG_BYTES), else a model name for
    ``transformers.AutoConfig.from_pretrained`` (which may download it)."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.exists():
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"{path}: not a regular file of at most {MAX_CONFIG_BYTES} bytes")
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise ValueError(f"{path}: a model config must be a JSON object")
        return config
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name_or_path).to_dict()


def model_shapes(name_or_path: str | None) -> tuple[LayerShape, ...]:
    """The shapes of ``--model`` (a config file, directory or model name), or Llama-3-8B's."""
    if name_or_path is None:
        return LLAMA3_8B_SHAPES
    config = load_model_config(name_or_path)
    return shapes_from_config(config.get("text_config", config))


def bottleneck_ranks(hidden: int, largest: int) -> tuple[int, ...]:
    """The bottleneck widths tuned on a model of hidden size ``hidden`` (at most ``largest``,
    the kernels' limit): ``hidden / BOTTLENECK_REDUCTION`` and ``BOTTLENECK_FIXED_RANK``."""
    return tuple(sorted({max(1, min(hidden // BOTTLENECK_REDUCTION, largest)), min(BOTTLENECK_FIXED_RANK, largest)}))


@dataclass(frozen=True)
class Grid:
    """What a tuning run covers: the LoRA (and multi-LoRA) layer shapes, the hidden size D the
    bottleneck adapter runs at (the q/o layer's input), decode and training row counts, LoRA
    ranks (multi-LoRA: the slots' rank), bottleneck widths, the activation and adapter dtypes,
    the training steps' dropout, and whether it is the rehearsal's tiny grid (whose odd shapes
    are tiny too)."""

    layers: tuple[LayerShape, ...]
    hidden: int
    decode_ms: tuple[int, ...]
    train_ms: tuple[int, ...]
    ranks: tuple[int, ...]
    bottleneck_ranks: tuple[int, ...]
    dtype: torch.dtype
    adapter_dtype: torch.dtype
    dropout_p: float
    tiny: bool = False

    @property
    def odd_adapter_dtypes(self) -> tuple[torch.dtype, ...]:
        """The adapter dtypes the odd shapes are validated with: the timed one first, then
        both that users run (fp32, PEFT's default on a 16-bit model, and the activations'):
        the table is keyed by the activation dtype, so ``auto`` follows it for either."""
        return tuple(dict.fromkeys((self.adapter_dtype, torch.float32, self.dtype)))
