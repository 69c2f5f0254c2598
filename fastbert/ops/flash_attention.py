"""Bidirectional (non-causal) multi-head attention for BERT, padded and variable-length layouts.

Public ops: :func:`attention` on (batch, seqlen, heads, head_dim) with a key-padding mask, and
:func:`attention_varlen` on unpadded (total_tokens, heads, head_dim) with ``cu_seqlens``. Each has its
torch reference beside it (``*_reference``), today also the path without the kernel.

The Triton path (``fastbert.kernels.flash_attention``) comes in three thin layers per layout, run by
:mod:`fastbert.ops._dispatch`'s rules: host functions for the forward and the backward, registered as
custom ops ``fastbert::flash_attention[_varlen]_fwd`` / ``_bwd`` → one ``autograd.Function`` → the
public function, which validates, applies autocast and picks the implementation.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from fastbert import backend
from fastbert._validation import check_floating, check_mask_dtype, check_probability, check_same
from fastbert.kernels import limits  # triton-free
from fastbert.ops._dispatch import (
    autocast_inputs,
    dropout_seed,
    kernel_module,
    kernel_op,
    run_kernel,
    seed_value,
)
from fastbert.ops.padding import check_cu_seqlens


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
# Triton path: host functions (custom ops while compiling) and one autograd Function per layout
# ---------------------------------------------------------------------------------------------------
@kernel_op("flash_attention_fwd")
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: torch.Tensor,
                   key_padding_mask: Optional[torch.Tensor], dropout_p: float, softmax_scale: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out (B, L, H, D), lse fp32 (H, B*L)); ``seed``: :func:`dropout_seed`'s."""
    return kernel_module("flash_attention").forward(q, k, v, key_padding_mask=key_padding_mask,
                                                    softmax_scale=softmax_scale, dropout_p=dropout_p,
                                                    seed=seed_value(seed))


@_attention_fwd.register_fake
def _(q, k, v, seed, key_padding_mask, dropout_p, softmax_scale):
    batch, seqlen, heads, _ = q.shape
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty((heads, batch * seqlen), dtype=torch.float32, device=q.device))


@kernel_op("flash_attention_bwd")
def _attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, seed: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                   dropout_p: float, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernel_module("flash_attention").backward(dout, q, k, v, out, lse, key_padding_mask=key_padding_mask,
                                                     softmax_scale=softmax_scale, dropout_p=dropout_p,
                                                     seed=seed_value(seed))


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, seed, key_padding_mask, dropout_p, softmax_scale):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


@kernel_op("flash_attention_varlen_fwd")
def _attention_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: torch.Tensor,
                          cu_seqlens: torch.Tensor, max_seqlen: int, dropout_p: float, softmax_scale: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out (T, H, D), lse fp32 (H, T)); ``seed``: :func:`dropout_seed`'s."""
    return kernel_module("flash_attention").forward(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                                    softmax_scale=softmax_scale, dropout_p=dropout_p,
                                                    seed=seed_value(seed))


@_attention_varlen_fwd.register_fake
def _(q, k, v, seed, cu_seqlens, max_seqlen, dropout_p, softmax_scale):
    total, heads, _ = q.shape
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty((heads, total), dtype=torch.float32, device=q.device))


@kernel_op("flash_attention_varlen_bwd")
def _attention_varlen_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                          lse: torch.Tensor, seed: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                          dropout_p: float, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernel_module("flash_attention").backward(dout, q, k, v, out, lse, cu_seqlens=cu_seqlens,
                                                     max_seqlen=max_seqlen, softmax_scale=softmax_scale,
                                                     dropout_p=dropout_p, seed=seed_value(seed))


@_attention_varlen_bwd.register_fake
def _(dout, q, k, v, out, lse, seed, cu_seqlens, max_seqlen, dropout_p, softmax_scale):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


class _FlashAttention(torch.autograd.Function):
    """Padded layout. Saves q, k, v, out, the log-sum-exp and the dropout seed; nothing of size L²."""

    @staticmethod
    def forward(ctx, q, k, v, seed, key_padding_mask, dropout_p, softmax_scale):
        out, lse = _attention_fwd(q, k, v, seed, key_padding_mask, dropout_p, softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse, seed, key_padding_mask)
        ctx.dropout_p, ctx.softmax_scale = dropout_p, softmax_scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, seed, key_padding_mask = ctx.saved_tensors
        dq, dk, dv = _attention_bwd(dout, q, k, v, out, lse, seed, key_padding_mask, ctx.dropout_p,
                                    ctx.softmax_scale)
        return dq, dk, dv, None, None, None, None


