"""Benchmark: fused bias + exact GELU (fastbert's Triton kernels) against eager PyTorch ``F.gelu(x + b)``
and ``torch.compile`` of the same function; fwd, bwd and fwd+bwd.

Bytes counted are what the op must move at the least, charged equally to every provider so GB/s compare
directly: fwd reads x and writes y; bwd reads dy and x (recomputing x + b beats storing it) and writes
dx (the bias gradient's (N,) result is negligible).

    python -m benchmarks.bench_bias_gelu --device cuda --dtype bf16
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .common import DTYPES, ROTATE_BYTES, Row, fused_vs_eager_rows, script_main
from fastbert import backend, ops

OP = "bias_gelu"
# BERT-base/large hidden sizes (the goal) and their intermediate sizes (where BERT runs this op).
CUDA_SHAPES = [(16384, 768), (16384, 1024), (16384, 3072), (16384, 4096)]
CPU_SHAPES = [(512, 3072)]
CPU_QUICK_SHAPES = [(48, 96)]


def eager(x, bias):
    return F.gelu(x + bias)


def fused(x, bias):
    with backend.use("triton"):
        return ops.bias_gelu(x, bias)


def _bytes(m, n, elem, mode):
    return {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode] * m * n * elem


def run(device: str, dtype: str, quick: bool) -> list[Row]:
    torch_dtype = DTYPES[dtype]
    shapes = CUDA_SHAPES if device == "cuda" else (CPU_QUICK_SHAPES if quick else CPU_SHAPES)
    rows = []
    elem = torch.finfo(torch_dtype).bits // 8
    for m, n in shapes:
        count = max(2, -(-ROTATE_BYTES // (3 * m * n * elem))) if device == "cuda" else 2
        sets = [(torch.randn(m, n, device=device, dtype=torch_dtype, requires_grad=True),
                 torch.randn(n, device=device, dtype=torch_dtype, requires_grad=True),
                 torch.randn(m, n, device=device, dtype=torch_dtype)) for _ in range(count)]
        shape = f"{m}x{n}"
        rows += fused_vs_eager_rows(OP, dtype, shape, device, quick, sets, fused, eager,
                                    functools.partial(_bytes, m, n, elem))
    return rows


if __name__ == "__main__":
    script_main(run, __doc__)
