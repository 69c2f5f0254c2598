"""The LayerNorm and bias+GELU benchmark scripts run (CPU smoke: tiny shapes, Triton under the interpreter)
and report a timed row for every provider and mode they can run here."""
import pytest

from benchmarks import bench_bias_gelu, bench_layer_norm

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


@pytest.mark.parametrize("bench", [bench_layer_norm, bench_bias_gelu], ids=["layer_norm", "bias_gelu"])
def test_cpu_quick_run_reports_every_mode(bench):
    rows = bench.run("cpu", "fp32", True)
    timed = {(r.provider, r.mode) for r in rows if not r.note}
    for provider in ("fastbert", "eager"):
        for mode in ("fwd", "bwd", "fwd+bwd"):
            assert (provider, mode) in timed
    for r in rows:
        if not r.note:
            assert r.ms_median > 0 and r.gbps > 0 and r.op == bench.OP
    assert any(r.provider == "compile" and r.note.startswith("unsupported") for r in rows)
