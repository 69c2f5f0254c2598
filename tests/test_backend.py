"""Backend selection and the import-time promises of DESIGN.md."""
import subprocess
import sys

import pytest
import torch

from fastbert import backend


def test_import_is_light():
    code = ("import sys, torch, fastbert, fastbert.ops, fastbert.modeling; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'; "
            "assert 'fastbert._C' not in sys.modules, 'extension loaded eagerly'; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_env_parsing(monkeypatch):
    monkeypatch.delenv("FASTBERT_BACKEND", raising=False)
    assert backend.current() == "auto"
    monkeypatch.setenv("FASTBERT_BACKEND", " Torch ")
    assert backend.current() == "torch"
    monkeypatch.setenv("FASTBERT_BACKEND", "cuda")
    with pytest.raises(ValueError, match="auto, triton, torch"):
        backend.current()


def test_use_block_overrides_env_and_restores(monkeypatch):
    monkeypatch.setenv("FASTBERT_BACKEND", "torch")
    with backend.use("triton"):
        assert backend.current() == "triton"
        with backend.use("auto"):
            assert backend.current() == "auto"
        assert backend.current() == "triton"
    assert backend.current() == "torch"
    with pytest.raises(ValueError):
        with backend.use("fast"):
            pass


def test_auto_and_torch_never_pick_triton_for_cpu_tensors(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # auto ignores the interpreter: it is a test tool
    for name in ("auto", "torch"):
        with backend.use(name):
            assert backend.use_triton("op", x) is False


def test_forced_triton_explains_why_it_cannot_run(monkeypatch):
    x = torch.zeros(2)
    with backend.use("triton"):
        if backend.triton_installed():
            monkeypatch.setenv("TRITON_INTERPRET", "0")
            with pytest.raises(backend.BackendUnavailableError, match="TRITON_INTERPRET=1"):
                backend.use_triton("op", x)
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            assert backend.use_triton("op", x) is True
            with pytest.raises(ValueError, match="head_dim 7"):
                backend.use_triton("op", x, supported=False, unsupported_reason="head_dim 7")
    with backend.use("auto"):
        assert backend.use_triton("op", x, supported=False) is False
