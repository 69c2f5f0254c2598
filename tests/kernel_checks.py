"""The flash-attention-style accuracy check shared by the kernel tests (CPU interpreter and GPU)."""
import torch


def assert_error_within(name, got, same_precision, ref, factor=3.0):
    """|got - ref| <= factor * |same_precision - ref| + one ulp at the output's scale (max norm).

    ``ref`` is the high-precision reference (float64 on the CPU, float32 on the GPU); ``same_precision``
    is what eager PyTorch computes in the inputs' own dtype, the error yardstick."""
    ref = ref.double()
    assert got.dtype == same_precision.dtype, f"{name}: dtype {got.dtype}, expected {same_precision.dtype}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - ref).abs().max().item()
    err_torch = (same_precision.double() - ref).abs().max().item()
    slack = torch.finfo(got.dtype).eps * ref.abs().max().item()
    assert err <= factor * err_torch + slack, (
        f"{name}: kernel error {err:.3g} > {factor} x torch's {err_torch:.3g} + {slack:.3g}")
