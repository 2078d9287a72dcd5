"""``AdapterConfig``: AdapterHub's bottleneck-adapter configuration (its ``BnConfig``), with
AdapterHub's field names and meanings, for ``fastpeft.inject`` and AdapterHub's files.

``AdapterConfig("seq_bn")``, ``AdapterConfig("double_seq_bn")`` and ``AdapterConfig("par_bn")``
are AdapterHub's presets (also under their old names ``"pfeiffer"``, ``"houlsby"``,
``"parallel"``, and ``"scaled_par_bn"`` = par_bn with ``scaling="learned"``); any field given
overrides the preset's value. ``AdapterConfig(None, mh_adapter=..., ...)`` starts from
AdapterHub's ``BnConfig`` defaults instead.

Keys of an AdapterHub config (``adapter_config.json``'s ``"config"``) fall in three groups:

* the fields below, which fastpeft implements;
* features fastpeft does not implement (new LayerNorms ``ln_before`` / ``ln_after``, gating,
  invertible adapters, cross-attention adapters, PHM / Compacter layers, stochastic depth):
  accepted when off (False / None / 0), a ``ValueError`` naming the key when on;
* settings that only matter with one of those features on (``adapter_residual_before_ln``,
  ``inv_adapter_reduction_factor``, the ``phm_*`` options): accepted and ignored.

Unknown keys (a newer AdapterHub) are ignored, with a warning when their value is set.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastpeft.kernels.bottleneck.ref import canonical_activation
from fastpeft.methods.bottleneck.layer import IDENTITY_INITS, LEARNED

# AdapterHub's BnConfig defaults for fields that have one.
_BASE_DEFAULTS: dict[str, Any] = {
    "original_ln_before": False,
    "original_ln_after": True,
    "residual_before_ln": True,
    "is_parallel": False,
    "scaling": 1.0,
    "dropout": 0.0,
    "init_weights": "bert",
}
# BnConfig fields without a default: a config without a preset must set them.
_REQUIRED = ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity")

_SEQ_BN = {"original_ln_before": True, "original_ln_after": True, "residual_before_ln": True,
           "mh_adapter": False, "output_adapter": True, "non_linearity": "relu", "reduction_factor": 16}
_DOUBLE_SEQ_BN = {"original_ln_before": False, "original_ln_after": True, "residual_before_ln": True,
                  "mh_adapter": True, "output_adapter": True, "non_linearity": "swish", "reduction_factor": 16}
_PAR_BN = {"original_ln_before": False, "original_ln_after": True, "mh_adapter": False, "output_adapter": True,
           "non_linearity": "relu", "reduction_factor": 2, "init_weights": "mam_adapter", "is_parallel": True,
           "scaling": 4.0}
# AdapterHub's ADAPTER_CONFIG_MAP entries for bottleneck adapters fastpeft implements.
PRESETS: dict[str, dict[str, Any]] = {
    "seq_bn": _SEQ_BN,
    "pfeiffer": _SEQ_BN,
    "double_seq_bn": _DOUBLE_SEQ_BN,
    "houlsby": _DOUBLE_SEQ_BN,
    "par_bn": _PAR_BN,
    "parallel": _PAR_BN,
    "scaled_par_bn": {**_PAR_BN, "scaling": LEARNED},
    "scaled_parallel": {**_PAR_BN, "scaling": LEARNED},
}
# AdapterHub presets that need a feature fastpeft does not implement.
_UNSUPPORTED_PRESETS = {
    "seq_bn_inv": "invertible adapters", "pfeiffer+inv": "invertible adapters",
    "double_seq_bn_inv": "invertible adapters", "houlsby+inv": "invertible adapters",
    "compacter": "PHM (Compacter) layers", "compacter++": "PHM (Compacter) layers",
}

# Features fastpeft does not implement: key -> what it is. Accepted when falsy (off).
UNSUPPORTED_KEYS = {
    "ln_before": "a new LayerNorm before the adapter bottleneck",
    "ln_after": "a new LayerNorm after the adapter bottleneck",
    "use_gating": "gated adapters (UniPELT)",
    "inv_adapter": "invertible adapters",
    "invertible_adapter": "invertible adapters",  # AdapterHub v1's nested form
    "cross_adapter": "adapters after cross-attention",
    "phm_layer": "PHM (Compacter) layers",
    "stochastic_depth": "stochastic depth",
}
# Settings without effect while the features above are off; written with AdapterHub's defaults.
IGNORED_DEFAULTS: dict[str, Any] = {
    "ln_before": False, "ln_after": False, "use_gating": False, "inv_adapter": None, "cross_adapter": False,
    "phm_layer": False, "stochastic_depth": 0.0,
    "adapter_residual_before_ln": False, "inv_adapter_reduction_factor": None, "phm_dim": 4,
    "factorized_phm_W": True, "shared_W_phm": False, "shared_phm_rule": True, "factorized_phm_rule": False,
    "phm_c_init": "normal", "phm_init_range": 0.0001, "learn_phm": True,
    "hypercomplex_nonlinearity": "glorot-uniform", "phm_rank": 1, "phm_bias": True,
}
# AdapterHub's other methods (``"architecture"`` of their configs): not bottleneck adapters.
OTHER_ARCHITECTURES = ("lora", "prefix_tuning", "prompt_tuning", "union", "reft", "mtl_lora")
# residual_before_ln's values: the adapter's residual is the sublayer output (True), the
# adapter's input (False), or, with original_ln_before, the pre-LayerNorm sum ("post_add").
POST_ADD = "post_add"


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"AdapterConfig.{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _positive_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"AdapterConfig.{name} must be a number > 0, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"AdapterConfig.{name} must be finite and > 0, got {value}")
    return value


def _reduction_factor(value: object) -> float | dict[str, float]:
    """A number > 0, or AdapterHub's per-layer mapping ``{"<layer index>": factor, "default": factor}``."""
    if not isinstance(value, Mapping):
        return _positive_number("reduction_factor", value)
    out = {}
    for key, factor in value.items():
        key = str(key) if isinstance(key, int) and not isinstance(key, bool) else key
        if not isinstance(key, str) or not (key == "default" or key.isdigit()):
            raise ValueError(f"AdapterConfig.reduction_factor keys must be layer indices or 'default', got {key!r}")
        out[key] = _positive_number(f"reduction_factor[{key!r}]", factor)
    return out


