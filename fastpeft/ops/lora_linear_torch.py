"""The torch composite path of the LoRA linear op: CPU tensors, ranks above the Triton
kernels' limit, and ``FASTPEFT_BACKEND=torch``.

Same contract as the Triton path; its dropout mask is ``keep_mask_torch_path``. It adds
no pass over the ``M x N`` output beyond one ``addmm_``: the scaling is folded into the
rank-r side (``M x r`` elements) and the LoRA product accumulates into the base result.
The LoRA side runs in the LoRA weights' dtype, as in PEFT.
"""

from __future__ import annotations

import torch

from fastpeft.ops.dropout_mask import keep_mask_torch_path


def _keep(x: torch.Tensor, dropout_p: float, seed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """The keep-mask ``D`` ``[M, K]`` as 0/1 in ``dtype`` for 2-D x, or None when p is 0.

    Multiplying by it is exact in any dtype; the ``1 / (1 - p)`` scale is applied to the
    rank-r side instead of rounding ``x / (1 - p)`` in a 16-bit dtype.
    """
    if dropout_p == 0.0:
        return None
    return keep_mask_torch_path(seed, x.shape[0], x.shape[1], dropout_p).to(dtype)


def lora_forward_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y [M, N] in x.dtype, s [M, R] fp32)`` for 2-D x ``[M, K]``."""
    x_lora = x.to(lora_a.dtype)
    keep = _keep(x, dropout_p, seed, lora_a.dtype)
    s = ((x_lora * keep if keep is not None else x_lora) @ lora_a.t()).float()
    if keep is not None:
        s *= 1.0 / (1.0 - dropout_p)
    y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    y.addmm_((s * scaling).to(y.dtype), lora_b.t().to(y.dtype))
    return y, s


def lora_backward_torch(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
    need_x: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dX [M, K], dA [R, K], dB [N, R])``, each None unless asked for; 2-D grad_y ``[M, N]``."""
    lora_dtype = lora_a.dtype
    g = grad_y.to(lora_dtype)
    g_b = g @ lora_b  # [M, R]
    db = g.t() @ (s * scaling).to(lora_dtype) if need_b else None
    keep = _keep(x, dropout_p, seed, lora_dtype) if (need_a or need_x) else None
    # dS / (1 - p): the dropout scale rides on the rank-r side.
    ds_scaled = g_b * (scaling / (1.0 - dropout_p))
    dx = da = None
    if need_a:
        x_lora = x.to(lora_dtype)
        da = ds_scaled.t() @ (x_lora * keep if keep is not None else x_lora)
    if need_x:
        dx = grad_y @ weight
        lora = ds_scaled @ lora_a
        dx += (lora * keep if keep is not None else lora).to(dx.dtype)
    return dx, da, db