class _FlashAttentionVarlen(torch.autograd.Function):
    """Unpadded layout; ``max_seqlen`` stays a Python int (no device sync, no graph break)."""

    @staticmethod
    def forward(ctx, q, k, v, seed, cu_seqlens, max_seqlen, dropout_p, softmax_scale):
        out, lse = _attention_varlen_fwd(q, k, v, seed, cu_seqlens, max_seqlen, dropout_p, softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse, seed, cu_seqlens)
        ctx.max_seqlen, ctx.dropout_p, ctx.softmax_scale = max_seqlen, dropout_p, softmax_scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, seed, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _attention_varlen_bwd(dout, q, k, v, out, lse, seed, cu_seqlens, ctx.max_seqlen,
                                           ctx.dropout_p, ctx.softmax_scale)
        return dq, dk, dv, None, None, None, None, None


def _attention_triton(q, k, v, key_padding_mask, dropout_p, softmax_scale):
    return run_kernel(_FlashAttention, _attention_fwd, q, k, v, dropout_seed(dropout_p), key_padding_mask, dropout_p,
                      softmax_scale)


def _attention_varlen_triton(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale):
    return run_kernel(_FlashAttentionVarlen, _attention_varlen_fwd, q, k, v, dropout_seed(dropout_p), cu_seqlens,
                      max_seqlen, dropout_p, softmax_scale)


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
    1/sqrt(head_dim). Returns (batch, seqlen, heads, head_dim) in q's dtype. Under autocast, as torch
    treats matmul and SDPA: q, k, v (unless float64) are cast to the autocast dtype, the attention runs
    and returns in it, and each gradient comes back in its input's dtype. (A model's q, k, v come from
    a Linear, already in that dtype.)

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
    q, k, v = autocast_inputs(q, k, v)
    return _attention_implementation(q)(q, k, v, key_padding_mask, dropout_p, scale)


def _attention_implementation(q: torch.Tensor) -> Callable[..., torch.Tensor]:
    """Which implementation of :func:`attention` runs on q (dtype after autocast): the op's one decision point."""
    if _use_kernel("attention", q):
        return _attention_triton
    return _attention_sdpa


def _sdpa_zeroes_keyless_rows_on_the_cpu() -> bool:
    """Does this torch's CPU SDPA return zeros for a query whose keys are all masked (recent releases),
    rather than NaN? Asked once, at import, on a 1-element input (under torch.compile it could not be)."""
    one = torch.ones(1, 1, 1, 1)
    out = F.scaled_dot_product_attention(one, one, one, attn_mask=torch.zeros(1, 1, 1, 1, dtype=torch.bool))
    return bool(out.eq(0).all())


_SDPA_CPU_ZEROES_KEYLESS_ROWS = _sdpa_zeroes_keyless_rows_on_the_cpu()


def _attention_sdpa(q, k, v, key_padding_mask, dropout_p, scale):
    """:func:`attention` without the kernel: torch's fused SDPA (its CPU flash kernel; on a GPU its own
    kernels), the reference's numbers within rounding. Its dropout is the reference's draw for draw
    where SDPA runs its math path (the CPU with dropout): F.dropout on the probabilities."""
    if key_padding_mask is None:
        return _sdpa(q, k, v, None, dropout_p, scale)
    real = key_padding_mask != 0
    # As the reference: padded keys/values read as zeros, so NaN there cannot leak (SDPA adds the mask
    # to the scores, and 0 * NaN is NaN). torch.where: one pass, half masked_fill's time. On the CPU a
    # batch without padding (a sorted one, often) skips it: reading the mask there costs no sync (but
    # a graph break under torch.compile).
    if q.is_cuda or torch.compiler.is_compiling() or not bool(real.all()):
        zero, where = k.new_zeros(()), real[:, :, None, None]
        k, v = torch.where(where, k, zero), torch.where(where, v, zero)
    return _sdpa(q, k, v, real, dropout_p, scale)


