"""``gelu(x + bias)`` with the exact erf GELU (HF "gelu"), and its torch reference.

Three layers, as flash-attention: custom ops ``fastbert::bias_gelu_fwd`` / ``_bwd`` (the Triton
launchers, opaque to ``torch.compile`` through their fake implementations; eager calls skip the
custom-op dispatch) → an autograd Function that saves x and bias (the backward recomputes x + bias) →
the public function, which checks the input and picks the Triton path or the torch reference
(:mod:`fastbert.backend`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastbert import backend
from fastbert._validation import check_floating
from fastbert.kernels.limits import dtype_unsupported  # triton-free
from fastbert.ops._triton import kernel_module



def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.gelu(x + bias)


@torch.library.custom_op("fastbert::bias_gelu_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return kernel_module("gelu").bias_gelu_fwd(x, bias)


@_fwd_op.register_fake
def _fwd_fake(x, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("fastbert::bias_gelu_bwd", mutates_args=("grad_x", "grad_bias"))
def _bwd_op(grad_out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, grad_x: torch.Tensor,
            grad_bias: torch.Tensor) -> None:
    kernel_module("gelu").bias_gelu_bwd(grad_out, x, bias, grad_x, grad_bias)


@_bwd_op.register_fake
def _bwd_fake(grad_out, x, bias, grad_x, grad_bias):
    return None


def _forward(x, bias):
    """The forward kernel: through the custom op while torch.compile traces, straight to the launcher in
    eager mode, where a custom op's Python dispatch would cost about as much as the kernel at BERT sizes."""
    if torch.compiler.is_compiling():
        return _fwd_op(x, bias)
    return kernel_module("gelu").bias_gelu_fwd(x, bias)


def _backward(grad_out, x, bias, grad_x, grad_bias):
    """The backward kernel, dispatched as :func:`_forward`."""
    if torch.compiler.is_compiling():
        return _bwd_op(grad_out, x, bias, grad_x, grad_bias)
    return kernel_module("gelu").bias_gelu_bwd(grad_out, x, bias, grad_x, grad_bias)


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, bias):
        ctx.save_for_backward(x, bias)
        return _forward(x, bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        x, bias = ctx.saved_tensors
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        grad_bias = torch.empty(bias.shape, dtype=bias.dtype, device=bias.device)
        _backward(grad_out, x, bias, grad_x, grad_bias)
        return grad_x, grad_bias


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(x + bias)``, exact erf form (HF "gelu").

    x: (..., n) float16/bfloat16/float32, any strides; bias: (n,) float (may differ from x's dtype,
    e.g. an fp32 bias under autocast). The kernel computes in fp32; returns x's shape and dtype.
    Gradients flow to x and bias.
    """
    check_floating("x", x)
    check_floating("bias", bias)
    if x.dim() < 1 or bias.shape != (x.shape[-1],):
        raise ValueError(f"bias must have shape ({x.shape[-1] if x.dim() else '?'},) to match x's last dimension, "
                         f"got {tuple(bias.shape)}")
    if bias.device != x.device:
        raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    why_not = dtype_unsupported({"x": x, "bias": bias})
    if backend.use_triton("bias_gelu", x, supported=not why_not, unsupported_reason=why_not):
        if torch.is_grad_enabled() and (x.requires_grad or bias.requires_grad):
            return _BiasGelu.apply(x, bias)
        return _forward(x, bias)  # inference: no autograd node, no saved tensors
    return bias_gelu_reference(x, bias).to(x.dtype)
