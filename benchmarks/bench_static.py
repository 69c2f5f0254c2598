"""Static kernel report: every Triton kernel × launch configuration compiled for the H200 (sm_90),
on the CPU, without running anything: registers, spill bytes, shared memory, CTAs per SM, wgmma vs
other dots, 16-byte vector loads. Lets kernel changes be judged between GPU runs.

    python -m benchmarks --only static            (the full sweep; --quick: one case per op)
    python -m benchmarks.bench_static [--quick]

Compiling runs in child processes (one per CPU core, at most 8): see fastbert.kernels.static.
"""
from __future__ import annotations

import os

from fastbert.kernels.static.compiler import KernelStats
from fastbert.kernels.static.run import compile_in_subprocess

from .common import Row, script_main

OP = "static"
QUICK_SET = "quick"  # case set of --quick (fastbert.kernels.static.case.CASE_SETS)
SWEEP_SET = "full"  # case set otherwise


def rows_of(stats: list[KernelStats]) -> list[Row]:
    rows = []
    for s in stats:
        dtype = s.case.split()[1]
        row = Row(OP, "sm90", s.kernel, dtype, s.case, config=s.config)
        if s.error:
            row.note = f"error: {s.error}"
        else:
            for name in ("registers", "spill_bytes", "smem_bytes", "ctas_per_sm", "wgmma_dots", "other_dots",
                         "ld_global_v4", "ld_global"):
                setattr(row, name, getattr(s, name))
        rows.append(row)
    return rows


def run(device: str, dtype: str, quick: bool) -> list[Row]:
    # Static: the same figures whatever the device and dtype asked for (every dtype is in the sweep).
    jobs = max(1, min(8, os.cpu_count() or 1))
    return rows_of(compile_in_subprocess(QUICK_SET if quick else SWEEP_SET, jobs=jobs))


if __name__ == "__main__":
    script_main(run, __doc__)