def _sdpa(q, k, v, real, dropout_p, scale):
    """SDPA on (B, L, H, D) inputs whose padded keys and values (``real`` False, (B, L) bool) are zeros."""
    keep = real[:, None, None, :] if real is not None else None  # (B, 1, 1, L): True = attend
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep,
                                         dropout_p=dropout_p, scale=scale).transpose(1, 2)
    if real is not None and (q.is_cuda or not _SDPA_CPU_ZEROES_KEYLESS_ROWS):  # GPU kernels: not asked
        out = out.masked_fill(~real.any(-1)[:, None, None, None], 0)
    return out


def _varlen_positions(cu_seqlens: torch.Tensor, max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions ``b * max_seqlen + j`` of every token in a (batch, max_seqlen) grid, and the grid's mask."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    batch = lengths.numel()
    seq_id = torch.repeat_interleave(torch.arange(batch, device=cu_seqlens.device), lengths)
    offset = torch.arange(seq_id.numel(), device=cu_seqlens.device) - cu_seqlens[:-1].long()[seq_id]
    keep = torch.arange(max_seqlen, device=cu_seqlens.device)[None, :] < lengths[:, None]
    return seq_id * max_seqlen + offset, keep


def _on_padded_grid(attend, q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale):
    """Varlen attention by a padded one: scatter into a (batch, max_seqlen) grid, ``attend``, gather back."""
    batch = cu_seqlens.numel() - 1
    positions, keep = _varlen_positions(cu_seqlens, max_seqlen)

    def to_grid(t):
        grid = t.new_zeros((batch * max_seqlen, *t.shape[1:]))
        grid[positions] = t
        return grid.view(batch, max_seqlen, *t.shape[1:])

    out = attend(to_grid(q), to_grid(k), to_grid(v), keep, dropout_p, softmax_scale)
    return out.reshape(batch * max_seqlen, *q.shape[1:])[positions]


def attention_varlen_reference(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None):
    """Torch reference of :func:`attention_varlen`: scatter into a padded grid, attend, gather back."""
    return _on_padded_grid(attention_reference, q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale)


def _attention_varlen_sdpa(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale):
    # The grid's padding is zeros by construction: straight to SDPA, no second zeroing pass.
    return _on_padded_grid(_sdpa, q, k, v, cu_seqlens, max_seqlen, dropout_p, scale)


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
    q, k, v = autocast_inputs(q, k, v)
    return _attention_varlen_implementation(q)(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale)


def _attention_varlen_implementation(q: torch.Tensor) -> Callable[..., torch.Tensor]:
    """Which implementation of :func:`attention_varlen` runs on q (dtype after autocast): the op's one
    decision point."""
    if _use_kernel("attention_varlen", q):
        return _attention_varlen_triton
    return _attention_varlen_sdpa


# On the CPU's torch path an unpadded encoder runs its token-wise layers (the GEMMs: most of the time) on
# the real tokens only, and each attention on a padded grid: four copies of the tokens per layer. Below
# this much padding the copies cost about what the padding saved. Measured on patched MiniLM-L6, batches
# of 32 x 48, 2 cores, unpadded vs padded: 0.96x at 5 % padding, 1.03x at 10 %, 1.08x at 15 %, 1.43x
# at 30 % (the rule keeps a margin: never slower).
CPU_UNPAD_MIN_PADDING = 0.15


def varlen_preferred(hidden: torch.Tensor, head_dim: int, attention_mask: torch.Tensor | None = None) -> bool:
    """Should a model run unpadded? Where :func:`attention_varlen` runs the Triton kernel on heads of
    ``head_dim`` cut from ``hidden`` (the kernel skips padding: dropping it always pays); and on CPU
    tensors, where the (batch, seqlen) ``attention_mask`` (read without a device sync there) is at least
    :data:`CPU_UNPAD_MIN_PADDING` padding (not under torch.compile). On a GPU without the kernel, never: the
    torch path pads internally. Never raises (an impossible forced backend is reported by the op itself)."""
    name = backend.current()
    if name != "torch" and not kernel_unsupported_reason(head_dim, hidden.dtype):
        if name == "auto" and hidden.is_cuda and backend.triton_installed():
            return True
        if name == "triton" and backend.triton_can_run_on(hidden):
            return True  # the kernel, the interpreter's on CPU tensors included
    if (hidden.device.type == "cpu" and attention_mask is not None and attention_mask.numel()
            and not torch.compiler.is_compiling()):  # compiled: padded, as reading the mask breaks the graph
        return int(attention_mask.count_nonzero()) <= (1 - CPU_UNPAD_MIN_PADDING) * attention_mask.numel()
    return False
