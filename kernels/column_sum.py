"""Second stage of the deterministic weight/bias-gradient reductions: sum per-program partial rows.

A backward kernel writes one fp32 row of partial sums per program and per gradient, (k, programs, N);
this kernel adds those rows in a fixed order, for up to two gradients (dW and dB) in one launch. No
atomics, so the result is the same bit for bit on every run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# 64 x 32 fp32 per step: enough columns blocks to spread a 768-wide sum over the GPU, few row steps.
_BLOCK_ROWS = 64
_BLOCK_COLS = 32


@triton.jit
def _column_sum_kernel(
    Partial,  # (k, num_rows, N) fp32, contiguous: gradient g's partial sums are Partial[g]
    OutA,  # (N,) sums of Partial[0], in OutA's dtype
    OutB,  # (N,) sums of Partial[1], in OutB's dtype (not written when k == 1)
    num_rows,
    N,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    which = tl.program_id(1)
    col_ok = cols < N
    base = Partial + which.to(tl.int64) * num_rows * N
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


def column_sums_into(partial: torch.Tensor, outs: list[torch.Tensor]) -> None:
    """``outs[g][:] = partial[g].sum(0)`` in a fixed order, one launch.

    partial: (k, rows, N) fp32 contiguous with k = len(outs) in {1, 2}; outs: contiguous (N,) tensors.
    """
    k, num_rows, n = partial.shape
    if k != len(outs) or k not in (1, 2) or not partial.is_contiguous() or partial.dtype != torch.float32:
        raise ValueError(f"column_sums_into: need a contiguous fp32 (k, rows, N) partial with k = len(outs) <= 2, "
                         f"got {tuple(partial.shape)} {partial.dtype} and {len(outs)} outputs")
    for out in outs:
        if out.shape != (n,) or not out.is_contiguous():
            raise ValueError(f"column_sums_into: each output must be a contiguous ({n},), got {tuple(out.shape)}")
    if n == 0:
        return
    grid = (triton.cdiv(n, _BLOCK_COLS), k)
    _column_sum_kernel[grid](partial, outs[0], outs[-1], num_rows, n, BLOCK_ROWS=_BLOCK_ROWS,
                             BLOCK_COLS=_BLOCK_COLS, num_warps=4)
