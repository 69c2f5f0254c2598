"""The flash-attention-style accuracy check shared by the kernel tests (CPU interpreter and GPU)."""
import torch

from fastbert import backend


def assert_error_within(name, got, same_precision, ref, factor=3.0, *, slack_ulps=1.0, min_scale=0.0):
    """|got - ref| <= factor * |same_precision - ref| + slack_ulps ulps at the output's scale (max norm).

    ``ref`` is the high-precision reference (float64 on the CPU, float32 on the GPU); ``same_precision``
    is what eager PyTorch computes in the inputs' own dtype, the error yardstick. The scale is the
    largest reference value, at least ``min_scale``."""
    ref = ref.double()
    assert got.dtype == same_precision.dtype, f"{name}: dtype {got.dtype}, expected {same_precision.dtype}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - ref).abs().max().item()
    err_torch = (same_precision.double() - ref).abs().max().item()
    slack = slack_ulps * torch.finfo(got.dtype).eps * max(min_scale, ref.abs().max().item())
    assert err <= factor * err_torch + slack, (
        f"{name}: kernel error {err:.3g} > {factor} x torch's {err_torch:.3g} + {slack:.3g}")


def check_against_reference(run_kernel, run_reference, inputs, ref_dtype, names=("dq", "dk", "dv"), **within):
    """The output of ``run_kernel(*inputs)`` (Triton backend) and its gradients in ``inputs``, each vs
    ``run_reference`` in ``ref_dtype`` and bounded by ``run_reference``'s own error in the inputs' dtype
    (:func:`assert_error_within`, which takes ``within``). Returns ``(out, grads, grad_out)``."""
    with backend.use("triton"):
        out = run_kernel(*inputs)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)

    exact_inputs = [x.detach().to(ref_dtype).requires_grad_() for x in inputs]
    exact = run_reference(*exact_inputs)
    exact_grads = torch.autograd.grad(exact, exact_inputs, grad_out.to(ref_dtype))
    same_inputs = [x.detach().clone().requires_grad_() for x in inputs]
    same = run_reference(*same_inputs)
    same_grads = torch.autograd.grad(same, same_inputs, grad_out)

    assert_error_within("out", out, same, exact, **within)
    for name, got, ref_same, ref_exact in zip(names, grads, same_grads, exact_grads, strict=True):
        assert_error_within(name, got, ref_same, ref_exact, **within)
    return out, grads, grad_out


def lengths_mask(lengths, seqlen, device):
    """(B, seqlen) bool key-padding mask, right-padded: row b has ``lengths[b]`` real tokens."""
    return torch.arange(seqlen, device=device)[None, :] < torch.as_tensor(lengths, device=device)[:, None]


def cu_seqlens_of(lengths, device):
    """int32 (B + 1,) cumulative sequence lengths, as the varlen layout takes them."""
    return torch.tensor([0, *torch.as_tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def gradient_scales(grads, exactly_zero=1e-9):
    """The scale each parameter's gradient error is judged at: its own largest value, or, where that
    is zero in exact arithmetic (below ``exactly_zero`` × its module's gradients: an attention key
    bias, which softmax's shift invariance cancels), the largest gradient of its module. What remains
    of such a gradient is rounding noise of the module's own computation; comparing two noises on
    their own scale depends on which vector kernels torch picks on the machine."""
    by_module = {}
    for name, grad in grads.items():
        module = name.rpartition(".")[0]
        by_module[module] = max(by_module.get(module, 0.0), grad.abs().max().item())
    scales = {}
    for name, grad in grads.items():
        own, module = grad.abs().max().item(), by_module[name.rpartition(".")[0]]
        scales[name] = module if own <= exactly_zero * module else own
    return scales
