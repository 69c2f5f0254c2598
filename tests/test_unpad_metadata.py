"""Unpad metadata (C++ extension on CPU masks) vs the torch reference; unpad/pad round trip."""
import pytest
import torch

from fastbert import _extension, ops


def random_mask(batch, seqlen, *, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, seqlen + 1, (batch,), generator=g)
    return (torch.arange(seqlen)[None, :] < lengths[:, None])


def test_extension_is_built():
    # CI builds it; without it the C++ path below would silently not be tested.
    assert _extension.is_available(), _extension.BUILD_HINT


@pytest.mark.parametrize("batch, seqlen", [(1, 1), (3, 7), (17, 97), (64, 128)])
@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.int32, torch.uint8])
def test_cpp_matches_reference(batch, seqlen, dtype):
    mask = random_mask(batch, seqlen, seed=batch * seqlen).to(dtype)
    if seqlen > 3:  # holes inside a row are allowed: indices then skip them
        mask[0, 1] = 0
    got = _extension.load().unpad_metadata(mask)
    want = ops.unpad_metadata_reference(mask)
    assert torch.equal(got[0], want[0]) and got[0].dtype == torch.int64
    assert torch.equal(got[1], want[1]) and got[1].dtype == torch.int32
    assert got[2] == want[2]


def test_edge_cases():
    empty = torch.zeros(4, 5, dtype=torch.bool)
    indices, cu, max_len = ops.unpad_metadata(empty)
    assert indices.numel() == 0 and cu.tolist() == [0] * 5 and max_len == 0
    indices, cu, max_len = ops.unpad_metadata(torch.ones(2, 3, dtype=torch.long))
    assert indices.tolist() == list(range(6)) and cu.tolist() == [0, 3, 6] and max_len == 3
    indices, cu, max_len = ops.unpad_metadata(torch.zeros(0, 4, dtype=torch.bool))
    assert indices.numel() == 0 and cu.tolist() == [0] and max_len == 0


@pytest.mark.parametrize("mask, error, message", [
    (torch.ones(2, 3, 4, dtype=torch.bool), ValueError, "2-D"),
    (torch.ones(2, 3), TypeError, "bool or an integer"),
    (torch.tensor([[1, 2, 0]]), ValueError, "0 or 1"),
    (torch.tensor([[1, -1, 0]]), ValueError, "0 or 1"),
])
def test_bad_masks(mask, error, message):
    with pytest.raises(error, match=message):
        ops.unpad_metadata(mask)


def test_cpp_checks_inputs_itself():
    # The Python wrapper validates first; the extension must still refuse garbage on its own.
    with pytest.raises(RuntimeError, match="0 or 1"):
        _extension.load().unpad_metadata(torch.tensor([[1, 3]]))
    with pytest.raises(RuntimeError, match="2-D"):
        _extension.load().unpad_metadata(torch.ones(3, dtype=torch.bool))


def test_unpad_pad_round_trip_and_gradients():
    mask = random_mask(5, 11, seed=3)
    mask[0] = True
    hidden = torch.randn(5, 11, 4, 3, dtype=torch.float64, requires_grad=True)
    unpadded, indices, cu, max_len = ops.unpad_input(hidden, mask)
    assert unpadded.shape == (int(mask.sum()), 4, 3) and max_len == 11
    assert torch.equal(unpadded, hidden[mask])
    padded = ops.pad_input(unpadded, indices, 5, 11)
    assert torch.equal(padded, hidden * mask[:, :, None, None])
    assert torch.autograd.gradcheck(lambda h: ops.pad_input(ops.unpad_input(h, mask)[0], indices, 5, 11),
                                    (hidden,))


def test_unpad_input_shape_errors():
    with pytest.raises(ValueError, match="batch, seqlen"):
        ops.unpad_input(torch.randn(2, 5, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="one entry per row"):
        ops.pad_input(torch.randn(3, 2), torch.arange(4), 2, 2)


def test_missing_extension_gives_build_instructions(monkeypatch):
    import importlib

    _extension._import.cache_clear()
    real_import = importlib.import_module

    def no_extension(name, *args):
        if name == "fastbert._C":
            raise ImportError("simulated: not built")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_extension)
    try:
        assert not _extension.is_available()
        with pytest.raises(_extension.ExtensionNotBuiltError, match="pip install --no-build-isolation -e"):
            _extension.load()
        # ops still work through the torch reference
        indices, cu, max_len = ops.unpad_metadata(torch.tensor([[1, 0], [1, 1]]))
        assert indices.tolist() == [0, 2, 3] and cu.tolist() == [0, 1, 3] and max_len == 2
    finally:
        monkeypatch.undo()
        _extension._import.cache_clear()
    assert _extension.is_available()
