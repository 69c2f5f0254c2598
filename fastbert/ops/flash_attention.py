"""Bidirectional (non-causal) multi-head attention for BERT, padded and variable-length layouts.

Public ops: :func:`attention` on (batch, seqlen, heads, head_dim) with a key-padding mask, and
:func:`attention_varlen` on unpadded (total_tokens, heads, head_dim) with ``cu_seqlens``. Each has its
torch reference beside it (``*_reference``), which is also the CPU path.

The Triton path (``fastbert.kernels.flash_attention``) comes in three thin layers per layout: a
registered custom op for the forward and one for the backward (``torch.library.custom_op`` with fake
implementations, so ``torch.compile`` traces them without graph breaks) → one ``autograd.Function``
→ the public function, which validates and dispatches through :func:`fastbert.backend.use_triton`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from fastbert import backend
from fastbert._validation import (
    DtypeError,
    check_floating,
    check_mask_dtype,
    check_probability,
    check_same,
    value_checks_cheap,
)
from fastbert.kernels import limits  # triton-free
from fastbert.ops._triton import philox_seed


def kernel_unsupported_reason(head_dim: int, dtype: torch.dtype) -> str:
    """Why the Triton kernel cannot take this head dim / dtype ("" when it can)."""
    if dtype not in limits.KERNEL_DTYPES:
        return f"dtype {dtype} (the kernel takes float16, bfloat16 or float32)"
    if head_dim % limits.ATTENTION_HEAD_DIM_MULTIPLE or head_dim > limits.ATTENTION_MAX_HEAD_DIM:
        return (f"head_dim {head_dim} (the kernel takes multiples of {limits.ATTENTION_HEAD_DIM_MULTIPLE} up to "
                f"{limits.ATTENTION_MAX_HEAD_DIM}: 8, 16, 32, 40, 64, 80, 96, 128, ...)")
    return ""


def _use_kernel(op: str, q: torch.Tensor) -> bool:
    reason = kernel_unsupported_reason(q.shape[-1], q.dtype)
    return backend.use_triton(op, q, supported=not reason, unsupported_reason=reason)


def _kernels():
    # Imported on first use: `import fastbert` must not import triton.
    from fastbert.kernels import flash_attention

    return flash_attention


def _check_scale(softmax_scale: float | None, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
            or not 0 < softmax_scale < math.inf):  # inf would turn every score into inf - inf = NaN
        raise ValueError(f"softmax_scale must be a finite positive float or None, got {softmax_scale!r}")
    return float(softmax_scale)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ndim: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_floating(name, t)
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    check_same("q", q, "k", k)
    check_same("q", q, "v", v)
    if q.shape[-1] == 0 or q.shape[-2] == 0:
        raise ValueError(f"q must have at least one head and head_dim >= 1, got shape {tuple(q.shape)}")


def _masked_softmax_attention(q, k, v, keep, dropout_p, scale):
    """q, k, v: (B, H, L, D); keep: (B, 1, 1, L) bool or None. Softmax statistics in fp32."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if keep is not None:
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    if keep is not None:
        # A query whose keys are all padding attends to nothing: zero output, not a uniform average.
        probs = probs * keep
    probs = probs.to(q.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, v)


# ---------------------------------------------------------------------------------------------------
# Triton path: custom ops (opaque to torch.compile, with fake implementations) and autograd Functions
# ---------------------------------------------------------------------------------------------------
def _seed_tensor(dropout_p: float) -> torch.Tensor:
    """The dropout seed as a CPU int64 tensor, so the backward op can take it (0 when there is no dropout)."""
    return torch.tensor([philox_seed() if dropout_p > 0.0 else 0], dtype=torch.int64)


@torch.library.custom_op("fastbert::flash_attention_fwd", mutates_args=())
def _flash_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                         dropout_p: float, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out (B, L, H, D), lse fp32 (H, B*L), seed int64 (1,) on the CPU)."""
    # The seed is drawn inside the op, so a compiled graph draws a fresh one on every call.
    seed = _seed_tensor(dropout_p)
    out, lse = _kernels().forward(q, k, v, key_padding_mask=key_padding_mask, softmax_scale=softmax_scale,
                                  dropout_p=dropout_p, seed=int(seed[0]))
    return out, lse, seed


@_flash_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, dropout_p, softmax_scale):
    batch, seqlen, heads, _ = q.shape
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty((heads, batch * seqlen), dtype=torch.float32, device=q.device),
            torch.empty((1,), dtype=torch.int64))


@torch.library.custom_op("fastbert::flash_attention_bwd", mutates_args=())
def _flash_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         lse: torch.Tensor, seed: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                         dropout_p: float, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().backward(dout, q, k, v, out, lse, key_padding_mask=key_padding_mask,
                               softmax_scale=softmax_scale, dropout_p=dropout_p, seed=int(seed[0]))


@_flash_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, seed, key_padding_mask, dropout_p, softmax_scale):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


@torch.library.custom_op("fastbert::flash_attention_varlen_fwd", mutates_args=())
def _flash_attention_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                                max_seqlen: int, dropout_p: float, softmax_scale: float
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out (T, H, D), lse fp32 (H, T), seed int64 (1,) on the CPU)."""
    seed = _seed_tensor(dropout_p)
    out, lse = _kernels().forward(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                  softmax_scale=softmax_scale, dropout_p=dropout_p, seed=int(seed[0]))
    return out, lse, seed


