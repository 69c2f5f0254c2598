"""unpad_input / pad_input / unpad_metadata: layout, round trip, gather/scatter gradients, errors."""
import pytest
import torch

from fastbert import ops
from fastbert._extension import is_available as extension_built


def _random_mask(batch, seqlen, *, prefix=True):
    """Right-padded masks of random lengths (one fully padded, one full), or scattered 0/1 masks."""
    if prefix:
        lengths = torch.randint(1, seqlen + 1, (batch,))
        lengths[0], lengths[-1] = 0, seqlen
        return torch.arange(seqlen)[None, :] < lengths[:, None]
    mask = torch.rand(batch, seqlen) < 0.5
    mask[0] = False
    return mask


@pytest.mark.parametrize("prefix", [True, False])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.int32])
def test_unpad_metadata_describes_the_real_tokens(prefix, mask_dtype):
    mask = _random_mask(5, 23, prefix=prefix)
    indices, cu_seqlens, max_seqlen = ops.unpad_metadata(mask.to(mask_dtype))
    lengths = mask.sum(1)
    assert indices.dtype == torch.int64 and cu_seqlens.dtype == torch.int32 and isinstance(max_seqlen, int)
    assert torch.equal(indices, mask.flatten().nonzero().flatten())
    assert cu_seqlens.tolist() == [0, *lengths.cumsum(0).tolist()]
    assert max_seqlen == int(lengths.max())
    ref = ops.unpad_metadata_reference(mask.to(mask_dtype))
    assert torch.equal(ref[0], indices) and torch.equal(ref[1], cu_seqlens) and ref[2] == max_seqlen


@pytest.mark.skipif(not extension_built(), reason="fastbert._C is not built")
def test_cpu_masks_go_through_the_extension(monkeypatch):
    def forbidden(mask):
        raise AssertionError("the torch reference ran for a CPU mask")

    monkeypatch.setattr("fastbert.ops.padding.unpad_metadata_reference", forbidden)
    indices, cu_seqlens, max_seqlen = ops.unpad_metadata(torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert indices.tolist() == [0, 1, 3] and cu_seqlens.tolist() == [0, 2, 1 + 2] and max_seqlen == 2


@pytest.mark.parametrize("prefix", [True, False])
def test_unpad_then_pad_round_trips(prefix):
    batch, seqlen = 4, 19
    mask = _random_mask(batch, seqlen, prefix=prefix)
    hidden = torch.randn(batch, seqlen, 3, 8)
    flat, indices, cu_seqlens, max_seqlen = ops.unpad_input(hidden, mask)
    assert flat.shape == (int(mask.sum()), 3, 8)
    assert torch.equal(flat, hidden[mask])
    restored = ops.pad_input(flat, indices, batch, seqlen)
    assert torch.equal(restored[mask], hidden[mask])
    assert torch.all(restored[~mask] == 0)


def test_gather_and_scatter_gradients():
    mask = _random_mask(3, 11, prefix=False)
    hidden = torch.randn(3, 11, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h: ops.unpad_input(h, mask)[0], (hidden,))
    _, indices, _, _ = ops.unpad_input(hidden, mask)
    flat = torch.randn(indices.numel(), 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.pad_input(x, indices, 3, 11), (flat,))
    # The gather's gradient is exactly zero at padding (nothing leaks into padded rows).
    (grad,) = torch.autograd.grad(ops.unpad_input(hidden, mask)[0].sum(), hidden)
    assert torch.all(grad[~mask] == 0) and torch.all(grad[mask] == 1)


def test_padding_errors_name_the_problem():
    hidden = torch.randn(2, 5, 4)
    with pytest.raises(TypeError, match="attention_mask must be bool or an integer"):
        ops.unpad_input(hidden, torch.ones(2, 5))
    with pytest.raises(ValueError, match="must start with the mask's"):
        ops.unpad_input(hidden, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="2-D"):
        ops.unpad_input(hidden, torch.ones(10, dtype=torch.bool))
    with pytest.raises(ValueError, match="int64"):
        ops.pad_input(torch.randn(3, 4), torch.arange(3, dtype=torch.int32), 1, 5)
    with pytest.raises(ValueError, match="one entry per row"):
        ops.pad_input(torch.randn(3, 4), torch.arange(2), 1, 5)
    if extension_built():
        with pytest.raises(ValueError, match="0 or 1"):
            ops.unpad_metadata(torch.tensor([[1, 2, 0]]))


@pytest.mark.parametrize("path", ["extension", "reference"])
@pytest.mark.parametrize("values", [[1, 2, 0], [1, -1, 0]])
def test_both_paths_reject_mask_values_other_than_0_and_1(monkeypatch, path, values):
    """The torch reference is what CUDA masks take: it must refuse a 2 as the C++ path does."""
    if path == "extension" and not extension_built():
        pytest.skip("fastbert._C is not built")
    if path == "reference":
        monkeypatch.setattr("fastbert._extension.is_available", lambda: False)
    mask = torch.tensor([values, [1, 1, 0]])
    with pytest.raises(ValueError, match="0 or 1"):
        ops.unpad_metadata(mask)
    with pytest.raises(ValueError, match="0 or 1"):
        ops.unpad_input(torch.randn(2, 3, 4), mask)
    # An empty batch has no values to check
    assert ops.unpad_metadata(mask[:0])[2] == 0


@pytest.mark.parametrize("bad", [5, -1])
def test_out_of_range_indices_are_a_value_error(bad):
    flat = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 5\)"):
        ops.pad_input(flat, torch.tensor([0, bad, 2]), 1, 5)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 5\)"):
        ops.gather_tokens(torch.randn(1, 5, 4), torch.tensor([0, bad, 2]))
