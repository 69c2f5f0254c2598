"""GPU checks of fastbert.ops.mlm_loss at BERT sizes (the interpreter cannot run the compiled kernel, nor
bf16 at these sizes): accuracy against fp32 on the same rounded inputs, within a small factor of the
unfused head's own error; no host sync; peak memory against the unfused head; torch.compile."""
import pytest
import torch

from fastbert import backend, ops
from fastbert.kernels.limits import mlm_logits_width
from fastbert.ops import mlm_head
from tests.kernel_checks import assert_error_within

pytestmark = pytest.mark.gpu


def _inputs(targets, vocab, hidden=768, ignored=0.1):
    h = torch.randn(targets, hidden, device="cuda").requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda") * (3 / hidden ** 0.5)).requires_grad_()
    b = (0.5 * torch.randn(vocab, device="cuda")).requires_grad_()
    t = torch.randint(0, vocab, (targets,), device="cuda")
    t[torch.rand(targets, device="cuda") < ignored] = -100
    return h, w, b, t


def _loss_and_grads(fn, leaves, t, grad_loss, autocast_dtype=None):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    with torch.autocast("cuda", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss, num_correct = fn(*leaves, t)
    grads = torch.autograd.grad(loss, leaves, torch.tensor(grad_loss, device="cuda", dtype=loss.dtype))
    return loss, num_correct, grads


def _fused(*args):
    with backend.use("triton"):
        return ops.mlm_loss(*args)


@pytest.mark.parametrize("vocab", [30522, 250_002])
def test_autocast_bf16_vs_fp32(vocab):
    """The training setup: fp32 weights under bf16 autocast. Exact: fp32 math on the bf16-rounded inputs."""
    h, w, b, t = _inputs(2048 if vocab > 100_000 else 8192, vocab)
    loss, num_correct, grads = _loss_and_grads(_fused, (h, w, b), t, 1.0, torch.bfloat16)
    same_loss, same_correct, same_grads = _loss_and_grads(ops.mlm_loss_reference, (h, w, b), t, 1.0, torch.bfloat16)
    rounded = [x.detach().bfloat16().float() for x in (h, w, b)]
    exact_loss, _, exact_grads = _loss_and_grads(ops.mlm_loss_reference, rounded, t, 1.0)
    assert_error_within("loss", loss, same_loss, exact_loss, slack_ulps=2.0)
    for name, got, same, exact in zip(("hidden", "weight", "bias"), grads, same_grads, exact_grads):
        assert got.dtype == torch.float32
        assert_error_within(f"grad {name}", got, same, exact)
    # Logits that differ by one bf16 rounding (chunked vs whole GEMMs) may flip a near-tie, nothing more.
    assert abs(num_correct.item() - same_correct.item()) <= max(2, t.numel() // 1000)


@pytest.mark.parametrize("dtype, grad_loss", [(torch.bfloat16, 1.0), (torch.float16, 65536.0)])
def test_16_bit_weights_and_a_loss_scale(dtype, grad_loss):
    """Pure 16-bit inputs; fp16 with GradScaler's initial scale: the gradients are scaled in fp32 in the
    backward, so nothing underflows that the unfused head keeps."""
    h, w, b, t = (x.detach().to(dtype).requires_grad_() if x.is_floating_point() else x for x in _inputs(4096, 30522))
    loss, _, grads = _loss_and_grads(_fused, (h, w, b), t, grad_loss)
    same_loss, _, same_grads = _loss_and_grads(ops.mlm_loss_reference, (h, w, b), t, grad_loss)
    exact_loss, _, exact_grads = _loss_and_grads(ops.mlm_loss_reference, [x.float() for x in (h, w, b)], t, grad_loss)
    assert_error_within("loss", loss, same_loss, exact_loss, slack_ulps=2.0)
    for name, got, same, exact in zip(("hidden", "weight", "bias"), grads, same_grads, exact_grads):
        assert_error_within(f"grad {name}", got, same, exact)


def test_many_chunks(monkeypatch):
    h, w, b, t = _inputs(3000, 30522)
    one = _loss_and_grads(_fused, (h, w, b), t, 1.0, torch.bfloat16)
    monkeypatch.setattr(mlm_head, "CHUNK_BYTES", 700 * mlm_logits_width(30522) * 2)
    assert mlm_head.chunk_rows(3000, 30522, torch.bfloat16) < 700
    many = _loss_and_grads(_fused, (h, w, b), t, 1.0, torch.bfloat16)
    assert (one[0] - many[0]).abs() <= 1e-5 * one[0].abs()
    for a, c in zip(one[2], many[2]):
        assert (a - c).abs().max() <= 2e-2 * a.abs().max()  # bf16 logits, rounded alike; dW summed in another order


def test_no_host_sync():
    h, w, b, t = _inputs(4096, 30522)
    _loss_and_grads(_fused, (h, w, b), t, 1.0, torch.bfloat16)  # compile the kernel first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _loss_and_grads(_fused, (h, w, b), t, 1.0, torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_peak_memory_a_quarter_of_the_unfused_head():
    h, w, b, t = _inputs(20480, 30522, ignored=0.0)
    peaks = {}
    for name, fn in (("fused", _fused), ("reference", ops.mlm_loss_reference)):
        _loss_and_grads(fn, (h, w, b), t, 1.0, torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _loss_and_grads(fn, (h, w, b), t, 1.0, torch.bfloat16)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - before
    assert peaks["fused"] * 4 <= peaks["reference"], peaks


def test_torch_compile_inductor():
    h, w, b, t = _inputs(2048, 30522)

    def step(h, w, b, t):
        with backend.use("triton"):
            loss, num_correct = ops.mlm_loss(h, w, b, t)
        return loss * 2.0, num_correct

    eager = _loss_and_grads(step, (h, w, b), t, 1.0, torch.bfloat16)
    compiled = _loss_and_grads(torch.compile(step, fullgraph=True), (h, w, b), t, 1.0, torch.bfloat16)
    assert torch.equal(eager[1], compiled[1])
    assert (eager[0] - compiled[0]).abs() <= 1e-6 * eager[0].abs()
    for a, c in zip(eager[2], compiled[2]):
        assert torch.equal(a, c)


def test_gemms_take_the_padded_chunk_without_a_copy():
    """cuBLAS takes the padded buffer's row stride as a leading dimension: the logits GEMM writes into
    it, and the gradient GEMMs read from it, with no temporary the size of the chunk."""
    rows, vocab, hidden = 4096, 30522, 768
    h = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16)
    buffer = torch.empty(rows, mlm_logits_width(vocab), device="cuda", dtype=torch.bfloat16)
    logits = buffer[:, :vocab]
    dh = torch.empty_like(h)
    # (GEMM, bytes of the result it allocates)
    gemms = [(lambda: torch.mm(h, w.t(), out=logits), 0), (lambda: torch.mm(logits, w, out=dh), 0),
             (lambda: torch.mm(logits.t(), h), w.numel() * 2)]
    for gemm, result_bytes in gemms:
        gemm()  # cuBLAS' workspace is allocated on first use
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        gemm()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before - result_bytes
        assert extra < logits.numel() * 2 // 4, extra
    assert logits.data_ptr() == buffer.data_ptr()
    assert (logits.float() - (h.float() @ w.float().t())).abs().max() <= 0.05 * (h.float() @ w.float().t()).abs().max()
