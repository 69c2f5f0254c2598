"""The checkout's top-level folders do not hide installed packages of the same name.

``kernels/`` is fastbert.kernels' source; from the checkout's root (``python -m pytest``, a notebook)
it is also importable as ``kernels``, the name of Hugging Face's package that transformers imports.
"""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _in_checkout_root(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_kernels_from_the_checkout_root_is_the_installed_package():
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed")
    where = _in_checkout_root("import kernels, fastbert.kernels as ours; print(kernels.__file__); "
                              "print(ours.__file__); print(hasattr(kernels, 'kernelize'))")
    theirs, ours, has_api = where.splitlines()
    assert Path(theirs).resolve().parent != ROOT / "kernels"
    assert Path(ours).resolve() == ROOT / "kernels" / "__init__.py"
    assert has_api == "True"


def test_transformers_loads_a_bert_from_the_checkout_root(tmp_path):
    pytest.importorskip("transformers")
    code = (f"from transformers import BertConfig, BertModel; "
            f"BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, "
            f"intermediate_size=64, vocab_size=50)).save_pretrained({str(tmp_path)!r}); "
            f"print(type(BertModel.from_pretrained({str(tmp_path)!r})).__name__)")
    assert _in_checkout_root(code) == "BertModel"
