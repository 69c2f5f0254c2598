"""``LayerNorm(dropout(x) + residual)``: BERT's post-LN sublayer output, and its torch reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastbert import backend
from fastbert._validation import check_floating, check_probability, check_same


def dropout_add_layer_norm_reference(x, residual, weight, bias, eps=1e-12, dropout_p=0.0):
    """Torch reference: inverted dropout on ``x`` (training semantics), add, LayerNorm over the last dim."""
    h = F.dropout(x, p=dropout_p, training=True) if dropout_p > 0.0 else x
    if residual is not None:
        h = h + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps)


def dropout_add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                           bias: torch.Tensor | None, eps: float = 1e-12, dropout_p: float = 0.0) -> torch.Tensor:
    """``LayerNorm(dropout(x) + residual)`` over the last dimension.

    x: (..., hidden) float16/bfloat16/float32; residual: same shape and dtype as x, or None;
    weight, bias: (hidden,). Dropout applies to ``x`` only (scale 1/(1-p)); pass ``dropout_p=0`` in eval.
    Returns x's shape and dtype.
    """
    check_floating("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last (hidden) dimension, got shape {tuple(x.shape)}")
    if residual is not None:
        check_floating("residual", residual)
        check_same("x", x, "residual", residual)
    hidden = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None and name == "bias":
            continue
        check_floating(name, p)
        if p.shape != (hidden,):
            raise ValueError(f"{name} must have shape ({hidden},) to match x's last dimension, got {tuple(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    dropout_p = check_probability("dropout_p", dropout_p)
    # No Triton kernel yet: under FASTBERT_BACKEND=triton this raises a clear error.
    backend.use_triton("dropout_add_layer_norm", x, has_kernel=False)
    return dropout_add_layer_norm_reference(x, residual, weight, bias, eps, dropout_p)
