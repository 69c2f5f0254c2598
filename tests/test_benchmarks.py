"""The benchmark suite: report arithmetic on synthetic rows, and a CPU smoke run of the runner."""
import csv

import pytest

from benchmarks import report
from benchmarks.ceilings import Ceilings
from benchmarks.common import CSV_COLUMNS, Row, Timing
from benchmarks.runner import main as runner_main

PEAKS = Ceilings(gemm_tflops=800.0, copy_gbps=4000.0, gemm_dtype="bf16")


def row(op, provider, mode, shape, ms, **kw):
    return Row.measured(op, provider, mode, "bf16", shape, Timing(ms, ms * 0.9, ms * 1.1), **kw)


def test_measured_row_arithmetic():
    r = row("attention", "fastbert", "fwd", "x", 2.0, flops=4e12, bytes_moved=8e9)
    assert r.tflops == pytest.approx(2000.0) and r.gbps == pytest.approx(4000.0)
    pct = report.with_percent_of_peak([row("layer_norm", "fastbert", "fwd", "x", 1.0, bytes_moved=2e9)], PEAKS)
    assert pct[0].pct_of_peak == pytest.approx(50.0)


def test_speedups_pair_same_case_only():
    rows = [row("model", "fastbert", "step", "A", 10.0), row("model", "hf_sdpa", "step", "A", 25.0),
            row("model", "hf_sdpa", "step", "B", 99.0)]
    assert report.speedups(rows) == [("model", "step", "A", "hf_sdpa", 2.5)]


def test_goals_report_measured_values_and_gaps():
    rows = [
        row("attention", "fastbert", "fwd", "B8 L512 H12 D64 mix", 1.0, flops=300e9),
        row("attention", "sdpa_flash", "fwd", "B8 L512 H12 D64 mix", 1.5, flops=300e9),
        row("model", "fastbert", "step", "bert-base-uncased B=64 L=128 full", 100.0, flops=50e12),
        row("model", "hf_eager", "step", "bert-base-uncased B=64 L=128 full", 350.0),
    ]
    table = report.goals_table(rows, PEAKS)
    assert "| attention fwd, hd64, seq512, padding mask | ≥ 350 TFLOP/s | 300 TFLOP/s | gap 50 TFLOP/s |" in table
    assert "| attention fwd vs best SDPA backend (same case) | ≥ 1 x | 1.5 x | met |" in table
    assert "| BERT-base pre-training step, seq128: MFU | ≥ 55 % | 62.5 % | met |" in table
    assert "| BERT-base seq128 step vs HF eager | ≥ 3 x | 3.5 x | met |" in table
    assert "| BERT-base seq128 step vs HF SDPA | ≥ 2 x | — | not measured in this run |" in table



def test_cpu_rows_count_toward_the_cpu_goals_only():
    cpu = "cpu (2 cores)"
    rows = [row("model", "fastbert", "step", "bert-base-uncased B=8 L=128 full", 100.0, flops=50e12, device=cpu),
            row("model", "hf_sdpa", "step", "bert-base-uncased B=8 L=128 full", 130.0, device=cpu),
            row("embeddings", "st_patched", "forward_unsorted", "m N8 64%pad", 10.0, device=cpu),
            row("embeddings", "st_sdpa", "forward_unsorted", "m N8 64%pad", 12.0, device=cpu)]
    table = report.goals_table(rows, PEAKS)
    assert "| CPU: pre-training step at seq 128 (bert-tiny, BERT-base) vs HF SDPA | ≥ 1 x | 1.3 x | met |" in table
    assert "| CPU: forward on unsorted padded batches, patched vs SDPA | ≥ 1.5 x | 1.2 x | gap 0.3 x |" in table
    assert "| BERT-base seq128 step vs HF SDPA | ≥ 2 x | — | not measured in this run |" in table  # the H200's
    assert "| BERT-base pre-training step, seq128: MFU | ≥ 55 % | — | not measured in this run |" in table
    gpu = report.goals_table([r.__class__(**{**r.__dict__, "device": "NVIDIA H200"}) for r in rows], PEAKS)
    assert "| BERT-base seq128 step vs HF SDPA | ≥ 2 x | 1.3 x | gap 0.7 x |" in gpu
    assert "| CPU: pre-training step at seq 128 (bert-tiny, BERT-base) vs HF SDPA | ≥ 1 x | — |" in gpu

def test_runner_quick_cpu_smoke(tmp_path, capsys):
    assert runner_main(["--quick", "--device", "cpu", "--only", "bert_layer,model", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "results.csv") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    providers = {(r["op"], r["provider"]) for r in rows if r["ms_median"]}
    assert {("ceiling", "torch"), ("bert_layer", "fastbert"), ("model", "fastbert"), ("model", "hf_sdpa")} <= providers
    assert all(float(r["ms_median"]) > 0 for r in rows if r["ms_median"])
    md = (tmp_path / "results.md").read_text()
    assert "## Goals" in md and "## Speed-ups of fastbert" in md
    assert (tmp_path / "benchmarks.png").stat().st_size > 1000


def test_runner_rejects_unknown_subject(tmp_path):
    with pytest.raises(ValueError, match="unknown subject"):
        runner_main(["--device", "cpu", "--only", "warp_drive", "--out", str(tmp_path)])


def test_time_budget_marks_skipped_subjects(tmp_path):
    runner_main(["--quick", "--device", "cpu", "--only", "model", "--out", str(tmp_path), "--time-budget", "0"])
    text = (tmp_path / "results.csv").read_text()
    assert "skipped: time budget" in text


def test_runner_static_report_smoke(tmp_path, monkeypatch):
    from benchmarks import bench_static

    monkeypatch.setattr(bench_static, "QUICK_SET", "smoke")  # GELU's three kernels: seconds, not minutes
    assert runner_main(["--quick", "--device", "cpu", "--only", "static", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "results.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["op"] == "static"]
    kernels = {r["mode"] for r in rows}
    assert {"_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel", "_column_sum_kernel"} <= kernels
    assert all(r["config"] and int(r["registers"]) > 0 and int(r["ctas_per_sm"]) >= 1 for r in rows)
    md = (tmp_path / "results.md").read_text()
    assert "## static: kernels compiled for sm_90" in md and md.count("| bias_gelu bf16 N768 |") == 3
