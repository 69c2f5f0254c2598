"""``gelu(x + bias)`` with the exact erf GELU: Triton kernels and launchers.

Forward: y = h * Phi(h), h = x + bias, Phi the standard normal CDF. Backward recomputes h from x and
bias: dx = dy * (Phi(h) + h * phi(h)), and dbias = sum of dx over rows, reduced in two deterministic
stages (fp32 partial sums per row-program, then :func:`fastbert.kernels.column_sum.column_sums_into`).
Element-wise and memory-bound, so the tiles are fixed by a heuristic rather than autotuned.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import as_rows, interpreted, programs_for, warps_for
from .column_sum import column_sums_into

# constexpr values, so @jit code may read these globals (the compiler rejects plain floats)
_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)

# Tile of the GPU launches: 16 x 256 elements, 4 warps: 32 elements (four 16-byte loads of bf16) per thread.
_GPU_BLOCK_M = 16
_GPU_MAX_BLOCK_N = 256
_GPU_WARPS = 4


@triton.jit
def _bias_gelu_fwd_kernel(
    X,  # (M, N) input, row stride stride_x, unit column stride
    Bias,  # (N,)
    Y,  # (M, N) output, contiguous
    stride_x,
    M,
    N,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    b = tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)
    h = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32) + b[None, :]
    y = 0.5 * h * (1.0 + tl.math.erf(h * _SQRT1_2))
    tl.store(Y + rows64[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    DY,  # (M, N) gradient of the output, row stride stride_dy
    X,  # (M, N) forward input, row stride stride_x
    Bias,  # (N,)
    DX,  # (M, N) gradient of x, contiguous
    PartialDB,  # (row programs, N) fp32: this program's share of dbias
    stride_dy,
    stride_x,
    M,
    N,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    # Each row-program takes a contiguous range of whole row blocks: the launcher sizes the grid.
    rows_per_program = tl.cdiv(tl.cdiv(M, BLOCK_M), tl.num_programs(0)) * BLOCK_M
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    b = tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_start = pid_m * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for block_start in range(row_start, row_end, BLOCK_M):
        rows = block_start + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        h = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32) + b[None, :]
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(h * _SQRT1_2))
        pdf = tl.exp(-0.5 * h * h) * _INV_SQRT_2PI
        dx = dy * (cdf + h * pdf)  # zero where masked: dy loads as 0 there
        tl.store(DX + rows64[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        db_acc += dx
    tl.store(PartialDB + pid_m * N + cols, tl.sum(db_acc, axis=0), mask=col_ok)


def _tile(n: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps). Under the interpreter: wide tiles of a few rows, so there are few
    programs (each runs serially) yet a ragged last row block."""
    if not interpreted():
        return _GPU_BLOCK_M, min(_GPU_MAX_BLOCK_N, triton.next_power_of_2(n)), _GPU_WARPS
    block_n = min(1024, triton.next_power_of_2(n))
    block_m = max(1, min(8, 2048 // block_n))
    return block_m, block_n, warps_for(block_m * block_n)


def bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(x + bias)``. x: (..., N) any float dtype; bias: (N,). Returns x's shape and dtype, contiguous."""
    n = x.shape[-1]
    x_rows = as_rows(x, n)
    m = x_rows.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    block_m, block_n, warps = _tile(n, x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _bias_gelu_fwd_kernel[grid](x_rows, bias.contiguous(), y, x_rows.stride(0), m, n, BLOCK_M=block_m, BLOCK_N=block_n,
                      num_warps=warps)
    return y


def bias_gelu_bwd(grad_out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, grad_x: torch.Tensor,
                  grad_bias: torch.Tensor) -> None:
    """Gradients of :func:`bias_gelu_fwd`, written into grad_x (contiguous, x's shape and dtype) and
    grad_bias ((N,) contiguous, bias's dtype)."""
    n = x.shape[-1]
    x_rows = as_rows(x, n)
    dy_rows = as_rows(grad_out, n)
    m = x_rows.shape[0]
    if n == 0:
        return
    block_m, block_n, warps = _tile(n, x.device)
    col_blocks = triton.cdiv(n, block_n)
    row_blocks = triton.cdiv(m, block_m)
    if m == 0:
        grad_bias.zero_()
        return
    bias = bias.contiguous()
    params = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    # One full wave by the compiled kernel's occupancy, shared between the column blocks. The partial
    # buffer is not allocated yet: a same-dtype stand-in compiles the same kernel variant.
    stand_in = torch.empty((1, n), dtype=torch.float32, device=x.device)
    probe = (dy_rows, x_rows, bias, grad_x, stand_in, dy_rows.stride(0), x_rows.stride(0), m, n)
    wave = programs_for(_bias_gelu_bwd_kernel, probe, params, x.device, work_items=row_blocks * col_blocks)
    row_programs = max(1, min(row_blocks, wave // col_blocks))
    partial_db = torch.empty((1, row_programs, n), dtype=torch.float32, device=x.device)
    _bias_gelu_bwd_kernel[(row_programs, col_blocks)](dy_rows, x_rows, bias, grad_x, partial_db[0], dy_rows.stride(0),
                                            x_rows.stride(0), m, n, **params)
    column_sums_into(partial_db, [grad_bias])


# Static sm_90 cases (fastbert.kernels.static): the launches the report compiles.
def static_cases(case_set: str) -> list:
    from .static.case import StaticCase as Case

    if case_set == "smoke":
        return [Case("bias_gelu", "bf16", 768)]
    if case_set == "quick":
        return [Case("bias_gelu", "bf16", 3072)]
    if case_set == "default":
        return [Case("bias_gelu", "bf16", 3072), Case("bias_gelu", "mix", 768)]
    return [Case("bias_gelu", dtype, hidden) for dtype in ("bf16", "fp16", "fp32", "mix")
            for hidden in (768, 1024, 3072, 4096)]


def run_static_case(case) -> None:
    from .static.case import DTYPES, cuda_tensor

    rows, n = 4096, case.hidden
    act = torch.bfloat16 if case.dtype == "mix" else DTYPES[case.dtype]
    param = torch.float32 if case.dtype == "mix" else act
    x, bias = cuda_tensor((rows, n), act), cuda_tensor((n,), param)
    bias_gelu_fwd(x, bias)
    bias_gelu_bwd(cuda_tensor((rows, n), act), x, bias, cuda_tensor((rows, n), act), cuda_tensor((n,), param))
