"""Test setup: Triton kernels run under the interpreter when there is no GPU; `gpu` tests skip."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    # Inductor's cache does not key its precompiled C++ header on the capability: code generated for
    # one (vectorised) against a header built under another (`default`: no at::vec) fails to compile.
    import getpass
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}")
if not HAS_CUDA:
    # Must be set before triton is first imported: the kernels then run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def triton_dispatch(monkeypatch):
    """Every ``backend.use_triton`` decision made during the test, as (op, chosen)."""
    from tests.spies import record_triton_decisions

    return record_triton_decisions(monkeypatch)


@pytest.fixture
def poison_empty(monkeypatch):
    """Every float buffer from torch.empty starts as NaN: an element a kernel fails to write shows up."""
    real_empty = torch.empty

    def empty_nan(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t

    monkeypatch.setattr(torch, "empty", empty_nan)
