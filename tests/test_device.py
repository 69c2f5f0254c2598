"""fastbert.device: --device and --precision resolved in one place, with clear errors."""
import pytest
import torch

from fastbert.device import resolve_device, resolve_precision


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu0")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("meta")
    with pytest.raises(TypeError, match="device must be a string"):
        resolve_device(0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda", local_rank=1)


def test_precision_on_the_cpu():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).name == "fp32"
    fp32 = resolve_precision("fp32", cpu)
    assert fp32.dtype is None and not fp32.grad_scaler().is_enabled()
    bf16 = resolve_precision("bf16", cpu)
    assert not bf16.grad_scaler().is_enabled()
    with bf16.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    fp16 = resolve_precision("fp16", cpu)
    scaler = fp16.grad_scaler(init_scale=8.0)
    assert scaler.is_enabled() and scaler.get_scale() == 8.0
    with fp16.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
    with pytest.raises(ValueError, match="--precision must be one of"):
        resolve_precision("fp8", cpu)
