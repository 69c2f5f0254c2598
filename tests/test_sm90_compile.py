"""Every Triton kernel compiles for the H200 (sm_90) in every configuration its launcher can choose.

No GPU needed: :mod:`fastbert.kernels.static` captures the real launchers' arguments on meta
tensors, specialises them as a launch would and compiles with Triton's bundled ptxas (in a child
process: this one runs the kernels under the interpreter, which accepts code the compiler rejects).
The default suite compiles a representative subset; the full sweep (``-m sm90_full``, minutes) runs
in scripts/gpu_check.sh.
"""
import os

import pytest

pytest.importorskip("triton")

from fastbert.kernels.static import checks  # noqa: E402
from fastbert.kernels.static.cases import case_set  # noqa: E402
from fastbert.kernels.static.run import compile_in_subprocess  # noqa: E402
from fastbert.kernels.limits import attention_head_dims, padded_block  # noqa: E402


def check(rows):
    failures = checks.failures(rows)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("configs", ["_FWD_CONFIGS", "_BWD_DQ_CONFIGS", "_BWD_DKDV_CONFIGS"])
def test_attention_autotuner_keeps_a_non_spilling_choice_at_every_head_dim(configs):
    import triton

    from fastbert.kernels import flash_attention as fa

    table = getattr(fa, configs)
    prune = fa._prune_spilling(table)
    candidates = [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.warps,
                                num_stages=c.stages) for c in table]
    for block_d in (16, 32, 64, 128):
        for dropout in (False, True):
            kept = prune(candidates, {}, BLOCK_D=block_d, HAS_DROPOUT=dropout)
            limits = [table[candidates.index(c)].max_head_block(dropout) for c in kept]
            # Never the fallback: some entry is declared spill-free here, and only such entries are kept.
            assert kept and all(block_d <= limit for limit in limits), (configs, block_d, dropout)
            if block_d == 16 and not dropout:
                assert len(kept) == len(candidates)
    # The wide dK/dV tiles spill at head dim 64: they must not be tried there.
    if configs == "_BWD_DKDV_CONFIGS":
        kept = prune(candidates, {}, BLOCK_D=64, HAS_DROPOUT=False)
        assert all(c.kwargs["BLOCK_N"] <= 64 for c in kept)


@pytest.mark.parametrize("configs, fixed", [("_FWD_CONFIGS", "_FIXED_CONFIG"), ("_BWD_DQ_CONFIGS", "_FIXED_DQ_CONFIG"),
                                             ("_BWD_DKDV_CONFIGS", "_FIXED_DKDV_CONFIG")])
def test_fixed_attention_configs_are_declared_spill_free_at_every_head_dim(configs, fixed):
    """With autotuning off, 16-bit attention runs one configuration at every head dim: it must be an
    entry of the kernel's table whose limits cover head dim 128 with and without dropout."""
    from fastbert.kernels import flash_attention as fa

    config = getattr(fa, fixed)
    key = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)
    limits = {c.tile: (c.max_block_d, c.max_block_d_dropout) for c in getattr(fa, configs)}
    assert key in limits and min(limits[key]) >= 128, (fixed, key, limits.get(key))


@pytest.mark.parametrize("table", ["_FP32_FWD", "_FP32_BWD_DQ", "_FP32_BWD_DKDV"])
def test_fp32_attention_has_a_measured_configuration_for_every_head_dim(table):
    """Every head dim the attention op gives the kernel (multiples of 8 up to 128), with and without
    dropout, finds its fp32 configuration; the full sweep compiles each of them (and fails on a spill)."""
    from fastbert.kernels import flash_attention as fa

    configs = getattr(fa, table)
    head_dims = set(attention_head_dims())
    for head_dim in head_dims:
        for dropout in (False, True):
            config = fa.fp32_config(configs, padded_block(head_dim), dropout)
            assert config.kwargs["BLOCK_M"] >= 16 and config.kwargs["BLOCK_N"] >= 16  # tl.dot's minimum
    # fp32 spills depend on the exact head dim: the full sweep compiles every one, in every layout.
    swept = {(c.head_dim, c.layout, c.dropout) for c in case_set("full")
             if c.op == "attention" and c.dtype == "fp32"}
    assert swept == {(d, layout, dropout) for d in head_dims for layout in ("padded", "padded+mask", "varlen")
                     for dropout in (False, True)}


def test_full_sweep_compiles_16_bit_attention_at_every_head_dim():
    """The exact head dim, not only its BLOCK_D, decides spills and vector widths: the full sweep
    compiles bf16 and fp16 attention at every head dim the op takes, masked and varlen, dropout on/off."""
    head_dims = attention_head_dims()
    swept = {(c.dtype, c.head_dim, c.layout, c.dropout) for c in case_set("full")
             if c.op == "attention" and c.dtype != "fp32"}
    assert swept >= {(dtype, d, layout, dropout) for dtype in ("bf16", "fp16") for d in head_dims
                     for layout in ("padded+mask", "varlen") for dropout in (False, True)}


def test_representative_subset_compiles_for_sm90():
    rows = compile_in_subprocess("default", jobs=2)
    check(rows)
    # Both paths of the attention launcher are covered: the autotuned configurations and the fixed one.
    attention = {r.config.split()[0] for r in rows if r.kernel == "_attention_fwd_kernel"}
    assert attention == {"tuned", "fixed"}
    # fp32 attention (FMA dots, its own configurations) is in the subset: it too must not spill.
    assert {r.kernel for r in rows if r.case.startswith("attention fp32")} == set(checks.WGMMA_KERNELS) | {
        "_attention_bwd_dkdv_kernel"}
    # Every MLM cross-entropy case of the kernel's list compiled (and, by check(), without spills).
    from fastbert.kernels import mlm_head

    mlm = {r.case for r in rows if r.kernel == "_mlm_cross_entropy_kernel"}
    assert mlm == {c.label for c in mlm_head.static_cases("default")}


@pytest.mark.slow
@pytest.mark.sm90_full
def test_every_configuration_compiles_for_sm90():
    check(compile_in_subprocess("full", jobs=int(os.environ.get("FASTBERT_SM90_JOBS", os.cpu_count()))))
