"""Second stage of the deterministic weight/bias-gradient reductions: sum per-program partial rows.

A backward kernel writes one fp32 row of partial sums per program and per gradient into a
(k, capacity, N) buffer; this kernel adds the first ``num_rows`` rows in a fixed order, for up to two
gradients (dW and dB) in one launch. No atomics, so the result is the same bit for bit on every run,
and each column's order of additions does not depend on the column block width either.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import interpreted, programs_for

_BLOCK_ROWS = 64
# Column block widths, widest first: 8 fp32 columns are one 32-byte sector per row, the narrowest
# that keeps loads whole. The widest that still fills one wave of the GPU is taken.
_BLOCK_COLS_CHOICES = (64, 32, 16, 8)
_INTERPRETER_BLOCK_COLS = 32
_WARPS = 2


@triton.jit
def _column_sum_kernel(
    Partial,  # (k, capacity, N) fp32, contiguous: gradient g's partial sums are Partial[g, :num_rows]
    OutA,  # (N,) sums of Partial[0], in OutA's dtype
    OutB,  # (N,) sums of Partial[1], in OutB's dtype (not written when k == 1)
    num_rows,
    capacity,
    N,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    which = tl.program_id(1)
    col_ok = cols < N
    base = Partial + which.to(tl.int64) * capacity * N
    acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    for start in range(0, num_rows, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        mask = (rows < num_rows)[:, None] & col_ok[None, :]
        acc += tl.load(base + rows[:, None].to(tl.int64) * N + cols[None, :], mask=mask, other=0.0)
    total = tl.sum(acc, axis=0)
    if which == 0:
        tl.store(OutA + cols, total.to(OutA.dtype.element_ty), mask=col_ok)
    else:
        tl.store(OutB + cols, total.to(OutB.dtype.element_ty), mask=col_ok)


def column_sums_into(partial: torch.Tensor, outs: list[torch.Tensor], num_rows: int | None = None) -> None:
    """``outs[g][:] = partial[g, :num_rows].sum(0)`` in a fixed order, one launch.

    partial: (k, capacity, N) fp32 contiguous with k = len(outs) in {1, 2}; num_rows <= capacity
    (default: all of them); outs: contiguous (N,) tensors.
    """
    k, capacity, n = partial.shape
    num_rows = capacity if num_rows is None else num_rows
    if k != len(outs) or k not in (1, 2) or not partial.is_contiguous() or partial.dtype != torch.float32:
        raise ValueError(f"column_sums_into: need a contiguous fp32 (k, rows, N) partial with k = len(outs) <= 2, "
                         f"got {tuple(partial.shape)} {partial.dtype} and {len(outs)} outputs")
    if not 0 <= num_rows <= capacity:
        raise ValueError(f"column_sums_into: num_rows must be in [0, {capacity}], got {num_rows}")
    for out in outs:
        if out.shape != (n,) or not out.is_contiguous():
            raise ValueError(f"column_sums_into: each output must be a contiguous ({n},), got {tuple(out.shape)}")
    if n == 0:
        return
    args = (partial, outs[0], outs[-1], num_rows, capacity, n)
    block_cols = _INTERPRETER_BLOCK_COLS if interpreted() else _block_cols(args, k, n, partial.device)
    _column_sum_kernel[(triton.cdiv(n, block_cols), k)](*args, BLOCK_ROWS=_BLOCK_ROWS, BLOCK_COLS=block_cols,
                                                         num_warps=_WARPS)


def _block_cols(args: tuple, k: int, n: int, device: torch.device) -> int:
    """The widest column block whose launch fills one wave (by the compiled kernel's occupancy), else
    the narrowest: at BERT widths no width fills an H200, and more programs hide more latency."""
    for block_cols in _BLOCK_COLS_CHOICES:
        programs = k * triton.cdiv(n, block_cols)
        params = dict(BLOCK_ROWS=_BLOCK_ROWS, BLOCK_COLS=block_cols, num_warps=_WARPS)
        if programs_for(_column_sum_kernel, args, params, device, work_items=10**9) <= programs:
            return block_cols
    return _BLOCK_COLS_CHOICES[-1]