@_flash_attention_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale):
    total, heads, _ = q.shape
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty((heads, total), dtype=torch.float32, device=q.device),
            torch.empty((1,), dtype=torch.int64))


@torch.library.custom_op("fastbert::flash_attention_varlen_bwd", mutates_args=())
def _flash_attention_varlen_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                out: torch.Tensor, lse: torch.Tensor, seed: torch.Tensor, cu_seqlens: torch.Tensor,
                                max_seqlen: int, dropout_p: float, softmax_scale: float
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().backward(dout, q, k, v, out, lse, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                               softmax_scale=softmax_scale, dropout_p=dropout_p, seed=int(seed[0]))


@_flash_attention_varlen_bwd.register_fake
def _(dout, q, k, v, out, lse, seed, cu_seqlens, max_seqlen, dropout_p, softmax_scale):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


class _FlashAttention(torch.autograd.Function):
    """Padded layout. Saves q, k, v, out, the log-sum-exp and the dropout seed; nothing of size L²."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, dropout_p, softmax_scale):
        out, lse, seed = torch.ops.fastbert.flash_attention_fwd(q, k, v, key_padding_mask, dropout_p, softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse, seed, key_padding_mask)
        ctx.dropout_p, ctx.softmax_scale = dropout_p, softmax_scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, seed, key_padding_mask = ctx.saved_tensors
        dq, dk, dv = torch.ops.fastbert.flash_attention_bwd(dout, q, k, v, out, lse, seed, key_padding_mask,
                                                            ctx.dropout_p, ctx.softmax_scale)
        return dq, dk, dv, None, None, None


class _FlashAttentionVarlen(torch.autograd.Function):
    """Unpadded layout; ``max_seqlen`` stays a Python int (no device sync, no graph break)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale):
        out, lse, seed = torch.ops.fastbert.flash_attention_varlen_fwd(q, k, v, cu_seqlens, max_seqlen, dropout_p,
                                                                       softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse, seed, cu_seqlens)
        ctx.max_seqlen, ctx.dropout_p, ctx.softmax_scale = max_seqlen, dropout_p, softmax_scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, seed, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = torch.ops.fastbert.flash_attention_varlen_bwd(dout, q, k, v, out, lse, seed, cu_seqlens,
                                                                   ctx.max_seqlen, ctx.dropout_p, ctx.softmax_scale)
        return dq, dk, dv, None, None, None, None


