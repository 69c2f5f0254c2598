"""Sequence packing: several short sequences share one row of ``max_len`` tokens, so a batch carries
less padding.

The plan is first-fit-decreasing (longest sequence first, each into the first row with room), computed
by the C++ extension. Packed sequences must never attend to each other: the model runs the varlen
attention with the plan's per-sequence ``cu_seqlens`` (never a plain padded mask over a packed row),
and ``position_ids`` restart at 0 for each sequence.

NSP / segments: each packed sequence keeps its own ``[CLS] A [SEP] B [SEP]`` layout and its own
``token_type_ids`` (0 for A, 1 for B); its NSP label stays attached to it, listed in packed order (the
order of ``cu_seqlens``), and its ``[CLS]`` is the first token of its segment of the unpadded stream,
at unpadded position ``cu_seqlens[i]`` (flat padded position ``indices[cu_seqlens[i]]``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastbert import _extension
from fastbert._validation import DtypeError, check_tensor

__all__ = ["PackingPlan", "plan_packing", "plan_packing_reference"]


@dataclass(frozen=True)
class PackingPlan:
    """Where each of N sequences goes in a (num_rows, max_len) packed batch."""

    num_rows: int
    max_len: int
    row: torch.Tensor           # int64 (N,): the row of sequence i
    offset: torch.Tensor        # int64 (N,): the column where sequence i starts
    order: torch.Tensor         # int64 (N,): sequence indices in packed order (by row, then column)
    cu_seqlens: torch.Tensor    # int32 (N+1,): sequence boundaries in the row-major stream of real tokens
    indices: torch.Tensor       # int64 (total,): flat positions row * max_len + column of the real tokens
    position_ids: torch.Tensor  # int64 (num_rows, max_len): 0, 1, ... per sequence; 0 at padding
    max_seqlen: int             # the longest sequence


def _check_lengths(lengths: torch.Tensor, max_len: int) -> None:
    check_tensor("lengths", lengths)
    if lengths.dtype != torch.int64:
        raise DtypeError(f"lengths must be int64, got {lengths.dtype}")
    if lengths.dim() != 1 or lengths.device.type != "cpu":
        raise ValueError(f"lengths must be a 1-D CPU tensor, got shape {tuple(lengths.shape)} on {lengths.device}")
    if isinstance(max_len, bool) or not isinstance(max_len, int):
        raise TypeError(f"max_len must be an int, got {type(max_len).__name__}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    bad = ((lengths < 1) | (lengths > max_len)).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"lengths[{i}] = {int(lengths[i])} is outside [1, max_len={max_len}]")


def plan_packing(lengths: torch.Tensor, max_len: int) -> PackingPlan:
    """First-fit-decreasing packing of sequences of ``lengths`` (int64 (N,), each in [1, max_len]) into
    rows of ``max_len`` tokens. Deterministic: equal lengths keep their input order."""
    _check_lengths(lengths, max_len)
    row, offset, order, cu_seqlens, indices, position_ids, num_rows, max_seqlen = (
        _extension.load().pack_sequences(lengths, max_len)
    )
    return PackingPlan(int(num_rows), max_len, row, offset, order, cu_seqlens, indices, position_ids,
                       int(max_seqlen))


def plan_packing_reference(lengths: torch.Tensor, max_len: int) -> PackingPlan:
    """Pure-Python :func:`plan_packing` (a linear scan over rows for each sequence), for tests."""
    _check_lengths(lengths, max_len)
    lens = lengths.tolist()
    free: list[int] = []
    row = [0] * len(lens)
    offset = [0] * len(lens)
    placed: list[list[int]] = []
    for i in sorted(range(len(lens)), key=lambda i: -lens[i]):  # sorted() is stable
        r = next((r for r, room in enumerate(free) if room >= lens[i]), len(free))
        if r == len(free):
            free.append(max_len)
            placed.append([])
        row[i], offset[i] = r, max_len - free[r]
        free[r] -= lens[i]
        placed[r].append(i)
    order = [i for seqs in placed for i in seqs]
    cu_seqlens = [0]
    indices: list[int] = []
    position_ids = torch.zeros((len(free), max_len), dtype=torch.int64)
    for i in order:
        cu_seqlens.append(cu_seqlens[-1] + lens[i])
        indices.extend(row[i] * max_len + offset[i] + t for t in range(lens[i]))
        position_ids[row[i], offset[i]: offset[i] + lens[i]] = torch.arange(lens[i])
    return PackingPlan(len(free), max_len, _long(row), _long(offset), _long(order),
                       torch.tensor(cu_seqlens, dtype=torch.int32), _long(indices), position_ids,
                       max(lens, default=0))


def _long(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)
