"""kernels/_launch.py: the one autotuning switch, the one interpreter path, the seed rule and the
occupancy arithmetic that sizes the persistent backward grids."""
import pytest
import torch

from fastbert import backend, ops

launch = pytest.importorskip("fastbert.kernels._launch")
fa = pytest.importorskip("fastbert.kernels.flash_attention")
layer_norm = pytest.importorskip("fastbert.kernels.layer_norm")
column_sum = pytest.importorskip("fastbert.kernels.column_sum")


@pytest.mark.parametrize(
    "regs, smem, warps, expected",
    [
        (32, 0, 4, 16),  # warp-limited: 64 warps / 4
        (128, 0, 8, 2),  # register-limited: 128 regs x 256 threads = 32768 per CTA
        (96, 0, 8, 2),  # 96 x 32 = 3072 per warp: 21 warps fit, so 2 CTAs of 8
        (72, 0, 8, 3),  # 72 x 32 = 2304 per warp: 28 warps, 3 CTAs (the LayerNorm bwd case of issue 11)
        (100, 0, 4, 4),  # 3200 regs a warp round up to 3328: 19 warps fit, 4 CTAs of 4 warps
        (32, 100 * 1024, 4, 2),  # shared-memory-limited: 228 KB / (100 KB + 1 KB)
        (16, 0, 1, 32),  # CTA-limited
        (255, 0, 16, 1),  # over every limit: still 1 (it compiled, so it runs)
    ],
)
def test_ctas_per_sm_takes_the_tightest_limit(regs, smem, warps, expected):
    assert launch.ctas_per_sm(regs, smem, warps) == expected


def test_binding_occupancy_names_the_resource_the_static_report_shows():
    # 255 registers x 32 threads round up to 8192 per warp: two 4-warp blocks fill the 65536 registers.
    assert launch.binding_occupancy(255, 0, 4) == (2, "regs")
    # 64 KB + the 1 KB reserved per block: three blocks in 228 KB.
    assert launch.binding_occupancy(64, 64 * 1024, 4) == (3, "smem")
    assert launch.binding_occupancy(16, 0, 16) == (4, "warps")
    assert launch.binding_occupancy(16, 0, 1) == (32, "ctas")
    # Over the register file at 16 warps: the report says 0 where a launcher still counts 1.
    assert launch.binding_occupancy(255, 0, 16) == (0, "regs")
    assert launch.ctas_per_sm(255, 0, 16) == 1


def test_occupancy_programs_is_one_wave_capped_by_the_work():
    assert launch.occupancy_programs(72, 0, 8, sm_count=132, work_items=10**6) == 3 * 132
    assert launch.occupancy_programs(72, 0, 8, sm_count=132, work_items=100) == 100
    assert launch.occupancy_programs(72, 0, 8, sm_count=132, work_items=0) == 1
    small_sm = launch.SMLimits(registers=32768)
    assert launch.occupancy_programs(72, 0, 8, sm_count=10, work_items=10**6, limits=small_sm) == 10


def test_programs_for_falls_back_under_the_interpreter():
    assert launch.interpreted()
    assert launch.programs_for(None, (), {}, torch.device("cpu"), work_items=100) == launch.INTERPRETER_PROGRAMS
    assert launch.programs_for(None, (), {}, torch.device("cpu"), work_items=3) == 3


def test_programs_for_reads_each_compiled_variant_once(monkeypatch):
    """On a GPU the occupancy comes from the compiled kernel: read once per variant (dtype, alignment,
    int specialisation, constexprs), not once per backward call, and a new variant is read anew."""
    class CompiledStandIn:
        def __init__(self, n_regs):
            self.n_regs = n_regs
            self.metadata = type("Metadata", (), {"shared": 0, "num_warps": 8})()

        def _init_handles(self):
            pass

    class KernelStandIn:
        warmups = 0

        def warmup(self, *args, grid, **params):
            KernelStandIn.warmups += 1
            return CompiledStandIn(72 if args[0].dtype == torch.float32 else 128)

    monkeypatch.setattr(launch, "interpreted", lambda: False)
    monkeypatch.setattr(launch, "_sm_count", lambda index: 10)
    monkeypatch.setattr(launch, "_RESOURCES", {})
    kernel, cuda = KernelStandIn(), torch.device("cuda", 0)
    x32, x16 = torch.empty(64), torch.empty(64, dtype=torch.float16)
    params = {"BLOCK_M": 4, "num_warps": 8}
    for rows in (768, 768, 770):
        programs = launch.programs_for(kernel, (x32, rows), params, cuda, work_items=10**6)
        assert programs == launch.occupancy_programs(72, 0, 8, sm_count=10, work_items=10**6) == 30
    assert KernelStandIn.warmups == 2  # 768 (divisible by 16) and 770 are two variants; the repeat is cached
    assert launch.programs_for(kernel, (x16, 768), params, cuda, work_items=10**6) == 20
    assert launch.programs_for(kernel, (x32, 768), {**params, "BLOCK_M": 8}, cuda, work_items=5) == 5
    assert KernelStandIn.warmups == 4


