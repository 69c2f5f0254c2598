"""Bidirectional (non-causal) multi-head attention for BERT, padded and variable-length layouts.

Public ops: :func:`attention` on (batch, seqlen, heads, head_dim) with a key-padding mask, and
:func:`attention_varlen` on unpadded (total_tokens, heads, head_dim) with ``cu_seqlens``. Each has its
torch reference beside it (``*_reference``), which is also the CPU path.
"""
from __future__ import annotations

import math

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


def _check_scale(softmax_scale: float | None, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be a positive float or None, got {softmax_scale!r}")
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
    # No Triton kernel yet: under FASTBERT_BACKEND=triton this raises a clear error.
    backend.use_triton("attention", q, has_kernel=False)
    return attention_reference(q, k, v, key_padding_mask, dropout_p, softmax_scale)


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
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    if value_checks_cheap(cu_seqlens):
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
    """
    _check_qkv(q, k, v, 3, "(total_tokens, heads, head_dim)")
    dropout_p = check_probability("dropout_p", dropout_p)
    check_cu_seqlens(cu_seqlens, max_seqlen, q.shape[0], q.device)
    backend.use_triton("attention_varlen", q, has_kernel=False)
    return attention_varlen_reference(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale)


def varlen_preferred(hidden: torch.Tensor) -> bool:
    """Should a model run unpadded? Only when a fused varlen kernel would take ``hidden``: the torch
    reference pads internally, so unpadding buys nothing there."""
    return False
