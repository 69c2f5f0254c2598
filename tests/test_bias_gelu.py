"""fastbert.ops.bias_gelu: the Triton kernels (under TRITON_INTERPRET=1 on the CPU) against a float64
reference, flash-attention style: the kernel's error must stay within a small factor of the error
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
SHAPES = [(37, 96), (5, 1000), (3, 7, 768), (130, 300)]


def _check_against_reference(x, bias):
    with backend.use("triton"):
        y = ops.bias_gelu(x, bias)
    grad_out = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, bias), grad_out)
    y64 = F.gelu(x.double() + bias.double())
    grads64 = torch.autograd.grad(y64, (x, bias), grad_out.double())
    y_pt = F.gelu(x + bias)
    grads_pt = torch.autograd.grad(y_pt, (x, bias), grad_out)
    assert_error_within("out", y, y_pt, y64)
    for name, g, g_pt, g64 in zip(("x", "bias"), grads, grads_pt, grads64):
        assert_error_within(f"grad {name}", g, g_pt, g64)
    return y, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(poison_empty, shape, dtype):
    # Spread of 3: the interesting part of GELU (the knee, the negative tail) and its saturation.
    x = (3 * torch.randn(shape)).to(dtype).requires_grad_()
    bias = torch.randn(shape[-1], dtype=dtype).requires_grad_()
    _check_against_reference(x, bias)


def test_hidden_size_8192(poison_empty):
    _check_against_reference(torch.randn(3, 8192).requires_grad_(), torch.randn(8192).requires_grad_())


@pytest.mark.parametrize("layout", ["column_strided", "transposed", "row_strided"])
def test_non_contiguous_input(poison_empty, layout):
    n = 96
    if layout == "column_strided":
        x = torch.randn(21, 2 * n)[:, ::2]
    elif layout == "transposed":
        x = torch.randn(7, 3, n).transpose(0, 1)
    else:
        x = torch.randn(21, n + 40)[:, 5:n + 5]
    assert not x.is_contiguous()
    _check_against_reference(x.requires_grad_(), torch.randn(n).requires_grad_())


def test_large_fp16_values_stay_finite():
    """GELU of large inputs is the identity (positive) or 0 (negative); the derivative 1 or 0, no overflow."""
    x = ((torch.rand(16, 256) * 2 - 1) * 6e4).half().requires_grad_()
    bias = torch.zeros(256, dtype=torch.float16).requires_grad_()
    y, grads = _check_against_reference(x, bias)
    assert all(torch.isfinite(g).all() for g in grads)


def test_bias_in_another_dtype_keeps_x_dtype():
    """An fp32 bias with a bf16 x (autocast's Linear output): bf16 out, each gradient in its input's dtype."""
    x = torch.randn(33, 64, dtype=torch.bfloat16).requires_grad_()
    bias = torch.randn(64).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with backend.use("triton"):
            y = ops.bias_gelu(x, bias)
        with backend.use("torch"):
            y_torch = ops.bias_gelu(x, bias)
    assert y.dtype == y_torch.dtype == torch.bfloat16
    gx, gb = torch.autograd.grad(y, (x, bias), torch.ones_like(y))
    assert gx.dtype == torch.bfloat16 and gb.dtype == torch.float32
    y64 = F.gelu(x.double() + bias.double())
    # Computed in fp32 from the exact inputs and rounded once: within one bf16 step of float64.
    assert (y.double() - y64).abs().max().item() <= torch.finfo(torch.bfloat16).eps * y64.abs().max().item()


def test_bias_gradient_is_deterministic():
    x = torch.randn(300, 200).requires_grad_()
    bias = torch.randn(200).requires_grad_()
    runs = []
    for _ in range(2):
        with backend.use("triton"):
            y = ops.bias_gelu(x, bias)
        runs.append(torch.autograd.grad(y, bias, torch.ones_like(y))[0])
    assert torch.equal(runs[0], runs[1])


def test_triton_path_runs_the_kernels(monkeypatch):
    import fastbert.kernels.gelu as kernels

    calls = []
    for name in ("bias_gelu_fwd", "bias_gelu_bwd"):
        original = getattr(kernels, name)

        def counting(*args, _original=original, _name=name):
            calls.append(_name)
            return _original(*args)

        monkeypatch.setattr(kernels, name, counting)
    x = torch.randn(9, 48).requires_grad_()
    bias = torch.randn(48).requires_grad_()
    with backend.use("triton"):
        ops.bias_gelu(x, bias).sum().backward()
    assert calls == ["bias_gelu_fwd", "bias_gelu_bwd"]
    with backend.use("torch"):
        ops.bias_gelu(x, bias)
    assert len(calls) == 2


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_bad_inputs_raise_clear_errors(backend_name):
    x = torch.randn(4, 16)
    with backend.use(backend_name):
        with pytest.raises(ValueError, match="bias must have shape"):
            ops.bias_gelu(x, torch.zeros(15))
        with pytest.raises(ValueError, match="bias must have shape"):
            ops.bias_gelu(x, torch.zeros(4, 16))
        with pytest.raises(DtypeError, match="x must be"):
            ops.bias_gelu(x.to(torch.int32), torch.zeros(16))
        with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
            ops.bias_gelu(x, [0.0] * 16)


def test_float64_raises_under_triton_and_falls_back_under_auto():
    x = torch.randn(4, 16, dtype=torch.float64)
    bias = torch.zeros(16, dtype=torch.float64)
    with backend.use("triton"), pytest.raises(ValueError, match="float64"):
        ops.bias_gelu(x, bias)
    with backend.use("auto"):
        assert ops.bias_gelu(x, bias).dtype == torch.float64


def test_custom_ops_pass_opcheck():
    fwd, bwd = torch.ops.fastbert.bias_gelu_fwd, torch.ops.fastbert.bias_gelu_bwd
    x, bias = torch.randn(6, 40), torch.randn(40)
    torch.library.opcheck(fwd, (x, bias))
    torch.library.opcheck(bwd, (torch.randn(6, 40), x, bias, torch.empty(6, 40), torch.empty(40)))


def test_compiles_with_torch_compile(monkeypatch):
    """The fake implementations let torch.compile trace through the op (aot_eager: no C++ compiler needed),
    and the compiled graph still calls the kernels."""
    import fastbert.kernels.gelu as kernels

    calls = []
    original = kernels.bias_gelu_fwd
    monkeypatch.setattr(kernels, "bias_gelu_fwd", lambda *args: calls.append(1) or original(*args))
    x = torch.randn(10, 32).requires_grad_()
    bias = torch.randn(32).requires_grad_()

    def f(x, bias):
        return ops.bias_gelu(x * 2.0, bias).sum()

    with backend.use("triton"):
        compiled = torch.compile(f, backend="aot_eager")
        loss = compiled(x, bias)
        loss.backward()
    assert calls, "the compiled function did not run the Triton kernel"
    assert torch.allclose(loss, F.gelu(2 * x + bias).sum(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(bias.grad, torch.autograd.grad(F.gelu(2 * x + bias).sum(), bias)[0], rtol=1e-5, atol=1e-5)


def test_no_grad_call_gives_the_autograd_result():
    """Without autograd the op launches the forward kernel directly (no Function node): same numbers."""
    x = torch.randn(13, 72, dtype=torch.float16).requires_grad_()
    bias = torch.randn(72, dtype=torch.float16)
    with backend.use("triton"):
        y = ops.bias_gelu(x, bias)
        with torch.no_grad():
            y_inference = ops.bias_gelu(x, bias)
    assert y.grad_fn is not None and y_inference.grad_fn is None
    assert torch.equal(y.detach(), y_inference)


def test_empty_batch(poison_empty):
    """No rows: an empty output and a zero bias gradient (nothing to sum), no kernel error."""
    x = torch.randn(0, 40).requires_grad_()
    bias = torch.randn(40).requires_grad_()
    with backend.use("triton"):
        y = ops.bias_gelu(x, bias)
    gx, gb = torch.autograd.grad(y, (x, bias), torch.ones_like(y))
    assert y.shape == gx.shape == (0, 40)
    assert torch.equal(gb, torch.zeros(40))
