"""``gelu(x + bias)`` with the exact erf GELU (HF "gelu"), and its torch reference.

Three layers, as flash-attention, run by :mod:`fastbert.ops._dispatch`'s rules: the host functions of
the kernels in ``fastbert.kernels.gelu``, registered as custom ops ``fastbert::bias_gelu_fwd`` /
``_bwd`` → an autograd Function that saves x and bias (the backward recomputes x + bias) → the public
function, which checks the input and picks the implementation.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from fastbert import backend
from fastbert._validation import check_floating
from fastbert.kernels.limits import dtype_unsupported  # triton-free
from fastbert.ops._dispatch import kernel_module, kernel_op, run_kernel


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.gelu(x + bias)


# ---------------------------------------------------------------------------------------------------
# Triton path: host functions (custom ops while compiling) and the autograd Function
# ---------------------------------------------------------------------------------------------------
@kernel_op("bias_gelu_fwd")
def _bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return kernel_module("gelu").bias_gelu_fwd(x, bias)


@_bias_gelu_fwd.register_fake
def _(x, bias):
    return x.new_empty(x.shape)


@kernel_op("bias_gelu_bwd", mutates_args=("grad_x", "grad_bias"))
def _bias_gelu_bwd(grad_out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, grad_x: torch.Tensor,
                   grad_bias: torch.Tensor) -> None:
    kernel_module("gelu").bias_gelu_bwd(grad_out, x, bias, grad_x, grad_bias)


@_bias_gelu_bwd.register_fake
def _(grad_out, x, bias, grad_x, grad_bias):
    return None


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        ctx.save_for_backward(x, bias)
        return _bias_gelu_fwd(x, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, bias = ctx.saved_tensors
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        grad_bias = torch.empty(bias.shape, dtype=bias.dtype, device=bias.device)
        _bias_gelu_bwd(grad_out, x, bias, grad_x, grad_bias)
        return grad_x, grad_bias


def _bias_gelu_triton(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return run_kernel(_BiasGelu, _bias_gelu_fwd, x, bias)


# ---------------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------------
def _implementation(x: torch.Tensor, bias: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Which implementation of :func:`bias_gelu` runs on these inputs: the op's one decision point."""
    why_not = dtype_unsupported({"x": x, "bias": bias})
    if backend.use_triton("bias_gelu", x, supported=not why_not, unsupported_reason=why_not):
        return _bias_gelu_triton
    return bias_gelu_reference


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(x + bias)``, exact erf form (HF "gelu").

    x: (..., n) float16/bfloat16/float32, any strides; bias: (n,) float (may differ from x's dtype,
    e.g. an fp32 bias under autocast). The kernel computes in fp32; returns x's shape and dtype, under
    autocast too (gelu is not an autocast op). Gradients flow to x and bias.
    """
    check_floating("x", x)
    check_floating("bias", bias)
    if x.dim() < 1 or bias.shape != (x.shape[-1],):
        raise ValueError(f"bias must have shape ({x.shape[-1] if x.dim() else '?'},) to match x's last dimension, "
                         f"got {tuple(bias.shape)}")
    if bias.device != x.device:
        raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    return _implementation(x, bias)(x, bias).to(x.dtype)


def dense_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``gelu(x Wᵀ + b)``, exact erf form: BERT's intermediate Linear and its activation.

    Where :func:`bias_gelu`'s kernel runs, the GEMM runs without its bias and the kernel adds it. Elsewhere
    the GEMM adds it (addmm) and torch's GELU follows: the same numbers within rounding, and one pass
    over the (tokens, intermediate) activations fewer than a separate bias add.
    """
    if bias is None or _implementation(x, bias) is bias_gelu_reference:
        return F.gelu(F.linear(x, weight, bias))
    h = F.linear(x, weight)
    return _bias_gelu_triton(h, bias).to(h.dtype)
