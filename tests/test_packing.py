"""Sequence packing (first-fit-decreasing in C++) and unpad metadata (C++ vs the torch reference)."""
import math

import pytest
import torch

from fastbert import _extension
from fastbert.data.packing import plan_packing, plan_packing_reference
from fastbert.ops import unpad_metadata, unpad_metadata_reference


def mixed_lengths(count: int, max_len: int, *, seed: int) -> torch.Tensor:
    """A pre-training-like mix: mostly long sequences, some short ones (short-seq prob ~ 0.1 and more)."""
    gen = torch.Generator().manual_seed(seed)
    long = torch.randint(max_len // 2, max_len + 1, (count,), generator=gen)
    short = torch.randint(1, max_len // 2 + 1, (count,), generator=gen)
    return torch.where(torch.rand(count, generator=gen) < 0.4, short, long)


def check_plan(plan, lengths: torch.Tensor, max_len: int) -> None:
    lens = lengths.tolist()
    count = len(lens)
    # Every sequence placed exactly once (order is a permutation), inside its row.
    assert sorted(plan.order.tolist()) == list(range(count))
    assert plan.row.shape == plan.offset.shape == (count,)
    assert (plan.row >= 0).all() and (plan.row < plan.num_rows).all()
    assert (plan.offset >= 0).all() and (plan.offset + lengths <= max_len).all(), "a row overflows"
    # Within each row: back to back from column 0, no overlap, and no empty row.
    for r in range(plan.num_rows):
        members = sorted((int(plan.offset[i]), lens[i]) for i in (plan.row == r).nonzero().flatten().tolist())
        assert members, f"row {r} is empty"
        column = 0
        for start, length in members:
            assert start == column, f"row {r}: gap or overlap at column {start}"
            column += length
        assert column <= max_len
    # Packed order: by row, then by column.
    keys = [(int(plan.row[i]), int(plan.offset[i])) for i in plan.order.tolist()]
    assert keys == sorted(keys)
    # cu_seqlens / indices / position_ids describe the same layout.
    ordered = lengths[plan.order]
    assert plan.cu_seqlens.dtype == torch.int32 and plan.cu_seqlens.shape == (count + 1,)
    assert plan.cu_seqlens[0] == 0 and torch.equal(plan.cu_seqlens[1:].long(), torch.cumsum(ordered, 0))
    assert plan.max_seqlen == (max(lens) if lens else 0)
    expected_indices = [int(plan.row[i]) * max_len + int(plan.offset[i]) + t for i in plan.order.tolist()
                        for t in range(lens[i])]
    assert plan.indices.tolist() == expected_indices
    assert plan.position_ids.shape == (plan.num_rows, max_len)
    positions = plan.position_ids.flatten()
    assert positions[plan.indices].tolist() == [t for i in plan.order.tolist() for t in range(lens[i])]
    real = torch.zeros(plan.num_rows * max_len, dtype=torch.bool)
    real[plan.indices] = True
    assert (positions[~real] == 0).all()
    # The padding op finds the same real tokens in the packed rows.
    indices, _, _ = unpad_metadata(real.view(plan.num_rows, max_len))
    assert torch.equal(indices, plan.indices)


@pytest.mark.parametrize("count, max_len, seed", [(300, 64, 0), (97, 128, 1), (1, 16, 2), (50, 7, 3)])
def test_packing_layout_is_consistent_and_first_fit_decreasing(count, max_len, seed):
    lengths = mixed_lengths(count, max_len, seed=seed)
    plan = plan_packing(lengths, max_len)
    check_plan(plan, lengths, max_len)
    reference = plan_packing_reference(lengths, max_len)
    for field in ("row", "offset", "order", "cu_seqlens", "indices", "position_ids"):
        assert torch.equal(getattr(plan, field), getattr(reference, field)), field
    assert plan.num_rows == reference.num_rows
    # First-fit-decreasing uses at most 11/9 OPT + 6/9 rows, and OPT >= total / max_len.
    lower_bound = math.ceil(lengths.sum().item() / max_len)
    assert lower_bound <= plan.num_rows <= 11 / 9 * lower_bound + 1


def test_packing_saves_rows_on_a_real_length_mix():
    lengths = mixed_lengths(256, 128, seed=5)
    plan = plan_packing(lengths, 128)
    assert plan.num_rows < 0.85 * len(lengths)
    fill = lengths.sum().item() / (plan.num_rows * 128)
    assert fill > 0.9


def test_packing_edge_cases():
    full = torch.full((5,), 32, dtype=torch.int64)
    plan = plan_packing(full, 32)
    check_plan(plan, full, 32)
    assert plan.num_rows == 5 and plan.order.tolist() == [0, 1, 2, 3, 4]
    ones = torch.ones(70, dtype=torch.int64)
    plan = plan_packing(ones, 32)
    check_plan(plan, ones, 32)
    assert plan.num_rows == 3
    empty = plan_packing(torch.zeros(0, dtype=torch.int64), 8)
    assert empty.num_rows == 0 and empty.indices.numel() == 0 and empty.cu_seqlens.tolist() == [0]


def test_packing_bad_inputs():
    with pytest.raises(TypeError, match="int64"):
        plan_packing(torch.tensor([1.0, 2.0]), 8)
    with pytest.raises(TypeError, match="torch.Tensor"):
        plan_packing([1, 2], 8)
    with pytest.raises(ValueError, match="1-D"):
        plan_packing(torch.ones((2, 2), dtype=torch.int64), 8)
    with pytest.raises(ValueError, match=r"lengths\[1\] = 9 is outside \[1, max_len=8\]"):
        plan_packing(torch.tensor([3, 9]), 8)
    with pytest.raises(ValueError, match=r"lengths\[0\] = 0"):
        plan_packing(torch.tensor([0, 2]), 8)
    with pytest.raises(ValueError, match="max_len"):
        plan_packing(torch.tensor([1]), 0)
    with pytest.raises(ValueError, match="outside"):  # the C++ checks too
        _extension.load().pack_sequences(torch.tensor([3, 9]), 8)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int8, torch.int32, torch.int64])
@pytest.mark.parametrize("batch, seqlen", [(13, 97), (1, 1), (4, 130)])
def test_unpad_metadata_matches_the_torch_reference(dtype, batch, seqlen):
    gen = torch.Generator().manual_seed(batch * seqlen)
    lengths = torch.randint(0, seqlen + 1, (batch,), generator=gen)
    mask = torch.arange(seqlen)[None, :] < lengths[:, None]
    mask |= torch.rand(batch, seqlen, generator=gen) < 0.1  # holes and stray tokens, not just prefixes
    if batch > 2:
        mask[1] = False  # an empty row
    mask = mask.to(dtype)
    indices, cu_seqlens, max_seqlen = unpad_metadata(mask)
    ref_indices, ref_cu_seqlens, ref_max_seqlen = unpad_metadata_reference(mask)
    assert torch.equal(indices, ref_indices) and indices.dtype == torch.int64
    assert torch.equal(cu_seqlens, ref_cu_seqlens) and cu_seqlens.dtype == torch.int32
    assert max_seqlen == ref_max_seqlen and isinstance(max_seqlen, int)


def test_unpad_metadata_rejects_non_binary_masks():
    with pytest.raises(ValueError, match="0 or 1"):
        unpad_metadata(torch.tensor([[1, 2, 0]]))
    with pytest.raises(TypeError, match="bool or an integer"):
        unpad_metadata(torch.ones(2, 3))
