"""Benchmark: fused dropout + residual add + LayerNorm (fastbert's Triton kernels) against eager PyTorch
``F.layer_norm(F.dropout(x) + r)`` and ``torch.compile`` of the same function; fwd, bwd and fwd+bwd.

Bytes counted are what the op must move at the least, charged equally to every provider so GB/s compare
directly: fwd reads x and the residual and writes y; bwd reads dy, x and the residual (recomputing the
pre-norm sum beats storing it) and writes dx and, with dropout, the residual's gradient (without dropout
it is dx itself).

    python -m benchmarks.bench_layer_norm --device cuda --dtype bf16
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .common import DTYPES, ROTATE_BYTES, Row, fused_vs_eager_rows, script_main
from fastbert import backend, ops

OP = "layer_norm"
CUDA_SHAPES = [(16384, 768), (16384, 1024)]
CPU_SHAPES = [(512, 768)]
CPU_QUICK_SHAPES = [(48, 96)]
DROPOUT_P = 0.1  # BERT's hidden dropout
EPS = 1e-12


def eager(x, residual, weight, bias, dropout_p):
    return F.layer_norm(F.dropout(x, dropout_p, training=True) + residual, (x.shape[-1],), weight, bias, EPS)


def fused(x, residual, weight, bias, dropout_p):
    with backend.use("triton"):
        return ops.dropout_add_layer_norm(x, residual, weight, bias, EPS, dropout_p)


def _input_sets(m, n, dtype, device, count):
    sets = []
    for _ in range(count):
        x = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
        r = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
        w = (1 + 0.1 * torch.randn(n, device=device)).to(dtype).requires_grad_()
        b = (0.1 * torch.randn(n, device=device)).to(dtype).requires_grad_()
        sets.append((x, r, w, b, torch.randn(m, n, device=device, dtype=dtype)))
    return sets


def _bytes(m, n, elem, mode, dropout_p):
    fwd = 3 * m * n * elem
    bwd = (5 if dropout_p > 0 else 4) * m * n * elem
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def run(device: str, dtype: str, quick: bool) -> list[Row]:
    torch_dtype = DTYPES[dtype]
    shapes = CUDA_SHAPES if device == "cuda" else (CPU_QUICK_SHAPES if quick else CPU_SHAPES)
    rows = []
    elem = torch.finfo(torch_dtype).bits // 8
    for m, n in shapes:
        count = max(2, -(-ROTATE_BYTES // (4 * m * n * elem))) if device == "cuda" else 2
        sets = _input_sets(m, n, torch_dtype, device, count)
        shape = f"{m}x{n} p={DROPOUT_P}"
        rows += fused_vs_eager_rows(OP, dtype, shape, device, quick, sets,
                                    lambda x, r, w, b: fused(x, r, w, b, DROPOUT_P),
                                    lambda x, r, w, b: eager(x, r, w, b, DROPOUT_P),
                                    functools.partial(_bytes, m, n, elem, dropout_p=DROPOUT_P))
    return rows


if __name__ == "__main__":
    script_main(run, __doc__)
