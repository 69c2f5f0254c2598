"""The mlm_loss benchmark: its CPU peak-memory measurement counts what torch's allocator holds, a quick
run reports every provider it can run here, and the chunked op's peak stays a fraction of the
full-logits reference's, as the chunk rule promises (the issue's goal, in miniature)."""
import torch

from benchmarks import bench_mlm_loss
from fastbert import backend, ops
from fastbert.ops import mlm_head


def test_cpu_peak_memory_is_the_largest_live_total():
    def allocations():
        a = torch.empty(1 << 20, dtype=torch.uint8)
        b = torch.empty(2 << 20, dtype=torch.uint8)
        del a
        c = torch.empty(4 << 20, dtype=torch.uint8)  # b and c live together: 6 MiB
        del b, c
        torch.empty(5 << 20, dtype=torch.uint8)

    assert abs(bench_mlm_loss.cpu_peak_memory_mb(allocations) - 6.0) < 0.01


def test_cpu_quick_run_reports_memory_and_time():
    rows = bench_mlm_loss.run("cpu", "fp32", True)
    measured = {r.provider: r for r in rows if not r.note}
    assert set(measured) == {"reference", "chunked"}
    for r in measured.values():
        assert r.op == "mlm_loss" and r.mode == "fwd+bwd" and r.ms_median > 0 and r.tflops > 0
    # The reference holds the logits, their log-softmax and its gradient at once: at least 3 x T x V x 4 B.
    targets, vocab = bench_mlm_loss.QUICK_CASES[0]
    assert measured["reference"].peak_mem_mb >= 3 * targets * vocab * 4 / 2**20
    assert measured["chunked"].peak_mem_mb < measured["reference"].peak_mem_mb / 2
    assert any(r.provider == "fastbert" and r.note.startswith("unsupported") for r in rows)
    assert "chunked: peak" in bench_mlm_loss.summary(rows)


def test_chunked_peak_is_under_a_quarter_of_the_reference(monkeypatch):
    """A chunk budget of half the logits (as 1 GiB is of 20 k x 30522 fp32 logits): peak <= 1/4."""
    targets, vocab, hidden = 4096, 4096, 64
    monkeypatch.setattr(mlm_head, "CHUNK_BYTES", targets * vocab * 4 // 2)
    h, w, b, t = bench_mlm_loss._inputs(targets, vocab, hidden, "cpu")
    peaks = {}
    for name, fn in (("reference", ops.mlm_loss_reference), ("chunked", ops.mlm_loss)):
        def call(fn=fn):
            for p in (h, w, b):
                p.grad = None
            with backend.use("torch"):
                loss, _ = fn(h, w, b, t)
            loss.backward()

        peaks[name] = bench_mlm_loss.cpu_peak_memory_mb(call)
    assert peaks["chunked"] * 4 <= peaks["reference"], peaks


def test_goals_read_the_memory_ratio_of_the_fused_op_or_else_the_chunked_path():
    from benchmarks import report
    from benchmarks.ceilings import Ceilings
    from benchmarks.common import Row, Timing

    def row(provider, peak, ms=1.0):
        return Row.measured("mlm_loss", provider, "fwd+bwd", "bf16", "T20480 V30522 H768", Timing(ms, ms, ms),
                            peak_mem_mb=peak)

    peaks = Ceilings(gemm_tflops=800.0, copy_gbps=4000.0, gemm_dtype="bf16")
    cpu_run = report.goals_table([row("reference", 6000.0), row("chunked", 1000.0)], peaks)
    assert "| MLM loss + backward, 20 k targets x 30522: reference peak memory / fastbert's | ≥ 4 x | 6 x | met |" in cpu_run
    gpu_run = report.goals_table([row("reference", 6000.0, 2.0), row("chunked", 1000.0), row("fastbert", 2000.0, 2.5)],
                                 peaks)
    assert "30522: reference peak memory / fastbert's | ≥ 4 x | 3 x | gap 1 x |" in gpu_run
    assert "| MLM loss + backward vs the unfused head (time) | ≥ 1 x | 0.8 x | gap 0.2 x |" in gpu_run
