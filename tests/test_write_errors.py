"""A write that fails (a full disk, a file-size limit) in safetensors or torch.save is an OSError naming the
file, as Python's own writes are, so the CLI reports it in one line; nothing is left half-written."""
import contextlib
import resource

import pytest
import torch

from fastbert import BertConfig, BertForMaskedLM
from fastbert._atomic import write_errors_as_os_errors
from fastbert.pretrain.rng import rng_state, save_rng_state

LIMIT = 4096  # bytes: below one of the model's weights and an RNG state file


@contextlib.contextmanager
def file_size_limit():
    """RLIMIT_FSIZE lowered around one write (Python ignores SIGXFSZ: a write past it fails with EFBIG).
    Only around the write: pytest itself writes to stdout, possibly a file larger than the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_safetensors_save_past_the_limit_is_an_os_error_naming_the_file(tmp_path):
    model = BertForMaskedLM(BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=128))
    with pytest.raises(OSError) as raised, file_size_limit():
        model.save_pretrained(tmp_path / "out")
    assert raised.value.filename.endswith("model.safetensors"), raised.value
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]  # the temporary file is gone


def test_torch_save_past_the_limit_is_an_os_error_naming_the_file(tmp_path):
    state = rng_state()
    with pytest.raises(OSError) as raised, file_size_limit():
        save_rng_state(state, tmp_path / "rng.pt")  # a checkpoint's RNG file
    assert raised.value.filename == str(tmp_path / "rng.pt")
    big = {"big": torch.zeros(4 * LIMIT, dtype=torch.uint8)}
    with pytest.raises(OSError, match="write failed"), file_size_limit(), write_errors_as_os_errors(tmp_path / "x.pt"):
        torch.save(big, tmp_path / "x.pt")


def test_other_errors_pass_through():
    with pytest.raises(RuntimeError, match="something else"), write_errors_as_os_errors("x"):
        raise RuntimeError("something else")


def test_numpy_shard_writes_past_the_limit_name_the_shard(tmp_path):
    import numpy as np

    from fastbert.data.shards import _save_npy

    tokens = np.zeros(4 * LIMIT, dtype=np.uint16)
    with pytest.raises(OSError) as raised, file_size_limit():
        _save_npy(tmp_path / "shard_00000.tokens.npy", tokens)
    assert raised.value.filename == str(tmp_path / "shard_00000.tokens.npy")
