"""``MultiLoRALinear``: one base linear with preallocated LoRA adapter slots, so a batch can
mix adapters per token (``fastpeft.ops.multi_lora_linear``) and adapters can be loaded and
unloaded while serving without reallocating anything (or recompiling a captured graph).

Slots: ``lora_A [max_adapters, max_rank, in]``, ``lora_B [max_adapters, out, max_rank]``,
``scalings [max_adapters]`` (float32) and ``ranks [max_adapters]`` (int64; 0 = empty slot),
all allocated once. ``load_slot`` copies an adapter into a slot in place (its padding past the
rank zeroed), ``clear_slot`` empties it; other slots are never touched. A and B are
parameters with ``requires_grad=False`` (serving); set it to train several adapters in one
batch (every slot's gradient comes back in one backward).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpeft.methods.base_layers import default_lora_dtype, require_base_layer
from fastpeft.methods.quantized_base import QuantizedBaseState
from fastpeft.ops.checks import describe
from fastpeft.ops.dora_linear_torch import dora_row_norm
from fastpeft.ops.multi_lora_linear import multi_lora_linear
from fastpeft.ops.qlora_linear import dequantize


class TokenAdapterIds:
    """The adapter slot of each sequence in the batch that the calling thread runs, shared
    by every ``MultiLoRALinear`` of a model (``MultiAdapterModel`` binds it around each call).

    Per thread: ``bind(ids)`` sets the calling thread's ids for the duration of a ``with``
    block, and the layers read the ids of the thread that runs them (a model's forward runs
    its layers in the thread that calls it), so calls running in several threads at once each
    get their own ids. A copy (``copy.deepcopy``, pickling) is a fresh holder with no ids: ids
    belong to running calls, not to the model.

    ``ids [B]`` (int64, -1 = base only) or None (no adapter: the layers run their base).
    ``for_input(x)`` expands it to one id per row of ``x [B', S..., K]``: each token gets its
    sequence's adapter (padding tokens too: their outputs are masked by attention, as in
    PEFT). ``B'`` may be a multiple of B (``generate`` with beams or several return sequences
    repeats each sequence in place).
    """

    def __init__(self) -> None:
        self._bound = threading.local()

    def __reduce__(self) -> tuple:
        return type(self), ()

    @property
    def ids(self) -> torch.Tensor | None:
        """The calling thread's ids; None outside ``bind``."""
        return getattr(self._bound, "ids", None)

    @contextlib.contextmanager
    def bind(self, ids: torch.Tensor | None) -> Iterator[None]:
        """Give the calling thread ``ids`` (``[B]`` integers, or None) while the block runs,
        and its previous ids after it."""
        if ids is not None and not (isinstance(ids, torch.Tensor) and ids.dim() == 1):
            got = describe(ids) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise TypeError(f"ids must be a 1-D tensor (one adapter slot per sequence) or None, got {got}")
        previous = self.ids
        self._bound.ids = ids
        try:
            yield
        finally:
            self._bound.ids = previous

    def for_input(self, x: torch.Tensor) -> torch.Tensor | None:
        ids = self.ids
        if ids is None:
            return None
        if x.dim() < 2:
            raise ValueError(f"a mixed-adapter batch needs inputs [batch, ..., features], got shape {tuple(x.shape)}")
        batch = x.shape[0]
        if batch != ids.shape[0]:
            if ids.shape[0] == 0 or batch % ids.shape[0]:
                raise ValueError(f"adapter_names has {ids.shape[0]} entries but the layer input has batch size "
                                 f"{batch}: give one adapter name per sequence")
            ids = ids.repeat_interleave(batch // ids.shape[0])
        ids = ids.to(x.device, non_blocking=True)
        return ids.view(batch, *([1] * (x.dim() - 2))).expand(x.shape[:-1])


class MultiLoRALinear(QuantizedBaseState, nn.Module):
    """``y[t] = x[t] W^T + b + scalings[i] x[t] A_i^T B_i^T`` with ``i`` the adapter slot of
    token t (``-1``: base only), over ``max_adapters`` preallocated slots of rank up to
    ``max_rank``. With ``dora``, a slot may hold a DoRA adapter: its tokens get
    ``c_i * (x W^T + scalings[i] x A_i^T B_i^T) + b``, ``c_i = m_i / ||W + s_i B_i A_i||_row``
    (PEFT's DoRA at inference), the per-slot scale ``dora_scales[i]`` (1 for a LoRA slot) applied
    after the multi-LoRA op, before the bias, on every forward (so a compiled or captured model
    keeps one graph whatever is loaded).

    Args:
        base_layer: the ``nn.Linear`` (or transformers ``Conv1D``, weight ``[in, out]``, or a
            bitsandbytes ``Linear4bit`` / ``Linear8bitLt``) whose weight and bias are shared, not
            copied. On a quantized base each forward dequantizes the weight into a transient
            tensor in x's dtype (``fastpeft.ops.qlora_linear.dequantize``: bitsandbytes' values;
            the base product then runs in x's dtype, bitsandbytes' own layer in its compute
            dtype: the same where the two agree).
        max_adapters, max_rank: slot count and largest rank (both >= 1).
        dtype: of the slots; default PEFT's (float32 on a 16-bit or quantized base, else the base's).
        dora: whether slots may hold DoRA adapters (``dora_scales``: ``[max_adapters, out]``
            float32, one M x N gather and multiply per forward).

    ``forward(x, adapter_ids=None)``: ``adapter_ids`` one slot per row of x (x's leading
    shape); when None, the ids come from ``token_ids`` (the shared ``TokenAdapterIds``: the
    ids the calling thread bound), and when that holds none either the layer is its base
    linear.

    Threads: forwards may run in several threads at once. A forward's output depends only on
    the slots its ids name, and ``load_slot`` / ``clear_slot`` write only theirs; writing a slot that a
    running forward reads gives that forward a mix of the two adapters, so the caller must
    keep those apart (``MultiAdapterModel`` does).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        max_adapters: int,
        max_rank: int,
        *,
        dtype: torch.dtype | None = None,
        token_ids: TokenAdapterIds | None = None,
        dora: bool = False,
    ) -> None:
        super().__init__()
        kind = require_base_layer(base_layer, "base_layer")
        # A quantized base's module, not registered (its weight and bias are this layer's own):
        # it knows how to read the packed weight (quantized_base.quantized_weight).
        object.__setattr__(self, "_quantized_base", base_layer if kind.quantized else None)
        if kind.quantized:
            self._adopt_quantized_base(base_layer)
        for name, value in (("max_adapters", max_adapters), ("max_rank", max_rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.fan_in_fan_out = kind.fan_in_fan_out
        weight = base_layer.weight
        in_features, out_features = kind.features(base_layer)
        self.in_features, self.out_features = in_features, out_features
        self.weight = weight
        self.bias = base_layer.bias
        lora_dtype = dtype or default_lora_dtype(kind.base_dtype(base_layer))
        device = weight.device
        self.lora_A = nn.Parameter(torch.zeros(max_adapters, max_rank, in_features, dtype=lora_dtype, device=device),
                                   requires_grad=False)
        self.lora_B = nn.Parameter(torch.zeros(max_adapters, out_features, max_rank, dtype=lora_dtype, device=device),
                                   requires_grad=False)
        self.register_buffer("scalings", torch.zeros(max_adapters, dtype=torch.float32, device=device))
        self.register_buffer("ranks", torch.zeros(max_adapters, dtype=torch.int64, device=device))
        self.dora = bool(dora)
        if self.dora:
            self.register_buffer("dora_scales", torch.ones(max_adapters, out_features, dtype=torch.float32,
                                                           device=device))
        self.token_ids = token_ids or TokenAdapterIds()

    @property
    def max_adapters(self) -> int:
        return self.lora_A.shape[0]

    @property
    def max_rank(self) -> int:
        return self.lora_A.shape[1]

    @property
    def quantized(self) -> bool:
        """Whether the base is a quantized layer (bitsandbytes', torchao's)."""
        return self._quantized_base is not None

    def quantized_base_module(self) -> nn.Module | None:
        base = self._quantized_base
        if base is not None and (base.weight is not self.weight or base.bias is not self.bias):
            base.weight, base.bias = self.weight, self.bias
        return base

    def _base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as ``[out, in]`` (a transposed view for ``Conv1D``; a quantized base's
        dequantized in ``dtype``, the activations')."""
        if self.quantized:
            w = self.quantized_base_weight()
            return dequantize(w.quant_type, *w.tensors(), w.blocksize, w.nested_blocksize, w.shape, dtype)
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def _require_slot(self, slot: int) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.max_adapters:
            raise ValueError(f"slot must be an int in [0, {self.max_adapters}), got {slot!r}")
        return slot

    def check_adapter(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        """``lora_a [r, in]`` and ``lora_b [out, r]`` fit a slot (``1 <= r <= max_rank``)."""
        rank = lora_a.shape[0] if lora_a.dim() == 2 else -1
        if lora_a.dim() != 2 or lora_a.shape[1] != self.in_features or not 1 <= rank <= self.max_rank:
            raise ValueError(f"lora_a has shape {tuple(lora_a.shape)}; expected (r, {self.in_features}) with "
                             f"1 <= r <= max_rank {self.max_rank}")
        if tuple(lora_b.shape) != (self.out_features, rank):
            raise ValueError(f"lora_b has shape {tuple(lora_b.shape)}; expected ({self.out_features}, {rank})")

    def check_magnitude(self, magnitude: torch.Tensor | None) -> None:
        """A DoRA ``magnitude`` is ``[out]`` floating point, on a layer made with ``dora``."""
        if magnitude is None:
            return
        if not self.dora:
            raise ValueError("a DoRA adapter (magnitude given) needs a layer made with dora=True")
        if tuple(magnitude.shape) != (self.out_features,) or not magnitude.dtype.is_floating_point:
            raise ValueError(f"magnitude has shape {tuple(magnitude.shape)}, dtype {magnitude.dtype}; expected a "
                             f"floating ({self.out_features},)")

    def _dense_weight(self) -> torch.Tensor:
        """The base weight ``[out, in]`` in float32 (a quantized base's dequantized)."""
        return self._base_weight(torch.float32).float()

    @torch.no_grad()
    def load_slot(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                  magnitude: torch.Tensor | None = None) -> None:
        """Copy an adapter (PEFT layouts: ``lora_A.weight [r, in]``, ``lora_B.weight [out, r]``,
        and a DoRA adapter's ``lora_magnitude_vector [out]``, whose scale
        ``m / ||W + scaling B A||_row`` is computed here) into ``slot`` in place; the slot's
        padding past r is zeroed. No allocation on the layer, no other slot touched."""
        self._require_slot(slot)
        self.check_adapter(lora_a, lora_b)
        self.check_magnitude(magnitude)
        rank = lora_a.shape[0]
        self.lora_A[slot, :rank].copy_(lora_a)
        self.lora_A[slot, rank:].zero_()
        self.lora_B[slot, :, :rank].copy_(lora_b)
        self.lora_B[slot, :, rank:].zero_()
        self.scalings[slot] = float(scaling)
        self.ranks[slot] = rank
        if self.dora and magnitude is None:
            self.dora_scales[slot].fill_(1.0)
        elif self.dora:  # the norm of the slot's own weights (the slot dtype's rounding of A and B)
            norm = dora_row_norm(self._dense_weight(), self.lora_A[slot, :rank], self.lora_B[slot, :, :rank],
                                 float(scaling))
            self.dora_scales[slot].copy_(magnitude.to(norm.device, torch.float32) / norm)

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        """Empty ``slot`` (rank 0: its tokens get the base output)."""
        self._require_slot(slot)
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.scalings[slot] = 0.0
        self.ranks[slot] = 0
        if self.dora:
            self.dora_scales[slot].fill_(1.0)

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        if adapter_ids is None:
            adapter_ids = self.token_ids.for_input(x)
        bias = self.bias.to(x.dtype) if self.quantized and self.bias is not None else self.bias
        if adapter_ids is None:
            return F.linear(x, self._base_weight(x.dtype), bias)
        if not self.dora:
            return multi_lora_linear(x, self._base_weight(x.dtype), bias, self.lora_A, self.lora_B, self.scalings,
                                     adapter_ids, self.ranks)
        y = multi_lora_linear(x, self._base_weight(x.dtype), None, self.lora_A, self.lora_B, self.scalings, adapter_ids,
                              self.ranks)
        # each token's slot scale (1 for base tokens and LoRA slots), then the bias: PEFT's DoRA at inference
        ids = adapter_ids.reshape(-1)
        scales = torch.where((ids >= 0)[:, None], self.dora_scales.index_select(0, ids.clamp_min(0)), 1.0)
        out = y.reshape(-1, self.out_features).float() * scales
        if bias is not None:
            out += bias.float()
        return out.to(x.dtype).view(y.shape)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"max_adapters={self.max_adapters}, max_rank={self.max_rank}, dtype={self.lora_A.dtype}, "
                f"dora={self.dora}")
