"""Argument checks shared by the ops: each failure names the argument, what it got and
what was expected, as a ValueError (bad value or shape) or TypeError (bad type or dtype)."""

from __future__ import annotations

import math

import torch

# float64 runs on the torch path (gradcheck, reference runs), the others on every backend.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def describe(t: torch.Tensor) -> str:
    """A tensor's shape, dtype and device, for error messages."""
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def require_tensor(name: str, value: object, ndim: int | None = None) -> torch.Tensor:
    """``value`` must be a floating tensor of a supported dtype (and ``ndim`` dims if given)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} ({describe(value)}) must be float32, float16, bfloat16 or float64")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} ({describe(value)}) must be {ndim}-D")
    if ndim is None and value.dim() < 1:
        raise ValueError(f"{name} ({describe(value)}) must have at least 1 dimension")
    return value


def require_same_device(tensors: dict[str, torch.Tensor | None]) -> None:
    """All non-None tensors live on one device."""
    devices = [v.device for v in tensors.values() if v is not None]
    if len(set(devices)) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in tensors.items() if v is not None)
        raise ValueError(f"all tensors must be on one device, got {listing}")


def require_probability(name: str, value: float) -> float:
    """A dropout probability in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(value).__name__}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def require_finite(name: str, value: float) -> float:
    """A finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_lora_linear_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
) -> None:
    """Validate the arguments of ``lora_linear`` (see its docstring for the contract)."""
    require_tensor("x", x)
    require_tensor("weight", weight, ndim=2)
    require_tensor("lora_a", lora_a, ndim=2)
    require_tensor("lora_b", lora_b, ndim=2)
    if bias is not None:
        require_tensor("bias", bias, ndim=1)
    n, k = weight.shape
    rank = lora_a.shape[0]
    if x.shape[-1] != k:
        raise ValueError(f"x ({describe(x)}): last dimension must equal weight's in_features {k} "
                         f"(weight {tuple(weight.shape)})")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match x dtype {x.dtype}")
    if bias is not None:
        if bias.shape[0] != n:
            raise ValueError(f"bias ({describe(bias)}) must have shape ({n},) to match weight {tuple(weight.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match x dtype {x.dtype}")
    if rank == 0:
        raise ValueError(f"lora_a ({describe(lora_a)}) has rank 0; the LoRA rank r must be >= 1")
    if lora_a.shape[1] != k:
        raise ValueError(f"lora_a ({describe(lora_a)}) must have shape (r, {k}) to match weight {tuple(weight.shape)}")
    if lora_b.shape != (n, rank):
        raise ValueError(f"lora_b ({describe(lora_b)}) must have shape ({n}, {rank}): "
                         f"weight has {n} out_features and lora_a has rank {rank}")
    if lora_b.dtype != lora_a.dtype:
        raise TypeError(f"lora_b dtype {lora_b.dtype} must match lora_a dtype {lora_a.dtype}")
    require_same_device({"x": x, "weight": weight, "bias": bias, "lora_a": lora_a, "lora_b": lora_b})
    require_finite("scaling", scaling)
    require_probability("dropout_p", dropout_p)