# ---------------------------------------------------------------------------------------------------
# Public ops and their torch references
# ---------------------------------------------------------------------------------------------------
def attention_reference(q, k, v, key_padding_mask=None, dropout_p=0.0, softmax_scale=None):
    """Torch reference of :func:`attention` (matmul, masked fp32 softmax, dropout, matmul)."""
    scale = _check_scale(softmax_scale, q.shape[-1])
    keep = None
    if key_padding_mask is not None:
        real = (key_padding_mask != 0)[:, :, None, None]
        # Padded keys/values are read as zeros, so garbage (even NaN) there cannot leak into outputs.
        k, v = k.masked_fill(~real, 0), v.masked_fill(~real, 0)
        keep = real[:, :, 0, 0][:, None, None, :]
    out = _masked_softmax_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), keep, dropout_p, scale)
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, softmax_scale: float | None = None) -> torch.Tensor:
    """Softmax(q kᵀ · scale) v over all (non-padded) keys: BERT's bidirectional self-attention.

    q, k, v: (batch, seqlen, heads, head_dim), float16/bfloat16/float32, same shape and device.
    key_padding_mask: (batch, seqlen) bool or int, True/1 = real token (HF's attention_mask), or None.
    Padded keys get zero weight; a query row whose keys are all padding returns zeros.
    dropout_p: dropout on the attention probabilities (pass 0.0 in eval). softmax_scale: default
    1/sqrt(head_dim). Returns (batch, seqlen, heads, head_dim) in q's dtype.

    The Triton kernel (CUDA tensors under the auto backend) takes head_dim a multiple of 8 up to 128
    and float16/bfloat16/float32; other inputs take the torch reference (or raise a ValueError under
    FASTBERT_BACKEND=triton). Its dropout draws a Philox seed from torch's CPU generator (reproducible
    under ``torch.manual_seed``), and its backward is deterministic: no atomics, each gradient row is
    written by one program, so the same inputs give bit-identical gradients.
    """
    _check_qkv(q, k, v, 4, "(batch, seqlen, heads, head_dim)")
    dropout_p = check_probability("dropout_p", dropout_p)
    if key_padding_mask is not None:
        check_mask_dtype("key_padding_mask", key_padding_mask)
        if key_padding_mask.shape != q.shape[:2]:
            raise ValueError(
                f"key_padding_mask must have shape (batch, seqlen) = {tuple(q.shape[:2])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    scale = _check_scale(softmax_scale, q.shape[-1])
    if _use_kernel("attention", q):
        return _FlashAttention.apply(q, k, v, key_padding_mask, dropout_p, scale)
    return attention_reference(q, k, v, key_padding_mask, dropout_p, scale)


def check_cu_seqlens(cu_seqlens: torch.Tensor, max_seqlen: int, total_tokens: int, device: torch.device) -> None:
    """Validate varlen metadata; the value checks run where they are free (CPU) or in debug mode."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise DtypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D of length batch + 1 >= 2, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}")
    # A SymInt when torch.compile treats max_seqlen as dynamic (it changes from batch to batch).
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    # No sequence is longer than all the tokens together; a larger max_seqlen would only size the torch
    # path's padded grid and the kernel's launch grid (2**40 would allocate or launch without end).
    if max_seqlen > total_tokens:
        raise ValueError(f"max_seqlen ({max_seqlen}) is larger than the number of tokens in q ({total_tokens}); "
                         "pass the longest sequence length")
    # Value checks read the data (a graph break under torch.compile): skipped while compiling.
    if value_checks_cheap(cu_seqlens) and not torch.compiler.is_compiling():
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if int(cu_seqlens[0]) != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {int(cu_seqlens[0])}")
        if bool((lengths < 0).any()):
            raise ValueError("cu_seqlens must be non-decreasing")
        if int(cu_seqlens[-1]) != total_tokens:
            raise ValueError(f"cu_seqlens[-1] ({int(cu_seqlens[-1])}) must equal the number of tokens in q ({total_tokens})")
        if lengths.numel() and int(lengths.max()) > max_seqlen:
            raise ValueError(f"max_seqlen ({max_seqlen}) is smaller than the longest sequence ({int(lengths.max())})")


def _varlen_positions(cu_seqlens: torch.Tensor, max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions ``b * max_seqlen + j`` of every token in a (batch, max_seqlen) grid, and the grid's mask."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    batch = lengths.numel()
    seq_id = torch.repeat_interleave(torch.arange(batch, device=cu_seqlens.device), lengths)
    offset = torch.arange(seq_id.numel(), device=cu_seqlens.device) - cu_seqlens[:-1].long()[seq_id]
    keep = torch.arange(max_seqlen, device=cu_seqlens.device)[None, :] < lengths[:, None]
    return seq_id * max_seqlen + offset, keep


def attention_varlen_reference(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None):
    """Torch reference of :func:`attention_varlen`: scatter into a padded grid, attend, gather back."""
    batch = cu_seqlens.numel() - 1
    positions, keep = _varlen_positions(cu_seqlens, max_seqlen)

    def to_grid(t):
        grid = t.new_zeros((batch * max_seqlen, *t.shape[1:]))
        grid[positions] = t
        return grid.view(batch, max_seqlen, *t.shape[1:])

    out = attention_reference(to_grid(q), to_grid(k), to_grid(v), keep, dropout_p, softmax_scale)
    return out.reshape(batch * max_seqlen, *q.shape[1:])[positions]


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     dropout_p: float = 0.0, softmax_scale: float | None = None) -> torch.Tensor:
    """:func:`attention` on unpadded sequences stored back to back.

    q, k, v: (total_tokens, heads, head_dim); cu_seqlens: int32 (batch + 1,) prefix sums of the
    sequence lengths (``cu_seqlens[-1] == total_tokens``); max_seqlen: the longest length, a Python int
    (no device sync needed). Tokens attend only within their own sequence. Returns (total, heads, head_dim).
    Kernel limits, dropout and determinism as :func:`attention`; with the same seed and
    ``max_seqlen`` equal to the padded length (allowed while it is at most ``total_tokens``), both
    layouts draw the same dropout mask.
    ``max_seqlen`` must not exceed ``total_tokens`` (always checked: it sizes allocations and the launch
    grid). The values of ``cu_seqlens`` (start 0, non-decreasing, last == total, max length <= max_seqlen) are
    checked on CPU tensors, and on CUDA ones only under FASTBERT_DEBUG=1 (the check syncs the device).
    ``softmax_scale`` must be finite and positive.
    """
    _check_qkv(q, k, v, 3, "(total_tokens, heads, head_dim)")
    dropout_p = check_probability("dropout_p", dropout_p)
    check_cu_seqlens(cu_seqlens, max_seqlen, q.shape[0], q.device)
    scale = _check_scale(softmax_scale, q.shape[-1])
    if _use_kernel("attention_varlen", q):
        return _FlashAttentionVarlen.apply(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale)
    return attention_varlen_reference(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale)


def varlen_preferred(hidden: torch.Tensor, head_dim: int) -> bool:
    """Should a model run unpadded? Exactly when :func:`attention_varlen` would run the Triton kernel
    on heads of ``head_dim`` cut from ``hidden``: the torch reference pads internally, so unpadding
    buys nothing there. Never raises (an impossible forced backend is reported by the op itself)."""
    name = backend.current()
    if name == "torch" or kernel_unsupported_reason(head_dim, hidden.dtype):
        return False
    if name == "auto":
        return hidden.is_cuda and backend.triton_installed()
    return backend.triton_can_run_on(hidden)
