"""kernels/dropout.py: the one dropout RNG of the attention and LayerNorm kernels, run under the
interpreter through a small kernel that writes the mask of a (rows, columns) grid tile by tile."""
import pytest
import torch

triton = pytest.importorskip("triton")
tl = triton.language
dropout = pytest.importorskip("fastbert.kernels.dropout")


@triton.jit
def _mask_kernel(OUT, seed, stream, dropout_p, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_start = tl.program_id(1) * BLOCK_N
    keep = dropout.keep_mask(seed, stream, rows, col_start, dropout_p, BLOCK_M, BLOCK_N)
    cols = col_start + tl.arange(0, BLOCK_N)
    tl.store(OUT + rows[:, None] * n_cols + cols[None, :], keep.to(tl.int8))


def _mask(rows, cols, seed, p, stream=0, block_m=16, block_n=32):
    out = torch.full((rows, cols), -1, dtype=torch.int8)
    _mask_kernel[(rows // block_m, cols // block_n)](out, seed, stream, p, cols, BLOCK_M=block_m, BLOCK_N=block_n)
    assert torch.all((out == 0) | (out == 1)), "an element was not written"
    return out.bool()


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_is_one_minus_p(p):
    keep = _mask(64, 128, seed=123, p=p)
    n = keep.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    # No structure along rows or columns: every row's and column's rate stays near 1 - p too.
    assert (keep.float().mean(1) - (1 - p)).abs().max() < 6 * (p * (1 - p) / 128) ** 0.5
    assert (keep.float().mean(0) - (1 - p)).abs().max() < 6 * (p * (1 - p) / 64) ** 0.5


def test_mask_depends_only_on_seed_stream_and_position():
    reference = _mask(32, 64, seed=7, p=0.3)
    # Another tiling of the same grid gives the same mask: tiles may start at any multiple of 8 columns.
    assert torch.equal(_mask(32, 64, seed=7, p=0.3, block_m=8, block_n=16), reference)
    assert torch.equal(_mask(32, 64, seed=7, p=0.3, block_m=32, block_n=64), reference)
    assert torch.equal(_mask(32, 64, seed=7, p=0.3), reference)  # same seed, same mask
    assert not torch.equal(_mask(32, 64, seed=8, p=0.3), reference)
    other_stream = _mask(32, 64, seed=7, p=0.3, stream=1)
    assert (other_stream != reference).float().mean() > 0.2  # independent streams, not shifted copies
    assert not torch.equal(reference[0], reference[1]) and not torch.equal(reference[:, :8], reference[:, 8:16])


def test_drop_probability_is_rounded_up_to_the_16_bit_grid():
    assert not _mask(16, 32, seed=1, p=1.0).any()
    assert _mask(16, 32, seed=1, p=0.0).all()
