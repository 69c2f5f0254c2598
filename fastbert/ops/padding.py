"""Padding ↔ unpadded ("varlen") layout: drop the padding once before the encoder, restore it once after.

The unpadded layout holds all real tokens back to back, ``(total_tokens, ...)``, described by
``cu_seqlens`` (int32 prefix sums of the per-sequence lengths, length batch+1) and ``max_seqlen``;
:func:`check_cu_seqlens` is the one check of that metadata (the varlen attention's and the models').
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastbert import _extension
from fastbert._validation import DtypeError, check_mask_dtype, check_tensor, value_checks_cheap

BAD_MASK_VALUES = "attention_mask values must be 0 or 1 (1 = real token)"


def _check_mask(attention_mask: torch.Tensor) -> None:
    check_mask_dtype("attention_mask", attention_mask)
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be 2-D (batch, seqlen), got shape {tuple(attention_mask.shape)}")


def unpad_metadata_reference(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Torch reference of :func:`unpad_metadata` (works on any device).

    Like the C++ path it rejects a mask value other than 0 and 1 (ValueError). On CUDA that check costs
    no extra device sync: its flag comes back in the one device-to-host copy that ``max_seqlen`` needs.
    """
    _check_mask(attention_mask)
    real = attention_mask != 0
    seqlens = real.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(real.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    if not seqlens.numel():
        return indices, cu_seqlens, 0
    invalid = (real & (attention_mask != 1)).any()
    max_seqlen, bad_values = torch.stack((seqlens.max().to(torch.int64), invalid.to(torch.int64))).tolist()
    if bad_values:
        raise ValueError(BAD_MASK_VALUES)
    return indices, cu_seqlens, max_seqlen


def unpad_metadata(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(indices, cu_seqlens, max_seqlen)`` of the real tokens of a (batch, seqlen) 0/1 mask.

    indices: int64 (total,) flat positions ``b * seqlen + t``; cu_seqlens: int32 (batch + 1,);
    max_seqlen: Python int. A mask value other than 0 and 1 is a ValueError on every device.

    CPU masks go through the C++ extension: one pass over the mask for the metadata, after one torch
    check of the values (a ValueError, not the extension's own RuntimeError), instead of the
    reference's chain of ops; the data loader calls this on every batch. CUDA masks, or a build without
    the extension, use the torch reference (see there for its sync-free value check).
    """
    _check_mask(attention_mask)
    if attention_mask.device.type == "cpu" and _extension.is_available():
        if attention_mask.numel() and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError(BAD_MASK_VALUES)
        indices, cu_seqlens, max_seqlen = _extension.load().unpad_metadata(attention_mask)
        return indices, cu_seqlens, int(max_seqlen)
    return unpad_metadata_reference(attention_mask)


class _GatherRows(torch.autograd.Function):
    """``x[indices]`` along dim 0; backward scatters with index_copy (indices are unique → deterministic)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(indices)
        ctx.num_rows = x.shape[0]
        return x.index_select(0, indices)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (indices,) = ctx.saved_tensors
        grad_x = grad_out.new_zeros((ctx.num_rows, *grad_out.shape[1:]))
        grad_x.index_copy_(0, indices, grad_out)
        return grad_x, None


class _ScatterRows(torch.autograd.Function):
    """A zero tensor of ``num_rows`` rows with ``x`` written at ``indices``; backward gathers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, indices: torch.Tensor, num_rows: int) -> torch.Tensor:
        ctx.save_for_backward(indices)
        out = x.new_zeros((num_rows, *x.shape[1:]))
        out.index_copy_(0, indices, x)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (indices,) = ctx.saved_tensors
        return grad_out.index_select(0, indices), None, None


def unpad_input(hidden: torch.Tensor, attention_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Drop the padding of ``hidden``.

    hidden: (batch, seqlen, ...) any dtype; attention_mask: (batch, seqlen) bool/int, 1 = real token.
    Returns ``(hidden_unpadded (total, ...), indices int64 (total,), cu_seqlens int32 (batch+1,),
    max_seqlen int)``. Differentiable in ``hidden``.
    """
    check_tensor("hidden", hidden)
    _check_mask(attention_mask)
    if hidden.dim() < 2 or hidden.shape[:2] != attention_mask.shape:
        raise ValueError(
            f"hidden must start with the mask's (batch, seqlen) = {tuple(attention_mask.shape)}, "
            f"got shape {tuple(hidden.shape)}"
        )
    indices, cu_seqlens, max_seqlen = unpad_metadata(attention_mask)
    indices = indices.to(hidden.device, non_blocking=True)
    cu_seqlens = cu_seqlens.to(hidden.device, non_blocking=True)
    flat = hidden.reshape(-1, *hidden.shape[2:])
    return _GatherRows.apply(flat, indices), indices, cu_seqlens, max_seqlen


def _check_indices_in_range(indices: torch.Tensor, num_rows: int) -> None:
    """Indices must address one of ``num_rows`` token slots. Checked where reading them is free (CPU
    tensors) or asked for (FASTBERT_DEBUG=1): on CUDA the check is a device sync. Not while compiling
    (reading values would break the graph), as the attention ops' checks."""
    if value_checks_cheap(indices) and indices.numel() and not torch.compiler.is_compiling():
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= num_rows:
            raise ValueError(f"indices must be in [0, {num_rows}) (the batch's token slots), got values in "
                             f"[{low}, {high}]")


def check_cu_seqlens(cu_seqlens: torch.Tensor, max_seqlen: int, total_tokens: int, device: torch.device, *,
                     tokens: str = "q", non_empty: bool = False) -> None:
    """Validate varlen metadata over ``total_tokens`` tokens on ``device`` (held by the tensor named
    ``tokens``, for the messages). ``non_empty``: every sequence holds a token (cu_seqlens strictly
    increasing). The value checks run where they are free (CPU) or in debug mode, not while compiling."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise DtypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D of length batch + 1 >= 2, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but {tokens} is on {device}")
    # A SymInt when torch.compile treats max_seqlen as dynamic (it changes from batch to batch).
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    # No sequence is longer than all the tokens together; a larger max_seqlen would only size the torch
    # path's padded grid and the kernel's launch grid (2**40 would allocate or launch without end).
    if max_seqlen > total_tokens:
        raise ValueError(f"max_seqlen ({max_seqlen}) is larger than the number of tokens in {tokens} "
                         f"({total_tokens}); pass the longest sequence length")
    # Value checks read the data (a graph break under torch.compile): skipped while compiling.
    if value_checks_cheap(cu_seqlens) and not torch.compiler.is_compiling():
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if int(cu_seqlens[0]) != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {int(cu_seqlens[0])}")
        if bool((lengths < 0).any()):
            raise ValueError("cu_seqlens must be non-decreasing")
        if non_empty and bool((lengths == 0).any()):
            raise ValueError("cu_seqlens must describe non-empty sequences (strictly increasing)")
        if int(cu_seqlens[-1]) != total_tokens:
            raise ValueError(f"cu_seqlens[-1] ({int(cu_seqlens[-1])}) must equal the number of tokens in {tokens} "
                             f"({total_tokens})")
        if lengths.numel() and int(lengths.max()) > max_seqlen:
            raise ValueError(f"max_seqlen ({max_seqlen}) is smaller than the longest sequence ({int(lengths.max())})")


def gather_tokens(hidden: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The rows of ``hidden`` (batch, seqlen, ...) at flat positions ``indices`` → (total, ...), as
    :func:`unpad_input` does with metadata computed elsewhere (e.g. by the data loader). Differentiable."""
    check_tensor("hidden", hidden)
    check_tensor("indices", indices)
    if indices.dtype != torch.int64 or indices.dim() != 1:
        raise ValueError(f"indices must be 1-D int64, got {indices.dtype} of shape {tuple(indices.shape)}")
    flat = hidden.reshape(-1, *hidden.shape[2:])
    _check_indices_in_range(indices, flat.shape[0])
    return _GatherRows.apply(flat, indices)


def pad_input(hidden_unpadded: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of :func:`unpad_input`: (total, ...) → (batch, seqlen, ...), zeros at padding."""
    check_tensor("hidden_unpadded", hidden_unpadded)
    check_tensor("indices", indices)
    if indices.dim() != 1 or indices.shape[0] != hidden_unpadded.shape[0]:
        raise ValueError(
            f"indices must be 1-D with one entry per row of hidden_unpadded ({hidden_unpadded.shape[0]}), "
            f"got shape {tuple(indices.shape)}"
        )
    if indices.dtype != torch.int64:
        raise ValueError(f"indices must be int64, got {indices.dtype}")
    _check_indices_in_range(indices, batch * seqlen)
    out = _ScatterRows.apply(hidden_unpadded, indices, batch * seqlen)
    return out.view(batch, seqlen, *hidden_unpadded.shape[1:])
