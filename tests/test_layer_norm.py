"""fastbert.ops.dropout_add_layer_norm: the Triton kernels (under TRITON_INTERPRET=1 on the CPU) against a
float64 reference, flash-attention style: the kernel's error must stay within a small factor of the error
same-precision PyTorch makes on the same inputs."""
import pytest
import torch
import torch.nn.functional as F

from fastbert import backend, ops
from fastbert._validation import DtypeError
from tests.kernel_checks import assert_error_within

# The interpreter's own scalar handling warns on every loop bound; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(37, 96), (5, 1000), (3, 7, 768)]


def _ln64(x, residual, weight, bias, eps, keep=None, scale=1.0):
    """Float64 ``LayerNorm(x * keep * scale + residual)``: the reference every result is measured against."""
    h = x.double()
    if keep is not None:
        h = h * keep * scale
    if residual is not None:
        h = h + residual.double()
    return F.layer_norm(h, (h.shape[-1],), weight.double(), None if bias is None else bias.double(), eps)


def _ln_same_precision(x, residual, weight, bias, eps, keep=None, scale=1.0):
    """What eager PyTorch computes in the inputs' own dtype (the error yardstick)."""
    h = x
    if keep is not None:
        h = h * keep.to(x.dtype) * scale
    if residual is not None:
        h = h + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps)


def _inputs(shape, dtype, residual=True, bias=True):
    n = shape[-1]
    x = torch.randn(shape, dtype=dtype).requires_grad_()
    r = torch.randn(shape, dtype=dtype).requires_grad_() if residual else None
    w = (1.0 + 0.5 * torch.randn(n)).to(dtype).requires_grad_()
    b = torch.randn(n, dtype=dtype).requires_grad_() if bias else None
    return x, r, w, b


def _leaves(*tensors):
    return [t for t in tensors if t is not None]


def _check_against_reference(x, r, w, b, eps=1e-12, dropout_p=0.0, keep=None):
    """Run the Triton path, then compare the output and every gradient with float64 and same-precision torch."""
    assert keep is not None or not dropout_p, "a dropout run is compared using the mask it drew"
    scale = 1.0 / (1.0 - dropout_p) if dropout_p else 1.0
    with backend.use("triton"):
        y = ops.dropout_add_layer_norm(x, r, w, b, eps, dropout_p)
    grad_out = torch.randn_like(y)
    leaves = _leaves(x, r, w, b)
    grads = torch.autograd.grad(y, leaves, grad_out)
    y64 = _ln64(x, r, w, b, eps, keep, scale)
    grads64 = torch.autograd.grad(y64, leaves, grad_out.double())
    y_pt = _ln_same_precision(x, r, w, b, eps, keep, scale)
    grads_pt = torch.autograd.grad(y_pt, leaves, grad_out)
    assert_error_within("out", y, y_pt, y64)
    for name, g, g_pt, g64 in zip(("x", "residual", "weight", "bias"), grads, grads_pt, grads64):
        assert_error_within(f"grad {name}", g, g_pt, g64)
    return y, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(poison_empty, shape, dtype):
    _check_against_reference(*_inputs(shape, dtype))


@pytest.mark.parametrize("residual,bias", [(False, True), (True, False), (False, False)])
def test_optional_residual_and_bias(poison_empty, residual, bias):
    _check_against_reference(*_inputs((29, 200), torch.float32, residual=residual, bias=bias))


def test_hidden_size_8192(poison_empty):
    _check_against_reference(*_inputs((3, 8192), torch.float32))


