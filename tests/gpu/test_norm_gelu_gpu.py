"""GPU checks of the fused LayerNorm and bias+GELU kernels at BERT sizes, in bf16 (the interpreter cannot
test the compiled, autotuned launches). Reference: the same math in fp32 on the same bf16 inputs; the
kernel's error must stay within a small factor of eager bf16 PyTorch's error."""
import pytest
import torch
import torch.nn.functional as F

from fastbert import backend, ops
from tests.kernel_checks import assert_error_within

pytestmark = pytest.mark.gpu

ROWS = 16384
HIDDEN = [768, 1024]


def _ln_inputs(n, dtype=torch.bfloat16):
    x = torch.randn(ROWS, n, device="cuda", dtype=dtype).requires_grad_()
    r = torch.randn(ROWS, n, device="cuda", dtype=dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(n, device="cuda")).to(dtype).requires_grad_()
    b = torch.randn(n, device="cuda", dtype=dtype).requires_grad_()
    return x, r, w, b


def _ln(x, r, w, b, keep, scale, dtype):
    h = x.to(dtype) * keep.to(dtype) * scale + r.to(dtype)
    return F.layer_norm(h, (h.shape[-1],), w.to(dtype), b.to(dtype), 1e-12)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("n", HIDDEN)
def test_layer_norm_bf16_vs_fp32(n, dropout_p):
    x, r, w, b = _ln_inputs(n)
    with backend.use("triton"):
        y = ops.dropout_add_layer_norm(x, r, w, b, 1e-12, dropout_p)
    grad_out = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, r, w, b), grad_out)
    # The mask the kernel drew: grad_x is zero exactly where x was dropped (the residual's gradient is not).
    keep = (grads[0] != 0) if dropout_p else torch.ones_like(x, dtype=torch.bool)
    if dropout_p:
        assert abs((~keep).float().mean().item() - dropout_p) <= 0.02 * dropout_p
    scale = 1.0 / (1.0 - dropout_p)
    y32 = _ln(x, r, w, b, keep, scale, torch.float32)
    grads32 = torch.autograd.grad(y32, (x, r, w, b), grad_out.float())
    y_pt = _ln(x, r, w, b, keep, scale, torch.bfloat16)
    grads_pt = torch.autograd.grad(y_pt, (x, r, w, b), grad_out)
    assert_error_within("out", y, y_pt, y32)
    for name, g, g_pt, g32 in zip(("x", "residual", "weight", "bias"), grads, grads_pt, grads32):
        assert_error_within(f"grad {name}", g, g_pt, g32)


@pytest.mark.parametrize("n", HIDDEN + [3072])
def test_bias_gelu_bf16_vs_fp32(n):
    x = (3 * torch.randn(ROWS, n, device="cuda")).bfloat16().requires_grad_()
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16).requires_grad_()
    with backend.use("triton"):
        y = ops.bias_gelu(x, bias)
    grad_out = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, bias), grad_out)
    y32 = F.gelu(x.float() + bias.float())
    grads32 = torch.autograd.grad(y32, (x, bias), grad_out.float())
    y_pt = F.gelu(x + bias)
    grads_pt = torch.autograd.grad(y_pt, (x, bias), grad_out)
    assert_error_within("out", y, y_pt, y32)
    for name, g, g_pt, g32 in zip(("x", "bias"), grads, grads_pt, grads32):
        assert_error_within(f"grad {name}", g, g_pt, g32)


def test_weight_gradients_are_deterministic():
    x, r, w, b = _ln_inputs(1024)
    runs = []
    for _ in range(2):
        with backend.use("triton"):
            y = ops.dropout_add_layer_norm(x, r, w, b, 1e-12, 0.0)
        runs.append(torch.autograd.grad(y, (w, b), torch.ones_like(y)))
    assert all(torch.equal(a, c) for a, c in zip(*runs))


def test_auto_backend_takes_the_kernels_for_cuda_tensors(monkeypatch):
    import fastbert.kernels.gelu as gelu_kernels
    import fastbert.kernels.layer_norm as ln_kernels

    calls = []
    for module, name in ((ln_kernels, "layer_norm_fwd"), (gelu_kernels, "bias_gelu_fwd")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, _o=original, _n=name: calls.append(_n) or _o(*args))
    x, r, w, b = _ln_inputs(768)
    with backend.use("auto"):
        ops.dropout_add_layer_norm(x, r, w, b)
        ops.bias_gelu(x, b)
    assert calls == ["layer_norm_fwd", "bias_gelu_fwd"]


def test_autocast_residual_stream_stays_fp32():
    """Under CUDA autocast: bf16 sublayer output + fp32 residual -> fp32, as eager autocast gives."""
    x = torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(4096, 768, device="cuda")
    w, b = torch.randn(768, device="cuda"), torch.randn(768, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with backend.use("triton"):
            y = ops.dropout_add_layer_norm(x, r, w, b)
        with backend.use("torch"):
            y_torch = ops.dropout_add_layer_norm(x, r, w, b)
    assert y.dtype == y_torch.dtype == torch.float32
    torch.testing.assert_close(y, y_torch, rtol=1e-5, atol=1e-5)
