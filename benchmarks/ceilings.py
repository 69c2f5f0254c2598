"""The device's own ceilings, measured in the same run as everything else: dense GEMM TFLOP/s and
device-to-device copy GB/s. Every result is also reported as a percentage of these."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import Row, time_fn


@dataclass
class Ceilings:
    gemm_tflops: float
    copy_gbps: float
    gemm_dtype: str


def measure(device: str, dtype: str, quick: bool) -> tuple[Ceilings, list[Row]]:
    """GEMM: bf16 (fp32 on CPU) square matmul on random data. Copy: bytes read + written."""
    if device == "cuda":
        n, copy_bytes, gemm_dtype = (4096 if quick else 8192), (256 if quick else 1024) * 2**20, torch.bfloat16
    else:
        n, copy_bytes, gemm_dtype = (512 if quick else 1024), (16 if quick else 64) * 2**20, torch.float32
    a = torch.randn(n, n, device=device, dtype=gemm_dtype)
    b = torch.randn(n, n, device=device, dtype=gemm_dtype)
    gemm = time_fn(lambda: a @ b, device, quick=quick)
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy = time_fn(lambda: dst.copy_(src), device, quick=quick)
    name = str(gemm_dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "fp32")
    rows = [
        Row.measured("ceiling", "torch", "gemm", name, f"{n}x{n}x{n}", gemm, flops=2 * n**3),
        Row.measured("ceiling", "torch", "copy", "fp32", f"{copy_bytes // 2**20} MiB", copy, bytes_moved=2 * copy_bytes),
    ]
    return Ceilings(rows[0].tflops, rows[1].gbps, name), rows