@pytest.mark.parametrize("layout", ["column_strided", "transposed", "row_strided", "expanded_residual"])
def test_non_contiguous_inputs(poison_empty, layout):
    n = 96
    if layout == "column_strided":
        x = torch.randn(21, 2 * n)[:, ::2]
        r = torch.randn(21, n)
    elif layout == "transposed":
        x = torch.randn(7, 3, n).transpose(0, 1)
        r = torch.randn(3, 7, n)
    elif layout == "row_strided":
        x = torch.randn(21, n + 40)[:, 5:n + 5]
        r = torch.randn(21, n + 8)[:, :n]
    else:  # the embeddings' position+type sum, broadcast over the batch (row stride 0 in one dimension)
        x = torch.randn(4, 6, n)
        r = torch.randn(1, 6, n).expand(4, 6, n)
    assert not x.is_contiguous() or not r.is_contiguous()
    x = x.requires_grad_()
    r = r.detach().requires_grad_() if r.is_leaf else r
    w = torch.randn(n).requires_grad_()
    b = torch.randn(n).requires_grad_()
    _check_against_reference(x, r, w, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_near_constant_rows(dtype):
    """Rows whose variance is ~0 (a large offset plus tiny noise, and exactly constant rows)."""
    n = 160
    offset = 100.0 if dtype == torch.float32 else 10.0
    x = (offset + 1e-3 * torch.randn(12, n)).to(dtype)
    x[::3] = offset  # exactly constant: y must be the bias, not NaN
    r = torch.zeros(12, n, dtype=dtype)
    w = torch.randn(n, dtype=dtype)
    b = torch.randn(n, dtype=dtype)
    x, r, w, b = (t.requires_grad_() for t in (x, r, w, b))
    y, grads = _check_against_reference(x, r, w, b, eps=1e-5)
    assert torch.equal(y[::3], b.detach().expand(4, n))
    assert all(torch.isfinite(g).all() for g in grads)


def test_large_fp16_values_stay_finite():
    """x + residual overflows fp16 (65504) but not the kernel's fp32 sum: the output stays finite and right."""
    n = 256
    x = (torch.rand(16, n) * 2e4 + 4e4).half().requires_grad_()
    r = (torch.rand(16, n) * 2e4 + 4e4).half().requires_grad_()
    w = torch.randn(n, dtype=torch.float16).requires_grad_()
    b = torch.randn(n, dtype=torch.float16).requires_grad_()
    assert not torch.isfinite(x.detach() + r.detach()).all()  # the premise: fp16 arithmetic overflows
    with backend.use("triton"):
        y = ops.dropout_add_layer_norm(x, r, w, b, 1e-12, 0.0)
    grads = torch.autograd.grad(y, (x, r, w, b), torch.randn_like(y))
    y64 = _ln64(x, r, w, b, 1e-12)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    # Within a couple of fp16 rounding steps at the output's scale.
    tol = 2 * torch.finfo(torch.float16).eps * y64.abs().max().item()
    assert (y.double() - y64).abs().max().item() <= tol


# --------------------------------------------------------------------------------------------- dropout
def _dropout_run(x, r, w, b, p, seed):
    """Output and (x, residual, weight, bias) gradients of one dropout run under torch seed ``seed``."""
    torch.manual_seed(seed)
    with backend.use("triton"):
        y = ops.dropout_add_layer_norm(x, r, w, b, 1e-12, p)
    # A gradient with no zeros, so the residual's gradient is nonzero everywhere.
    grad_out = (1.0 + torch.arange(y.shape[-1]) / y.shape[-1]).to(y.dtype).expand_as(y)
    grads = torch.autograd.grad(y, (x, r, w, b), grad_out)
    return y.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_matches_reference_with_the_kernels_mask(poison_empty, dtype):
    """Recover the mask from a run's gradients (grad_x = grad_residual * keep / (1-p)), then check the
    output and all gradients of that run against float64 with that mask."""
    p = 0.3
    x, r, w, b = _inputs((45, 96), dtype)
    _, (gx, gr, _, _) = _dropout_run(x, r, w, b, p, seed=11)
    keep = gx != 0
    assert torch.all(gr[~keep] != 0), "a zero residual gradient would hide the mask"
    torch.testing.assert_close(gx[keep].float(), (gr[keep] / (1 - p)).float(), rtol=2 * torch.finfo(dtype).eps,
                               atol=0)
    torch.manual_seed(11)  # the same seed again: the run below uses the recovered mask
    _check_against_reference(x, r, w, b, 1e-12, p, keep=keep.double())


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_fraction(p):
    """A constant positive x with a zero residual: after LayerNorm (weight 1, bias 0) dropped elements
    are exactly the negative ones."""
    rows, n = 256, 1024
    x = torch.full((rows, n), 3.0)
    with backend.use("triton"):
        y = ops.dropout_add_layer_norm(x, torch.zeros_like(x), torch.ones(n), torch.zeros(n), 1e-12, p)
    dropped = (y < 0).double().mean().item()
    assert abs(dropped - p) <= 0.02 * p, f"dropped {dropped:.4f} of the elements, expected {p}"
    # No structure: each row and each column drops close to p as well.
    per_col = (y < 0).double().mean(0)
    assert (per_col - p).abs().max().item() < 6 * (p * (1 - p) / rows) ** 0.5


def test_same_seed_same_mask_and_gradients():
    x, r, w, b = _inputs((33, 120), torch.float32)
    y1, g1 = _dropout_run(x, r, w, b, 0.2, seed=5)
    y2, g2 = _dropout_run(x, r, w, b, 0.2, seed=5)
    y3, g3 = _dropout_run(x, r, w, b, 0.2, seed=6)
    assert torch.equal(y1, y2)
    assert all(torch.equal(a, c) for a, c in zip(g1, g2))
    assert not torch.equal(y1, y3)
    assert not torch.equal(g1[0] != 0, g3[0] != 0)


def test_zero_dropout_draws_no_random_numbers_and_applies_no_mask():
    x, r, w, b = _inputs((19, 64), torch.float32)
    state = torch.get_rng_state()
    with backend.use("triton"):
        y = ops.dropout_add_layer_norm(x, r, w, b, 1e-12, 0.0)
    assert torch.equal(torch.get_rng_state(), state)
    gx, gr = torch.autograd.grad(y, (x, r), torch.randn_like(y))
    assert torch.equal(gx, gr)  # no mask, no scale: x and the residual get the same gradient
    assert_error_within("out", y, _ln_same_precision(x, r, w, b, 1e-12), _ln64(x, r, w, b, 1e-12))


# ---------------------------------------------------------------------------------- the kernel really ran
def test_triton_path_runs_the_kernels(monkeypatch):
    import fastbert.kernels.layer_norm as kernels

    calls = []
    for name in ("layer_norm_fwd", "layer_norm_bwd"):
        original = getattr(kernels, name)

        def counting(*args, _original=original, _name=name):
            calls.append(_name)
            return _original(*args)

        monkeypatch.setattr(kernels, name, counting)
    x, r, w, b = _inputs((9, 48), torch.float32)
    with backend.use("triton"):
        y = ops.dropout_add_layer_norm(x, r, w, b, 1e-12, 0.1)
    y.sum().backward()
    assert calls == ["layer_norm_fwd", "layer_norm_bwd"]
    with backend.use("torch"):
        ops.dropout_add_layer_norm(x, r, w, b)
    assert len(calls) == 2


@pytest.mark.parametrize("hidden", [1, 16, 96, 768, 1000, 1024, 4096, 8192, 16384])
def test_gpu_autotune_keeps_a_config_for_every_supported_hidden_size(hidden):
    """The GPU launch configs (not runnable under the interpreter) never prune down to nothing, and stay
    within the register budget per thread for the forward (32) and backward (16) tiles."""
    import fastbert.kernels.layer_norm as kernels
    from fastbert.kernels._launch import block_size

    block_n = block_size(hidden)
    for cap in (32, 16):
        kept = kernels._pruner(cap)(kernels._tuning_configs(), {}, BLOCK_N=block_n)
        assert kept
        per_thread = [c.kwargs["BLOCK_M"] * block_n // (32 * c.num_warps) for c in kept]
        assert max(per_thread) <= max(cap, block_n // (32 * 16)), per_thread


def test_rows_over_the_kernel_limit_are_refused_by_name_or_take_the_reference():
    """One limit (kernels/limits.py) for the op's check and the launcher's: above it the triton backend
    refuses by name, auto takes the torch reference."""
    from fastbert.kernels.limits import MAX_HIDDEN

    hidden = MAX_HIDDEN + 8
    x, w, b = torch.randn(2, hidden), torch.randn(hidden), torch.randn(hidden)
    with backend.use("triton"), pytest.raises(ValueError, match=f"hidden size {hidden} > {MAX_HIDDEN}"):
        ops.dropout_add_layer_norm(x, None, w, b)
    with backend.use("auto"):
        torch.testing.assert_close(ops.dropout_add_layer_norm(x, None, w, b),
                                   torch.nn.functional.layer_norm(x, (hidden,), w, b, 1e-12))


# -------------------------------------------------------------------------------------------- autocast
def test_autocast_mixed_dtypes():
    """Under autocast a bf16 sublayer output meets an fp32 residual and fp32 parameters: the result is
    fp32 (as torch autocast runs layer_norm) and gradients come back in each input's dtype."""
    x = torch.randn(23, 64, dtype=torch.bfloat16).requires_grad_()
    r = torch.randn(23, 64).requires_grad_()
    w = torch.randn(64).requires_grad_()
    b = torch.randn(64).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16), backend.use("triton"):
        y = ops.dropout_add_layer_norm(x, r, w, b, 1e-12, 0.0)
    assert y.dtype == torch.float32
    grads = torch.autograd.grad(y, (x, r, w, b), torch.randn_like(y))
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32, torch.float32]
    with torch.autocast("cpu", dtype=torch.bfloat16), backend.use("torch"):
        y_torch = ops.dropout_add_layer_norm(x, r, w, b, 1e-12, 0.0)
    assert y_torch.dtype == torch.float32
    y64 = _ln64(x, r, w, b, 1e-12)
    assert (y.double() - y64).abs().max().item() <= 1e-5 * y64.abs().max().item()


# ----------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_bad_inputs_raise_clear_errors(backend_name):
    x = torch.randn(4, 16)
    w, b = torch.ones(16), torch.zeros(16)
    with backend.use(backend_name):
        with pytest.raises(ValueError, match="weight must have shape"):
            ops.dropout_add_layer_norm(x, None, torch.ones(15), b)
        with pytest.raises(ValueError, match="bias must have shape"):
            ops.dropout_add_layer_norm(x, None, w, torch.zeros(4, 4))
        with pytest.raises(ValueError, match="residual"):
            ops.dropout_add_layer_norm(x, torch.randn(4, 8), w, b)
        with pytest.raises(DtypeError, match="residual"):
            ops.dropout_add_layer_norm(x, torch.randn(4, 16).half(), w, b)
        with pytest.raises(TypeError, match="x must be float16"):
            ops.dropout_add_layer_norm(torch.ones(4, 16, dtype=torch.int64), None, w, b)
        with pytest.raises(ValueError, match="dropout_p"):
            ops.dropout_add_layer_norm(x, None, w, b, 1e-12, 1.0)
        with pytest.raises(ValueError, match="eps"):
            ops.dropout_add_layer_norm(x, None, w, b, 0.0)


def test_inputs_beyond_the_kernel_raise_under_triton_and_fall_back_under_auto():
    x64 = torch.randn(4, 16, dtype=torch.float64)
    with backend.use("triton"), pytest.raises(ValueError, match="float64"):
        ops.dropout_add_layer_norm(x64, None, torch.ones(16, dtype=torch.float64), None)
    wide = torch.randn(2, 16385)
    with backend.use("triton"), pytest.raises(ValueError, match="hidden size 16385"):
        ops.dropout_add_layer_norm(wide, None, torch.ones(16385), None)
    with backend.use("auto"):  # CPU tensors: auto takes the torch reference
        out = ops.dropout_add_layer_norm(x64, None, torch.ones(16, dtype=torch.float64), None)
    assert out.dtype == torch.float64


# ------------------------------------------------------------------------------------- custom-op checks
def test_custom_ops_pass_opcheck():
    fwd, bwd = torch.ops.fastbert.dropout_add_layer_norm_fwd, torch.ops.fastbert.dropout_add_layer_norm_bwd
    x, r = torch.randn(6, 40), torch.randn(6, 40)
    w, b = torch.randn(40), torch.randn(40)
    seed, no_seed = torch.tensor([1234]), torch.tensor([0])
    torch.library.opcheck(fwd, (x, r, w, b, 1e-12, 0.25, seed, torch.float32))
    torch.library.opcheck(fwd, (x, None, w, None, 1e-5, 0.0, no_seed, torch.float32))
    _, mean, rstd = fwd(x, r, w, b, 1e-12, 0.25, seed, torch.float32)
    buffers = (torch.empty(6, 40), torch.empty(6, 40), torch.empty(40), torch.empty(40))
    torch.library.opcheck(bwd, (torch.randn(6, 40), x, r, w, mean, rstd, 0.25, seed, *buffers))


def test_import_does_not_load_triton():
    import subprocess
    import sys

    code = ("import sys, fastbert, torch; fastbert.ops.dropout_add_layer_norm(torch.randn(2, 8), None, "
            "torch.ones(8), None); loaded = [m for m in sys.modules if m == 'triton' or "
            "m.startswith('fastbert.kernels.') and m != 'fastbert.kernels.limits']; print(loaded)")
    # The default backend (auto) on a CPU tensor: the torch reference, and neither triton nor a kernel
    # module imported (only the triton-free limits; a clean environment: no TRITON_INTERPRET from conftest).
    run = subprocess.run([sys.executable, "-c", code], check=True, env={"PATH": ""}, capture_output=True, text=True)
    assert run.stdout.strip() == "[]", f"imported: {run.stdout.strip()}"


def test_compiles_with_torch_compile(monkeypatch):
    """The fake implementations let torch.compile trace through the op (aot_eager: no C++ compiler needed),
    and the compiled graph still calls the kernels."""
    import fastbert.kernels.layer_norm as kernels

    calls = []
    original = kernels.layer_norm_fwd
    monkeypatch.setattr(kernels, "layer_norm_fwd", lambda *args: calls.append(1) or original(*args))
    x, r, w, b = _inputs((10, 32), torch.float32)

    def f(x, r, w, b):
        return ops.dropout_add_layer_norm(x * 2.0, r, w, b, 1e-5, 0.0).square().sum()

    with backend.use("triton"):
        loss = torch.compile(f, backend="aot_eager")(x, r, w, b)
    assert calls, "the compiled function did not run the Triton kernel"
    grads = torch.autograd.grad(loss, (x, r, w, b))
    expected = F.layer_norm(2 * x + r, (32,), w, b, 1e-5).square().sum()
    expected_grads = torch.autograd.grad(expected, (x, r, w, b))
    torch.testing.assert_close(loss, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_no_grad_call_gives_the_autograd_result():
    """Without autograd the op launches the forward kernel directly (no Function node): same numbers."""
    x, r, w, b = _inputs((13, 72), torch.float16)
    with backend.use("triton"):
        y = ops.dropout_add_layer_norm(x, r, w, b)
        with torch.no_grad():
            y_inference = ops.dropout_add_layer_norm(x, r, w, b)
    assert y.grad_fn is not None and y_inference.grad_fn is None
    assert torch.equal(y.detach(), y_inference)


def test_empty_batch(poison_empty):
    """No rows: an empty output, and zero weight/bias gradients (nothing to sum), no kernel error."""
    x, r, w, b = _inputs((0, 3, 40), torch.float32)
    with backend.use("triton"):
        y = ops.dropout_add_layer_norm(x, r, w, b, 1e-12, 0.1)
    assert y.shape == (0, 3, 40)
    gx, gr, gw, gb = torch.autograd.grad(y, (x, r, w, b), torch.ones_like(y))
    assert gx.shape == gr.shape == (0, 3, 40)
    assert torch.equal(gw, torch.zeros(40)) and torch.equal(gb, torch.zeros(40))
