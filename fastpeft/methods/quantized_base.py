"""Quantized base layers -- bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` and an ``nn.Linear``
holding torchao's int8 weight-only ``Int8Tensor`` or its ``NF4Tensor`` -- their weight as the op's
``QuantizedWeight``, and PEFT's merge into them (dequantize, add the delta, requantize).

Read from the module at every call (its tensors move with ``.to()``): 4-bit, the packed codes
(``weight.data``) and the quantization state (block scales, code table, double quantization's
nested state); 8-bit, CB (the int8 weight) and SCB, which bitsandbytes moves from the weight to
the layer's ``state`` at its first forward. The state is kept on the module too
(``stash_quantization_state``), so a weight FSDP2 shards and all-gathers back into a plain tensor
still reads. Refused, naming the layer: a 4-bit weight not yet quantized
(bitsandbytes quantizes when the layer moves to a device), one bitsandbytes repacked for its
CPU inference kernel (an eval-mode forward without grad on an AVX512-BF16 CPU rewrites the
weight in place; the way back is lossy), and an 8-bit layer that keeps fp16 weights
(``has_fp16_weights=True`` trains its weight: no quantized base); torchao weights that quantize
activations, have per-group scales or nonzero zero points.

Other quantized layers PEFT knows (GPTQ, AWQ, AQLM, EETQ, HQQ, torchao's others, ...) are refused
by ``unsupported_quantized_layer``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from fastpeft.kernels.quant.ref import INT8, INT8_SCALED, NF4_TORCHAO
from fastpeft.methods.base_layers import BNB_4BIT, BNB_8BIT, TORCHAO_INT8, TORCHAO_NF4
from fastpeft.ops.qlora_linear import QuantizedWeight

# Modules of quantizers fastpeft does not take, by the package their layer classes come from
# (PEFT's own dispatch list), and the ones it takes.
_OTHER_QUANTIZERS = {"auto_gptq": "GPTQ", "gptqmodel": "GPTQ/AWQ (gptqmodel)", "awq": "AWQ", "aqlm": "AQLM",
                     "eetq": "EETQ", "hqq": "HQQ", "optimum": "optimum quanto",
                     "torchao": "torchao (other than its int8 weight-only Int8Tensor and its NF4Tensor)",
                     "neural_compressor": "Intel Neural Compressor", "transformer_engine": "TransformerEngine"}
SUPPORTED = ("bitsandbytes Linear4bit (NF4 / FP4, double quantization) and Linear8bitLt, torchao's int8 "
             "weight-only Int8Tensor (per-row or per-tensor scales: Int8WeightOnlyConfig, version 2, the default "
             "from torchao 0.18) and torchao's NF4Tensor (to_nf4)")


def unsupported_quantized_layer(module: nn.Module) -> str | None:
    """The quantizer's name when ``module`` (or its weight) comes from a quantization library
    fastpeft does not support, else None."""
    if TORCHAO_INT8.matches(module) or TORCHAO_NF4.matches(module):
        return None
    for obj in (module, getattr(module, "weight", None)):
        root = type(obj).__module__.split(".")[0] if obj is not None else ""
        if root in _OTHER_QUANTIZERS:
            return _OTHER_QUANTIZERS[root]
    return None


def _require_cpu_layout(state: object, what: str) -> None:
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError(f"{what}: bitsandbytes repacked this layer's 4-bit weight for its CPU inference kernel "
                         "(an eval-mode forward without grad on an AVX512-BF16 CPU); its way back is lossy. Load the "
                         "model again and adapt it before running it in eval mode under no_grad")


def stash_quantization_state(module: nn.Module) -> None:
    """Keep bitsandbytes layer ``module``'s quantization state on the module itself, where it
    survives the weight parameter being replaced by a plain tensor of the same bytes (FSDP2
    all-gathers a sharded weight into one): a 4-bit ``quant_state`` on ``module.quant_state``
    (bitsandbytes' own place for it, which its forward falls back to), an 8-bit ``SCB`` on
    ``module.state.SCB``. The weight's own state wins whenever it has one (a merge's new weight,
    or a deep copy whose weight points its state at the original layer); the weight keeps it
    too (bitsandbytes' state dict reads it there)."""
    weight = module.weight
    if BNB_4BIT.matches(module):
        if getattr(weight, "quant_state", None) is not None:
            module.quant_state = weight.quant_state
    elif BNB_8BIT.matches(module):
        if getattr(weight, "SCB", None) is not None:
            module.state.SCB = weight.SCB


def parameter_elements(param: torch.Tensor) -> int:
    """The weight elements a parameter holds: a bitsandbytes 4-bit weight packs two per byte of
    its storage (PEFT's count), every other parameter its ``numel``."""
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def _first(*values: object) -> object:
    return next((v for v in values if v is not None), None)


def quantized_weight(module: nn.Module, storage_dtype: torch.dtype | None = None) -> QuantizedWeight:
    """The weight of quantized layer ``module`` (bitsandbytes', or an ``nn.Linear`` with a torchao
    weight) as the op takes it (module docstring).

    A bitsandbytes weight may be its parameter or a plain tensor holding its bytes (FSDP2's
    all-gathered weight): the quantization state is the weight's, else the module's
    (``stash_quantization_state``). ``storage_dtype``: the dtype the 4-bit codes were packed in
    when the layer was adapted; a weight now in another dtype was value-cast (FSDP2's
    ``MixedPrecisionPolicy(param_dtype=...)`` casts a floating-point ``bnb_4bit_quant_storage``),
    so its codes are gone: ValueError."""
    name = type(module).__name__
    weight = module.weight
    if TORCHAO_INT8.matches(module):
        return _torchao_int8_weight(module)
    if TORCHAO_NF4.matches(module):
        return _torchao_nf4_weight(module)
    if BNB_4BIT.matches(module):
        s = _first(getattr(weight, "quant_state", None), getattr(module, "quant_state", None))
        if s is None or getattr(weight, "bnb_quantized", True) is False:
            raise ValueError(f"{name}: its 4-bit weight is not quantized yet (bitsandbytes quantizes it when the "
                             "layer moves to a device: call .to(device) first)")
        if storage_dtype is not None and weight.dtype != storage_dtype:
            raise ValueError(f"{name}: its 4-bit codes were packed as {storage_dtype} but the layer now holds "
                             f"{weight.dtype}: something cast them (FSDP2's MixedPrecisionPolicy(param_dtype=...) "
                             "casts a floating-point bnb_4bit_quant_storage). Use bnb_4bit_quant_storage=torch.uint8 "
                             "(never cast), or a param_dtype equal to the storage dtype")
        _require_cpu_layout(s, name)
        nested = s.state2 if s.nested else None
        return QuantizedWeight(s.quant_type, weight.data, s.absmax, s.code,
                               nested.absmax if nested is not None else None,
                               nested.code if nested is not None else None,
                               s.offset if nested is not None else None,
                               s.blocksize, nested.blocksize if nested is not None else 0,
                               module.out_features, module.in_features, getattr(module, "compute_dtype", None))
    state = getattr(module, "state", None)
    shape = (module.out_features, module.in_features)
    cb = weight.data if weight.dtype == torch.int8 and tuple(weight.shape) == shape else getattr(state, "CB", None)
    scb = _first(getattr(weight, "SCB", None), getattr(state, "SCB", None))
    fp16_weights = _first(getattr(weight, "has_fp16_weights", None), getattr(state, "has_fp16_weights", None))
    if fp16_weights or cb is None or scb is None or cb.dtype != torch.int8:
        raise ValueError(f"{name}: not a frozen int8 base (has_fp16_weights=True keeps and trains a 16-bit weight, "
                         "or the layer was not quantized: move it to a device first); fastpeft adapts quantized "
                         "int8 layers (has_fp16_weights=False)")
    return QuantizedWeight(INT8, cb, scb, None, None, None, None, 0, 0, *shape)


def _torchao_int8_weight(module: nn.Module) -> QuantizedWeight:
    """torchao's int8 weight-only ``Int8Tensor`` (``quantize_(model, Int8WeightOnlyConfig())``,
    or transformers' ``TorchAoConfig``) as the op's ``"int8-scaled"`` weight: ``qdata`` and one
    fp32 scale per row (a per-tensor scale repeated). Refused: activation quantization (its
    forward quantizes the inputs) and per-group scales. The zero points of torchao's symmetric
    int8 are zeros (checked once, when the layer is adapted: ``require_symmetric``)."""
    weight, what = module.weight, f"{type(module).__name__} with a torchao Int8Tensor weight"
    if getattr(weight, "act_quant_kwargs", None) is not None or getattr(weight, "act_pre_scale", None) is not None:
        raise ValueError(f"{what}: it quantizes its activations too (Int8DynamicActivationInt8WeightConfig); "
                         "fastpeft takes torchao's int8 weight-only weights (Int8WeightOnlyConfig)")
    n, k = weight.shape
    block = tuple(weight.block_size)
    if block not in ((1, k), (n, k)):
        raise ValueError(f"{what}: block_size {list(block)}: fastpeft takes per-row ([1, {k}], PerRow) or "
                         "per-tensor scales, not per-group ones")
    scale = weight.scale.reshape(-1).float()
    rows = scale.contiguous() if block == (1, k) else scale.expand(n).contiguous()
    return QuantizedWeight(INT8_SCALED, weight.qdata, rows, None, None, None, None, 0, 0, n, k)


def _torchao_nf4_weight(module: nn.Module) -> QuantizedWeight:
    """torchao's ``NF4Tensor`` (``to_nf4``; torchtune's QLoRA base) as the op's ``"nf4-torchao"``
    weight (``fastpeft.kernels.quant.ref``): its packed codes, int8 block scales, code table,
    factors and mean, block sizes."""
    t = module.weight
    return QuantizedWeight(NF4_TORCHAO, t.quantized_data, t.quantized_scalers, t.nf4, t.quantization_factor, None,
                           t.scaler_mean, t.block_size, t.scaler_block_size, module.out_features, module.in_features)


def require_symmetric(module: nn.Module) -> None:
    """A torchao int8 weight's zero points must be zeros (torchao's int8 weight-only is symmetric;
    fastpeft reads ``qdata * scale``): ValueError otherwise. A host read: called once per layer,
    when it is adapted. Nothing to check for other bases."""
    zero_point = getattr(module.weight, "zero_point", None) if TORCHAO_INT8.matches(module) else None
    if zero_point is not None and bool(zero_point.any()):
        raise ValueError(f"{type(module).__name__} with a torchao Int8Tensor weight: nonzero zero points (an "
                         "asymmetric int8 weight); fastpeft takes torchao's symmetric int8 weight-only weights")


def _requantized_torchao(module: nn.Module, merged: torch.Tensor) -> None:
    """``module``'s weight replaced by ``merged`` quantized as its old weight was: int8 with
    torchao's ``Int8WeightOnlyConfig`` (its ``Int8Tensor``, version 2, without the process-wide
    inductor settings) of the same granularity (PEFT requantizes with the model's own config,
    the same one for a model quantized with it), NF4 with ``to_nf4`` of the same block sizes
    (PEFT cannot merge into an NF4Tensor). The new weight is made first, then swapped in."""
    import torchao.quantization as tq

    old = module.weight
    if TORCHAO_NF4.matches(module):
        new = nn.Parameter(tq.to_nf4(merged, old.block_size, old.scaler_block_size), requires_grad=False)
    else:
        granularity = tq.PerRow() if tuple(old.block_size)[0] == 1 else tq.PerTensor()
        holder = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        holder.weight = nn.Parameter(merged, requires_grad=False)
        tq.quantize_(holder, tq.Int8WeightOnlyConfig(granularity=granularity, set_inductor_config=False, version=2))
        new = holder.weight
    module.weight = new


def _requantized_bitsandbytes(module: nn.Module, merged: torch.Tensor) -> None:
    """``module``'s weight replaced by fp32 ``merged`` quantized with its bitsandbytes settings
    (the new 4-bit weight's state pointing at ``module``), its state stashed again."""
    import bitsandbytes as bnb

    weight = module.weight
    if BNB_8BIT.matches(module):
        new = bnb.nn.Int8Params(merged.to("cpu"), requires_grad=False,
                                has_fp16_weights=weight.has_fp16_weights).to(weight.device)
        module.weight = new
        module.state.reset_grads()
    else:
        state = _first(getattr(weight, "quant_state", None), getattr(module, "quant_state", None))
        settings = {k: v for k, v in weight.__dict__.items() if not k.startswith("_") and k != "data"}
        settings.update(bnb_quantized=False, requires_grad=False, quant_state=None, module=module)
        module.weight = bnb.nn.Params4bit(merged.to(state.dtype).to("cpu"), **settings).to(weight.device)
    stash_quantization_state(module)


@torch.no_grad()
def add_to_quantized(module: nn.Module, delta: torch.Tensor, sign: float) -> None:
    """PEFT's merge into a quantized layer: dequantize its weight, add ``sign * delta``
    (``[out, in]``), requantize into a new weight parameter of the same settings (a
    ``UserWarning``, as PEFT's: the rounding changes generations slightly)."""
    weight = module.weight
    w = quantized_weight(module)
    bits = 8 if w.quant_type in (INT8, INT8_SCALED) else 4
    warnings.warn(f"{'Merge' if sign > 0 else 'Unmerge'} lora module to {bits}-bit linear may get different "
                  "generations due to rounding errors.", UserWarning, stacklevel=3)
    if w.quant_type in (INT8_SCALED, NF4_TORCHAO):  # as PEFT: in the weight's dtype
        _requantized_torchao(module, w.dequantize(weight.dtype) + sign * delta.to(weight.dtype))
    else:
        _requantized_bitsandbytes(module, w.dequantize(torch.float32) + sign * delta.float())


class QuantizedBaseState:
    """State-dict handling for a layer holding a bitsandbytes-quantized base's ``weight`` and
    ``bias`` as its own (``QuantLoRALinear``, ``MultiLoRALinear``): the base module writes the
    base's entries, so they are bitsandbytes' (the packed weight with its quantization state:
    ``weight.absmax``, ``weight.quant_map``, ..., or int8's ``SCB``); loading such entries back
    into the adapted layer is refused with a clear error before anything is copied
    (bitsandbytes' own loading runs hooks of its module; a half-loaded int8 layer would keep
    stale scales): load the quantized model with transformers, then the adapter. The layer
    reads its base weight through ``quantized_base_weight`` (the state stashed at wrap time, the
    storage dtype checked)."""

    def quantized_base_module(self) -> nn.Module | None:
        """The bitsandbytes module, holding this layer's current weight and bias; None when the
        base is not quantized (the layer's state dict is then ``nn.Module``'s)."""
        raise NotImplementedError

    def _adopt_quantized_base(self, base: nn.Module) -> None:
        """At wrap time: the base's zero points checked (``require_symmetric``), its quantization
        state stashed on it (``stash_quantization_state``) and the dtype its weight is stored in,
        which ``quantized_base_weight`` then requires."""
        require_symmetric(base)
        stash_quantization_state(base)
        self._storage_dtype = base.weight.dtype

    def quantized_base_weight(self) -> QuantizedWeight:
        """The quantized base weight as the op takes it (``quantized_weight``)."""
        return quantized_weight(self.quantized_base_module(), self._storage_dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        base = self.quantized_base_module()
        if base is not None:  # its entries for weight and bias, and its quantization state's
            base._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        if self.quantized_base_module() is None:
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        own = (set(self._parameters) | set(self._buffers)) - {"weight", "bias"}
        children = tuple(f"{name}." for name in self._modules)
        base = [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in own
                and not k[len(prefix):].startswith(children)]
        if base:
            error_msgs.append(f"{prefix or 'the layer'}: the quantized base's entries {base[:3]} cannot be loaded "
                              "into an adapted quantized layer; load the quantized model with transformers and "
                              "the adapter with fastpeft.load_adapter")
            return
        kept = {k: v for k, v in state_dict.items() if not (k.startswith(prefix) and k[len(prefix):] in
                                                              ("weight", "bias"))}
        super()._load_from_state_dict(kept, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
