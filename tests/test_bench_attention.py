"""Smoke test of benchmarks/bench_attention.py: the CPU quick run measures every provider it can."""
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_quick_cpu_run_measures_the_kernel_and_its_baselines(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # the repo root: `benchmarks` package
    from benchmarks import bench_attention

    rows = bench_attention.run("cpu", "fp32", True)
    measured = {(r.provider, r.mode) for r in rows if r.ms_median is not None}
    for provider in ("fastbert", "fastbert-varlen", "eager", "sdpa-math"):
        for mode in bench_attention.MODES:
            assert (provider, mode) in measured
    for r in rows:
        assert (r.ms_median is not None and r.ms_median > 0 and r.tflops > 0) or r.note.startswith("unsupported")
    summary = bench_attention.summary(rows).splitlines()
    assert len(summary) == len(bench_attention.MODES) and all("x best SDPA" in line for line in summary)