def _scaling(value: object) -> float | str:
    if isinstance(value, str):
        if value != LEARNED:
            raise ValueError(f"AdapterConfig.scaling must be a number or 'learned', got {value!r}"
                             + (" (AdapterHub's per-channel scaling is not implemented in fastpeft)"
                                if value == "channel" else ""))
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"AdapterConfig.scaling must be a finite number or 'learned', got {value!r}")
    return float(value)  # AdapterHub reads only a float (an int scaling fails there)


def _leave_out(value: object) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"AdapterConfig.leave_out must be a list of layer indices, got {value!r}")
    for i in value:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ValueError(f"AdapterConfig.leave_out must hold layer indices >= 0, got {i!r}")
    return tuple(sorted(set(value)))


@dataclass(frozen=True)
class AdapterConfig:
    """AdapterHub's bottleneck adapter config (``BnConfig``): which positions of each layer
    get an adapter, how big it is and how it connects to the layer's residual stream and
    LayerNorm. Fields left None take the preset's value, then ``BnConfig``'s default.

    Attributes:
        preset: ``"seq_bn"`` (Pfeiffer: after the feed-forward block), ``"double_seq_bn"``
            (Houlsby: after attention and after the feed-forward block), ``"par_bn"`` (He et
            al.: parallel to the feed-forward block), their aliases, or None.
        mh_adapter: an adapter at the attention block's output.
        output_adapter: an adapter at the feed-forward block's output.
        reduction_factor: bottleneck width ``max(1, int(hidden_size // reduction_factor))``;
            a number, or a mapping ``{"<layer index>": factor, ..., "default": factor}``.
        non_linearity: the activation (AdapterHub's names: relu, gelu, gelu_new, swish, ...).
        original_ln_before: sequential adapters take ``LN(h + residual)`` (the model's own
            LayerNorm; ``h + residual`` in a pre-LN model), instead of the block output ``h``.
        original_ln_after: the model's residual add (and post-LN) follows the adapter. Only
            True is implemented: fastpeft adapts through the model's own residual add.
        residual_before_ln: what a sequential adapter's output is added to: ``h`` (True),
            its own input (False) or, with ``original_ln_before`` in a post-LN model,
            ``h + residual`` (``"post_add"``).
        is_parallel: the adapter reads the block's input (the residual stream) and its output
            is added to the block's output (He et al.); the LN flags above then do not apply.
        scaling: a number, or ``"learned"`` (a trainable scalar starting at 1).
        dropout: dropout probability on the adapter's input in training (AdapterHub drops
            the output; the two agree outside training).
        init_weights: ``"bert"``, ``"mam_adapter"`` (starts as the identity; ``"mam"`` and
            ``"lora"`` are aliases) or ``"houlsby"``.
        init_weights_seed: when set (non-zero), every adapter module is initialized from this
            seed, as AdapterHub does (without reseeding the global generator afterwards).
        leave_out: layer indices (from 0) that get no adapter.
    """

    preset: str | None = field(default="seq_bn", compare=False)
    mh_adapter: bool | None = None
    output_adapter: bool | None = None
    reduction_factor: float | Mapping[str, float] | None = None
    non_linearity: str | None = None
    original_ln_before: bool | None = None
    original_ln_after: bool | None = None
    residual_before_ln: bool | str | None = None
    is_parallel: bool | None = None
    scaling: float | str | None = None
    dropout: float | None = None
    init_weights: str | None = None
    init_weights_seed: int | None = None
    leave_out: Sequence[int] = ()

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        preset = self.preset
        if preset is not None:
            if preset in _UNSUPPORTED_PRESETS:
                raise ValueError(f"AdapterConfig preset {preset!r} uses {_UNSUPPORTED_PRESETS[preset]}, "
                                 "which fastpeft does not implement")
            if preset not in PRESETS:
                raise ValueError(f"AdapterConfig preset must be one of {sorted(PRESETS)} or None, got {preset!r}")
        defaults = {**_BASE_DEFAULTS, **PRESETS.get(preset, {})}
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None and f.name in defaults:
                put(f.name, defaults[f.name])
        missing = [name for name in _REQUIRED if getattr(self, name) is None]
        if missing:
            raise ValueError(f"AdapterConfig without a preset needs {missing} (AdapterHub's BnConfig has no defaults)")
        for name in ("mh_adapter", "output_adapter", "original_ln_before", "original_ln_after", "is_parallel"):
            _flag(name, getattr(self, name))
        if not (self.mh_adapter or self.output_adapter):
            raise ValueError("AdapterConfig: mh_adapter and output_adapter are both False, so no adapter is placed")
        put("reduction_factor", _reduction_factor(self.reduction_factor))
        canonical_activation(self.non_linearity)  # ValueError naming the accepted activations
        if not self.original_ln_after:
            raise ValueError("AdapterConfig.original_ln_after=False is not implemented: fastpeft adds the adapter "
                             "through the model's own residual add (and LayerNorm), as AdapterHub does for models "
                             "it adapts with hooks, where it refuses this setting too")
        if self.residual_before_ln not in (True, False, POST_ADD):
            raise ValueError(f"AdapterConfig.residual_before_ln must be True, False or {POST_ADD!r}, "
                             f"got {self.residual_before_ln!r}")
        if self.residual_before_ln == POST_ADD and not (self.original_ln_before or self.is_parallel):
            raise ValueError("AdapterConfig.residual_before_ln='post_add' needs original_ln_before=True (the sum it "
                             "names exists only then; AdapterHub fails on it otherwise)")
        put("scaling", _scaling(self.scaling))
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"AdapterConfig.dropout must be a number in [0, 1), got {dropout!r}")
        put("dropout", float(dropout))
        init = self.init_weights
        if init in IDENTITY_INITS:
            put("init_weights", "mam_adapter")
        elif init not in ("bert", "houlsby"):
            raise ValueError(f"AdapterConfig.init_weights must be 'bert', 'mam_adapter' (or 'mam', 'lora') or "
                             f"'houlsby', got {init!r}")
        seed = self.init_weights_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"AdapterConfig.init_weights_seed must be an int or None, got {seed!r}")
        put("leave_out", _leave_out(self.leave_out))

    @property
    def peft_type(self) -> str:
        """fastpeft's name for the method in messages (PEFT has no bottleneck adapters)."""
        return "BOTTLENECK"

    def reduction_factor_for(self, layer: int) -> float:
        """The reduction factor of layer ``layer`` (AdapterHub's lookup: the layer's own entry,
        else ``"default"``). Raises ValueError when a mapping has neither."""
        factor = self.reduction_factor
        if not isinstance(factor, Mapping):
            return factor
        if str(layer) in factor:
            return factor[str(layer)]
        if "default" in factor:
            return factor["default"]
        raise ValueError(f"AdapterConfig.reduction_factor {dict(factor)} has no entry for layer {layer} and no "
                         "'default' (AdapterHub's format: {'1': 8, 'default': 16})")

    def to_dict(self) -> dict[str, Any]:
        """The config as AdapterHub writes it (``BnConfig.to_dict()``: every field, the
        features fastpeft does not implement at their off values); JSON-serialisable."""
        out = dict(IGNORED_DEFAULTS)
        for f in dataclasses.fields(self):
            if f.name != "preset":
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else (
                    dict(value) if isinstance(value, Mapping) else value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | str) -> "AdapterConfig":
        """Build from AdapterHub's config (the ``"config"`` entry of its ``adapter_config.json``,
        or ``BnConfig.to_dict()``), or from a preset name (old files may hold just the name).

        Raises:
            ValueError: another AdapterHub method (LoRA, prefix tuning, a config union, ...),
                a feature fastpeft does not implement, or an invalid field.
        """
        if isinstance(data, str):
            return cls(data)
        if not isinstance(data, Mapping):
            raise TypeError(f"AdapterHub config must be a dict or a preset name, got {type(data).__name__}")
        architecture = data.get("architecture")
        if architecture is not None:
            raise ValueError(f"AdapterHub config has architecture {architecture!r}: fastpeft reads bottleneck "
                             "adapters only" + (" (a config union combines several methods)"
                                                if architecture == "union" else ""))
        for key, what in UNSUPPORTED_KEYS.items():
            if data.get(key):
                raise ValueError(f"AdapterHub config sets {key}={data[key]!r} ({what}), which fastpeft does not "
                                 "implement")
        names = {f.name for f in dataclasses.fields(cls)} - {"preset"}
        unknown = sorted(k for k, v in data.items()
                         if k not in names and k not in IGNORED_DEFAULTS and k not in UNSUPPORTED_KEYS
                         and k != "architecture" and v)
        if unknown:
            warnings.warn(f"AdapterConfig.from_dict: ignoring unknown AdapterHub config keys {unknown} "
                          "(probably from a newer AdapterHub version)", stacklevel=2)
        return cls(None, **{k: v for k, v in data.items() if k in names})