def test_one_autotune_switch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("FASTBERT_AUTOTUNE", raising=False)
    assert launch.autotune_enabled()
    monkeypatch.setenv("FASTBERT_AUTOTUNE", "0")
    assert not launch.autotune_enabled()
    monkeypatch.setenv("FASTBERT_AUTOTUNE", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not launch.autotune_enabled()  # the interpreter never autotunes


class _Recorder:
    """Stands in for a kernel or an autotuner (which adds its config's block sizes to what the grid
    function sees): records the grid and launch arguments it gets."""

    def __init__(self, config=None):
        self.calls, self.config = [], config or {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(
            (grid({**kwargs, **self.config}) if callable(grid) else grid, kwargs))


@pytest.mark.parametrize("module, name", [(fa, "_attention_fwd_kernel"), (layer_norm, "_layer_norm_fwd_kernel")])
def test_every_kernel_follows_the_switch(monkeypatch, module, name):
    """With FASTBERT_AUTOTUNE=1 (and no interpreter) the launchers go through the autotuner; with 0 they
    launch the kernel itself with a fixed configuration. Attention and LayerNorm share the rule."""
    kernel, tuned = _Recorder(), _Recorder({"BLOCK_M": 32, "BLOCK_N": 32})
    monkeypatch.setattr(module, name, kernel)
    monkeypatch.setattr(module, "_fwd_tuned", tuned)
    q = torch.randn(1, 8, 1, 16, dtype=torch.bfloat16 if module is fa else torch.float32)  # fp32 attention: below

    def run():
        if module is fa:
            fa.forward(q, q, q, softmax_scale=0.25)
        else:
            layer_norm.layer_norm_fwd(q.view(8, 16), None, torch.ones(16), None, 1e-5, 0.0, 0, torch.float32)

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(layer_norm, "_fixed_config", lambda block_n, max_per_thread: layer_norm._tuning_configs()[0])
    for setting, ran, idle in (("1", tuned, kernel), ("0", kernel, tuned)):
        monkeypatch.setenv("FASTBERT_AUTOTUNE", setting)
        ran.calls.clear()
        idle.calls.clear()
        run()
        assert len(ran.calls) == 1 and not idle.calls, setting
    grid, kwargs = kernel.calls[0]
    assert "num_warps" in kwargs and "BLOCK_M" in kwargs and grid[0] >= 1


@pytest.mark.parametrize("autotune", ["1", "0"])
def test_fp32_attention_runs_its_measured_configuration(monkeypatch, autotune):
    """fp32 attention never goes through the 16-bit autotuners or fixed configs (their tiles spill with
    FMA dots): each kernel runs the one configuration its fp32 table gives for the padded head dim and
    dropout, with autotuning on or off; 16-bit inputs keep the autotuner."""
    names = {"_attention_fwd_kernel": "_fwd_tuned", "_attention_bwd_dq_kernel": "_bwd_dq_tuned",
             "_attention_bwd_dkdv_kernel": "_bwd_dkdv_tuned"}
    tables = {"_attention_fwd_kernel": fa._FP32_FWD, "_attention_bwd_dq_kernel": fa._FP32_BWD_DQ,
              "_attention_bwd_dkdv_kernel": fa._FP32_BWD_DKDV}
    kernels, tuners = {}, {}
    for kernel_name, tuned_name in names.items():
        kernels[kernel_name], tuners[kernel_name] = _Recorder(), _Recorder({"BLOCK_M": 32, "BLOCK_N": 32})
        monkeypatch.setattr(fa, kernel_name, kernels[kernel_name])
        monkeypatch.setattr(fa, tuned_name, tuners[kernel_name])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("FASTBERT_AUTOTUNE", autotune)
    seen = set()
    for head_dim, block_d in ((8, 16), (24, 32), (64, 64), (96, 128), (128, 128)):
        for dropout_p in (0.0, 0.1):
            q = torch.randn(1, 8, 2, head_dim)
            out, lse = fa.forward(q, q, q, softmax_scale=0.25, dropout_p=dropout_p, seed=3)
            fa.backward(q, q, q, q, out, lse, softmax_scale=0.25, dropout_p=dropout_p, seed=3)
            for kernel_name, recorder in kernels.items():
                assert not tuners[kernel_name].calls, kernel_name
                grid, kwargs = recorder.calls.pop()
                want = fa.fp32_config(tables[kernel_name], block_d, dropout_p > 0.0)
                got = (kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"], kwargs["num_stages"])
                assert got == (want.kwargs["BLOCK_M"], want.kwargs["BLOCK_N"], want.num_warps, want.num_stages)
                assert kwargs["BLOCK_D"] == block_d and kwargs["DOT_PRECISION"] == "ieee"
                seen.add((kernel_name, got))
    assert len({config for _, config in seen}) > 1  # the tables do differ by head dim / dropout
    bf16 = torch.randn(1, 8, 2, 64, dtype=torch.bfloat16)
    fa.forward(bf16, bf16, bf16, softmax_scale=0.25)
    ran = tuners["_attention_fwd_kernel"] if autotune == "1" else kernels["_attention_fwd_kernel"]
    assert len(ran.calls) == 1 and ran.calls[0][1]["DOT_PRECISION"] == "tf32"


@pytest.mark.parametrize("seed", [-1, 2**31, 1.5, True])
def test_kernel_seeds_follow_one_rule(seed):
    with pytest.raises(ValueError, match=r"\[0, 2\*\*31\)"):
        launch.check_seed(seed)
    q = torch.randn(1, 4, 1, 16)
    with pytest.raises(ValueError, match="int32"):
        fa.forward(q, q, q, softmax_scale=0.25, dropout_p=0.1, seed=seed)
    assert launch.check_seed(2**31 - 1) == 2**31 - 1


def test_ops_draw_seeds_by_the_same_rule():
    from fastbert.ops import _dispatch

    seeds = [int(_dispatch.dropout_seed(0.1)) for _ in range(100)]
    assert all(launch.check_seed(s) == s for s in seeds) and len(set(seeds)) > 90


def test_column_sum_adds_only_the_rows_in_use(poison_empty):
    partial = torch.randn(2, 9, 37)
    partial[:, 5:] = float("nan")  # rows past num_rows: never read
    outs = [torch.empty(37), torch.empty(37, dtype=torch.float16)]
    column_sum.column_sums_into(partial, outs, num_rows=5)
    torch.testing.assert_close(outs[0], partial[0, :5].sum(0))
    torch.testing.assert_close(outs[1], partial[1, :5].sum(0).half())
    with pytest.raises(ValueError, match="num_rows"):
        column_sum.column_sums_into(partial, outs, num_rows=10)


def test_backward_grids_split_rows_across_the_interpreter_programs(monkeypatch):
    """The LayerNorm and GELU backward kernels take their row ranges from the grid they are launched on:
    the partial sums of every program reach dW/dB, whatever the program count."""
    x = torch.randn(45, 24, requires_grad=True)
    w, b = torch.randn(24, requires_grad=True), torch.randn(24, requires_grad=True)
    for programs in (1, 3, 7):
        monkeypatch.setattr(launch, "INTERPRETER_PROGRAMS", programs)
        monkeypatch.setattr(layer_norm, "INTERPRETER_PROGRAMS", programs)
        with backend.use("triton"):
            y = ops.dropout_add_layer_norm(x, None, w, b, 1e-5, 0.0)
            g = ops.bias_gelu(x, b)
        grads = torch.autograd.grad((y.square().sum() + g.square().sum()), (x, w, b))
        ref_y = torch.nn.functional.layer_norm(x, (24,), w, b, 1e-5)
        ref_g = torch.nn.functional.gelu(x + b)
        ref = torch.autograd.grad((ref_y.square().sum() + ref_g.square().sum()), (x, w, b))
        for got, want in zip(grads, ref):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
