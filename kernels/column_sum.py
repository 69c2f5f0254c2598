"""Second stage of the deterministic weight/bias-gradient reductions: sum per-program partial rows.

A backward kernel writes one fp32 row of partial sums per program, (programs, N); this kernel adds
those rows in a fixed order. No atomics, so the result is the same bit for bit on every run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_ROWS = 32
_BLOCK_COLS = 128


@triton.jit
def _column_sum_kernel(
    Partial,  # (num_rows, N) fp32, contiguous: one row of partial sums per producer program
    Out,  # (N,) the sums, in Out's dtype
    num_rows,
    N,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_ok = cols < N
    acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    for start in range(0, num_rows, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        mask = (rows < num_rows)[:, None] & col_ok[None, :]
        acc += tl.load(Partial + rows[:, None].to(tl.int64) * N + cols[None, :], mask=mask, other=0.0)
    tl.store(Out + cols, tl.sum(acc, axis=0).to(Out.dtype.element_ty), mask=col_ok)


def column_sum_into(partial: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[:] = partial.sum(0)`` in a fixed order. partial: (rows, N) fp32 contiguous; out: (N,) contiguous."""
    num_rows, n = partial.shape
    if out.shape != (n,) or not out.is_contiguous() or not partial.is_contiguous():
        raise ValueError(f"column_sum_into: need a contiguous (rows, N) partial and an (N,) out, "
                         f"got {tuple(partial.shape)} and {tuple(out.shape)}")
    if n == 0:
        return out
    grid = (triton.cdiv(n, _BLOCK_COLS),)
    _column_sum_kernel[grid](partial, out, num_rows, n, BLOCK_ROWS=_BLOCK_ROWS, BLOCK_COLS=_BLOCK_COLS, num_warps=4)
    return out
