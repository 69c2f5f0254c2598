"""``LayerNorm(dropout(x) + residual)``: BERT's post-LN sublayer output, and its torch reference.

Three layers, as flash-attention, run by :mod:`fastbert.ops._dispatch`'s rules: the host functions of
the kernels in ``fastbert.kernels.layer_norm``, registered as custom ops
``fastbert::dropout_add_layer_norm_fwd`` / ``_bwd`` → an autograd Function that saves only x, residual,
the parameters, the per-row mean/rstd and the dropout seed → the public function, which checks the
input and picks the implementation.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from fastbert import backend
from fastbert._validation import check_floating, check_probability, check_same
from fastbert.kernels.limits import MAX_HIDDEN, dtype_unsupported  # triton-free
from fastbert.ops._dispatch import autocast_dtype, dropout_seed, kernel_module, kernel_op, run_kernel, seed_value


def dropout_add_layer_norm_reference(x, residual, weight, bias, eps=1e-12, dropout_p=0.0):
    """Torch reference: inverted dropout on ``x`` (training semantics), add, LayerNorm over the last dim."""
    h = F.dropout(x, p=dropout_p, training=True) if dropout_p > 0.0 else x
    if residual is not None:
        h = h + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps)


# ---------------------------------------------------------------------------------------------------
# Triton path: host functions (custom ops while compiling) and the autograd Function
# ---------------------------------------------------------------------------------------------------
@kernel_op("dropout_add_layer_norm_fwd")
def _layer_norm_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                    bias: Optional[torch.Tensor], eps: float, dropout_p: float, seed: torch.Tensor,
                    out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y in out_dtype, mean fp32 (rows,), rstd fp32 (rows,)); ``seed``: :func:`dropout_seed`'s."""
    return kernel_module("layer_norm").layer_norm_fwd(x, residual, weight, bias, eps, dropout_p, seed_value(seed),
                                                      out_dtype)


@_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, dropout_p, seed, out_dtype):
    rows = x.numel() // x.shape[-1]
    stats = x.new_empty((rows,), dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype), stats, torch.empty_like(stats)


@kernel_op("dropout_add_layer_norm_bwd", mutates_args=("grad_x", "grad_residual", "grad_weight", "grad_bias"))
def _layer_norm_bwd(grad_out: torch.Tensor, x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                    mean: torch.Tensor, rstd: torch.Tensor, dropout_p: float, seed: torch.Tensor,
                    grad_x: torch.Tensor, grad_residual: Optional[torch.Tensor], grad_weight: torch.Tensor,
                    grad_bias: Optional[torch.Tensor]) -> None:
    kernel_module("layer_norm").layer_norm_bwd(grad_out, x, residual, weight, mean, rstd, dropout_p,
                                               seed_value(seed), grad_x, grad_residual, grad_weight, grad_bias)


@_layer_norm_bwd.register_fake
def _(grad_out, x, residual, weight, mean, rstd, dropout_p, seed, grad_x, grad_residual, grad_weight, grad_bias):
    return None


class _DropoutAddLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, dropout_p, seed, out_dtype):
        y, mean, rstd = _layer_norm_fwd(x, residual, weight, bias, eps, dropout_p, seed, out_dtype)
        ctx.save_for_backward(x, residual, weight, bias, mean, rstd, seed)
        ctx.dropout_p = dropout_p
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, residual, weight, bias, mean, rstd, seed = ctx.saved_tensors
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        # The residual's gradient is the pre-norm sum's gradient: without dropout, and in x's dtype, it
        # is grad_x itself (as for a plain add), so the kernel writes it once.
        separate = residual is not None and (ctx.dropout_p > 0.0 or residual.dtype != x.dtype)
        grad_residual = torch.empty(residual.shape, dtype=residual.dtype, device=x.device) if separate else None
        grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        grad_bias = torch.empty(bias.shape, dtype=bias.dtype, device=bias.device) if bias is not None else None
        _layer_norm_bwd(grad_out, x, residual, weight, mean, rstd, ctx.dropout_p, seed, grad_x, grad_residual,
                        grad_weight, grad_bias)
        if residual is not None and not separate:
            grad_residual = grad_x
        return grad_x, grad_residual, grad_weight, grad_bias, None, None, None, None


def _layer_norm_triton(x, residual, weight, bias, eps, dropout_p, out_dtype):
    return run_kernel(_DropoutAddLayerNorm, _layer_norm_fwd, x, residual, weight, bias, eps, dropout_p,
                      dropout_seed(dropout_p), out_dtype)


def _layer_norm_torch(x, residual, weight, bias, eps, dropout_p, out_dtype):
    return dropout_add_layer_norm_reference(x, residual, weight, bias, eps, dropout_p).to(out_dtype)


# ---------------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------------
def _check_inputs(x, residual, weight, bias, eps, dropout_p, mixed_dtypes: bool) -> float:
    check_floating("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last (hidden) dimension, got shape {tuple(x.shape)}")
    if residual is not None:
        check_floating("residual", residual)
        if not mixed_dtypes:
            check_same("x", x, "residual", residual)
        elif residual.device != x.device or residual.shape != x.shape:
            raise ValueError(f"residual must match x's shape {tuple(x.shape)} and device {x.device}, got "
                             f"{tuple(residual.shape)} on {residual.device}")
    hidden = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None and name == "bias":
            continue
        check_floating(name, p)
        if p.shape != (hidden,):
            raise ValueError(f"{name} must have shape ({hidden},) to match x's last dimension, got {tuple(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}")
    if isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    return check_probability("dropout_p", dropout_p)


def _implementation(x, residual, weight, bias) -> Callable[..., torch.Tensor]:
    """Which implementation of :func:`dropout_add_layer_norm` runs on these inputs: the op's one decision
    point."""
    why_not = dtype_unsupported({"x": x, "residual": residual, "weight": weight, "bias": bias})
    if not why_not and x.shape[-1] > MAX_HIDDEN:
        why_not = f"hidden size {x.shape[-1]} > {MAX_HIDDEN} (the kernel keeps a whole row in registers)"
    if backend.use_triton("dropout_add_layer_norm", x, supported=not why_not, unsupported_reason=why_not):
        return _layer_norm_triton
    return _layer_norm_torch


def dropout_add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                           bias: torch.Tensor | None, eps: float = 1e-12, dropout_p: float = 0.0) -> torch.Tensor:
    """``LayerNorm(dropout(x) + residual)`` over the last dimension.

    x: (..., hidden) float16/bfloat16/float32, any strides; residual: same shape and dtype as x, or
    None (plain LayerNorm); weight: (hidden,); bias: (hidden,) or None. Dropout applies to ``x`` only
    (inverted, scale 1/(1-p)); pass ``dropout_p=0`` in eval (no random numbers are drawn then).
    Returns x's shape in x's dtype; under autocast in float32, as torch autocast runs
    layer_norm (residual may then have another float dtype than x, e.g. an fp32 residual stream).

    The Triton path draws its dropout seed from torch's default CPU generator (``torch.manual_seed``
    reproduces it) and regenerates the mask in the backward. Gradients flow to x, residual, weight, bias.
    """
    autocast = isinstance(x, torch.Tensor) and autocast_dtype(x.device) is not None
    dropout_p = _check_inputs(x, residual, weight, bias, eps, dropout_p, mixed_dtypes=autocast)
    out_dtype = torch.float32 if autocast else x.dtype
    return _implementation(x, residual, weight, bias)(x, residual, weight, bias, float(eps), dropout_p, out_dtype)
