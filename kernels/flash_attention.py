"""Flash attention for BERT (bidirectional, no causal mask): Triton kernels and their launchers.

Two layouts share the kernels, chosen by a compile-time flag:

* padded: q, k, v of shape (batch, seqlen, heads, head_dim), with an optional key-padding mask
  (batch, seqlen), nonzero = real token;
* varlen: q, k, v of shape (total_tokens, heads, head_dim), sequences back to back, bounded by
  ``cu_seqlens`` (int32, batch + 1 prefix sums).

Numerics: scores and the online softmax run in fp32 in the exp2 domain; the forward saves the
log-sum-exp (base 2, of the scaled scores) per query row, and the backward recomputes the
probabilities from it, so nothing of size seqlen² is ever stored. A row whose keys are all padding
gets output 0 and log-sum-exp +inf, which makes every recomputed probability of that row exactly 0.
Padding query rows attend to the real keys, as in transformers (heads such as question answering read
those positions).

Padding: the launcher reduces the mask once per batch (kept for the next call with the same mask
object: the other layers and the backward) to a span per sequence, (first real token,
last real token + 1, whether every token between is real). Right- or left-padded masks are dense
spans: the kernels then never read the mask, and skip every key block outside the span (all of them
for a sequence with no real token, whose query blocks then only write zeros). Other masks (holes)
keep the general path, which reads the mask once per key tile. Padded or out-of-range keys and
values are loaded as zeros and their scores set to -inf, so garbage (even NaN) there reaches neither
outputs nor gradients.

Dropout on the attention probabilities uses the shared RNG of :mod:`fastbert.kernels.dropout`, one
Philox call per (batch * heads + head, query, 8 keys): the backward regenerates the same mask from
the same seed, and both layouts draw the same mask for the same positions.

Backward is deterministic: one kernel computes dQ (and the row terms ``delta = rowsum(dO * O)``) per
query block, a second computes dK and dV per key block, each owning its output rows, so nothing
is accumulated with atomics and the same inputs give bit-identical gradients.

No autograd here: ``fastbert.ops.attention`` wraps :func:`forward` and :func:`backward`.

Over 450 lines on purpose: the three kernels share their @jit helpers and the launch tables measured
for them, and the static cases sit beside the launchers they call; splitting them would scatter one op.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._launch import check_seed, interpreted, launch
from .dropout import keep_mask
from .limits import padded_block

LOG2_E = 1.4426950408889634
# Every q/k/v/out stride (batch, token, head) is a multiple of this many elements: the launchers
# copy the rare tensor whose strides are not (head dims are multiples of 8, so usual views qualify).
# The kernels declare their row and head offsets multiples of it (tl.multiple_of), so tiles load and
# store as 16-byte vectors at every head dim. Triton itself infers at most "divisible by 16" from an
# int argument, which head strides such as 40 or 72 are not; such head dims compiled to scalar loads
# with no pipelining and spilled (sm_90 report).
_STRIDE_MULTIPLE = 8
STRIDE_MULTIPLE = tl.constexpr(_STRIDE_MULTIPLE)


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _locate_sequence(pid_bh, num_heads, seqlen, CU_SEQLENS, IS_VARLEN: tl.constexpr):
    """(batch index, head index, first token of the sequence in its tensor, sequence length).

    Padded layout: tokens of a sequence are addressed through the batch stride, so the first token is
    0 and the length is ``seqlen``. Varlen: the sequence spans ``cu_seqlens[b] : cu_seqlens[b + 1]``."""
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    if IS_VARLEN:
        tok0 = tl.load(CU_SEQLENS + b)
        n = tl.load(CU_SEQLENS + b + 1) - tok0
    else:
        tok0 = b * 0
        n = seqlen + b * 0
    return b, h, tok0, n


@triton.jit
def _token_span(SPANS, b, n, HAS_MASK: tl.constexpr):
    """(lo, hi, dense): real tokens of sequence b lie in [lo, hi); ``dense`` (0/1) says all of them are
    real, so the mask need not be read. Without a mask: the whole sequence, dense."""
    if HAS_MASK:
        lo = tl.load(SPANS + b * 3)
        hi = tl.load(SPANS + b * 3 + 1)
        dense = tl.load(SPANS + b * 3 + 2)
    else:
        lo = n * 0
        hi = n
        dense = n * 0 + 1
    return lo, hi, dense


@triton.jit
def _open_block(SPANS, b, tok0, n, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr):
    """What every kernel needs once its block is known to hold tokens (after the early return):
    (lo, hi, dense) of :func:`_token_span`, the head-dim offsets and which of them are real, and the
    batch index and first token as int64 (so that element offsets of large tensors do not overflow)."""
    lo, hi, dense = _token_span(SPANS, b, n, HAS_MASK)
    offs_d = tl.arange(0, BLOCK_D)
    return lo, hi, dense, offs_d, offs_d < HEAD_DIM, b.to(tl.int64), tok0.to(tl.int64)


@triton.jit
def _head_offset(b64, h, stride_b, stride_h):
    """Element offset of head h of sequence b's batch row (a multiple of STRIDE_MULTIPLE)."""
    return tl.multiple_of(b64 * stride_b + h * stride_h, STRIDE_MULTIPLE)


@triton.jit
def _row_offsets(tokens, stride_t):
    """Element offsets (len(tokens), 1) of those tokens (multiples of STRIDE_MULTIPLE)."""
    return tl.multiple_of(tokens * stride_t, [STRIDE_MULTIPLE])[:, None]


@triton.jit
def _tile_ptrs(BASE, b64, h, tokens, offs_d, stride_b, stride_t, stride_h):
    """Pointers (len(tokens), BLOCK_D) to head h of ``tokens`` (indices in the tensor's token dim)."""
    return BASE + _head_offset(b64, h, stride_b, stride_h) + _row_offsets(tokens, stride_t) + offs_d[None, :]


@triton.jit
def _sequence_base(BASE, b64, h, tok64, stride_b, stride_t, stride_h):
    """Pointer to head h of the sequence's first token: a loop over its blocks adds the rows' offsets."""
    return BASE + _head_offset(b64, h, stride_b, stride_h) + tl.multiple_of(tok64 * stride_t, STRIDE_MULTIPLE)


@triton.jit
def _lse_row0(b64, tok64, seqlen, IS_VARLEN: tl.constexpr):
    """Row of the sequence's first token in LSE / DELTA (heads, rows)."""
    return tok64 if IS_VARLEN else b64 * seqlen


@triton.jit
def _real_tokens(KEEP, b, idx, lo, hi, dense, stride_keep_b, HAS_MASK: tl.constexpr):
    """Which positions ``idx`` hold real tokens: inside the span and, for a span with holes, not padding
    by the mask (a dense span leaves the load's lanes all off, so it reads nothing)."""
    real = (idx >= lo) & (idx < hi)
    if HAS_MASK:
        keep = tl.load(KEEP + b.to(tl.int64) * stride_keep_b + idx, mask=real & (dense == 0), other=1)
        real = real & (keep != 0)
    return real


@triton.jit
def _load_key_block(k_base, v_base, cols, real, offs_d, in_dim, stride_kt, stride_vt):
    """K and V rows ``cols`` of the sequence (from :func:`_sequence_base`); zeros where not ``real``."""
    kv_mask = real[:, None] & in_dim[None, :]
    k = tl.load(k_base + _row_offsets(cols, stride_kt) + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + _row_offsets(cols, stride_vt) + offs_d[None, :], mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def _bwd_tile(q, k, v, do, lse, delta, real, rows, start_n, pid_bh, seed, dropout_p, scale_log2,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """One (query block, key block) tile of the backward, recomputed from the forward's LSE: returns
    (P as the forward applied it to V: dropped and rescaled, dS = P * (dP - delta)), where dS is the
    gradient of the scores before ``softmax_scale`` (the callers apply it once, to dQ and dK). The dQ
    kernel drops the first (the compiler removes what it does not use)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    p = tl.where(real[None, :], tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        keep = keep_mask(seed, pid_bh, rows, start_n, dropout_p, BLOCK_M, BLOCK_N)
        p_dropped = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    else:
        p_dropped = p
    return p_dropped, p * (dp - delta[:, None])


@triton.jit(do_not_specialize=["seqlen", "seed", "dropout_p"])
def _attention_fwd_kernel(
    # inputs: (batch, seqlen, heads, head_dim) or (total, heads, head_dim); the last dim contiguous,
    # every other stride a multiple of STRIDE_MULTIPLE (the launchers see to both)
    Q, K, V,
    OUT,  # output, same layout as Q (its own strides)
    LSE,  # fp32 (heads, rows): log2-sum-exp of each query row's scaled scores; +inf for empty rows
    KEEP,  # key-padding mask (batch, seqlen), nonzero = real token; read only when HAS_MASK
    SPANS,  # int32 (batch, 3): (first real, last real + 1, dense) per sequence; read only when HAS_MASK
    CU_SEQLENS,  # int32 (batch + 1,); read only when IS_VARLEN
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_keep_b, stride_lse_h,
    num_heads, seqlen,  # seqlen: padded length, or max_seqlen for varlen
    scale_log2,  # softmax_scale * log2(e)
    dropout_p, seed,  # seed: int32 (kernels/_launch.py)
    seqlen_bucket,  # next power of two >= seqlen: only the autotuner's key (a run-time int, so no recompiles)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per (query block, batch * head): those output rows, looping over the key blocks."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, tok0, n = _locate_sequence(pid_bh, num_heads, seqlen, CU_SEQLENS, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= n:
        return
    lo, hi, dense, offs_d, in_dim, b64, tok64 = _open_block(SPANS, b, tok0, n, HEAD_DIM, BLOCK_D, HAS_MASK)
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = rows < n

    q_ptrs = _tile_ptrs(Q, b64, h, tok64 + rows, offs_d, stride_qb, stride_qt, stride_qh)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & in_dim[None, :], other=0.0)
    k_base = _sequence_base(K, b64, h, tok64, stride_kb, stride_kt, stride_kh)
    v_base = _sequence_base(V, b64, h, tok64, stride_vb, stride_vt, stride_vh)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Only the key blocks that meet the span (none for a sequence without a real token).
    for start_n in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        cols = start_n + offs_n
        real = _real_tokens(KEEP, b, cols, lo, hi, dense, stride_keep_b, HAS_MASK)
        k, v = _load_key_block(k_base, v_base, cols, real, offs_d, in_dim, stride_kt, stride_vt)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(real[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with no real key so far keeps max -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_DROPOUT:
            keep = keep_mask(seed, pid_bh, rows, start_n, dropout_p, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0
    inv_l = tl.where(has_keys, 1.0 / tl.where(has_keys, l_i, 1.0), 0.0)
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]
    o_ptrs = _tile_ptrs(OUT, b64, h, tok64 + rows, offs_d, stride_ob, stride_ot, stride_oh)
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & in_dim[None, :])
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("inf"))
    tl.store(LSE + h * stride_lse_h + _lse_row0(b64, tok64, seqlen, IS_VARLEN) + rows, lse, mask=row_ok)


@triton.jit(do_not_specialize=["seqlen", "seed", "dropout_p"])
def _attention_bwd_dq_kernel(
    Q, K, V, OUT, DOUT,  # inputs (DOUT: gradient of OUT, any strides with a contiguous last dim)
    DQ,  # output: gradient of Q, same layout as Q (its own strides)
    LSE,  # fp32 (heads, rows), from the forward
    DELTA,  # output: fp32 (heads, rows), rowsum(dO * O), read afterwards by the dK/dV kernel
    KEEP, SPANS, CU_SEQLENS,  # as in the forward
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    stride_keep_b, stride_lse_h,
    num_heads, seqlen,
    softmax_scale, scale_log2, dropout_p, seed, seqlen_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per (query block, batch * head): dQ for those rows, looping over the key blocks."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, tok0, n = _locate_sequence(pid_bh, num_heads, seqlen, CU_SEQLENS, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= n:
        return
    lo, hi, dense, offs_d, in_dim, b64, tok64 = _open_block(SPANS, b, tok0, n, HEAD_DIM, BLOCK_D, HAS_MASK)
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = rows < n
    tile_mask = row_ok[:, None] & in_dim[None, :]

    q = tl.load(_tile_ptrs(Q, b64, h, tok64 + rows, offs_d, stride_qb, stride_qt, stride_qh), mask=tile_mask,
                other=0.0)
    do = tl.load(_tile_ptrs(DOUT, b64, h, tok64 + rows, offs_d, stride_dob, stride_dot, stride_doh), mask=tile_mask,
                 other=0.0)
    o = tl.load(_tile_ptrs(OUT, b64, h, tok64 + rows, offs_d, stride_ob, stride_ot, stride_oh), mask=tile_mask,
                other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    lse_ptrs = h * stride_lse_h + _lse_row0(b64, tok64, seqlen, IS_VARLEN) + rows
    tl.store(DELTA + lse_ptrs, delta, mask=row_ok)
    lse = tl.load(LSE + lse_ptrs, mask=row_ok, other=float("inf"))

    k_base = _sequence_base(K, b64, h, tok64, stride_kb, stride_kt, stride_kh)
    v_base = _sequence_base(V, b64, h, tok64, stride_vb, stride_vt, stride_vh)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        cols = start_n + offs_n
        real = _real_tokens(KEEP, b, cols, lo, hi, dense, stride_keep_b, HAS_MASK)
        k, v = _load_key_block(k_base, v_base, cols, real, offs_d, in_dim, stride_kt, stride_vt)
        _, ds = _bwd_tile(q, k, v, do, lse, delta, real, rows, start_n, pid_bh, seed, dropout_p, scale_log2,
                          BLOCK_M, BLOCK_N, HAS_DROPOUT, DOT_PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    dq = dq * softmax_scale
    tl.store(_tile_ptrs(DQ, b64, h, tok64 + rows, offs_d, stride_dqb, stride_dqt, stride_dqh),
             dq.to(DQ.dtype.element_ty), mask=tile_mask)


@triton.jit(do_not_specialize=["seqlen", "seed", "dropout_p"])
def _attention_bwd_dkdv_kernel(
    Q, K, V, DOUT,  # inputs
    DK, DV,  # outputs: gradients of K and V, same layout as K (their own strides)
    LSE, DELTA,  # fp32 (heads, rows): from the forward and from the dQ kernel
    KEEP, SPANS, CU_SEQLENS,  # as in the forward
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    stride_keep_b, stride_lse_h,
    num_heads, seqlen,
    softmax_scale, scale_log2, dropout_p, seed, seqlen_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per (key block, batch * head): dK and dV for those keys, looping over all queries."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, tok0, n = _locate_sequence(pid_bh, num_heads, seqlen, CU_SEQLENS, IS_VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= n:
        return
    lo, hi, dense, offs_d, in_dim, b64, tok64 = _open_block(SPANS, b, tok0, n, HEAD_DIM, BLOCK_D, HAS_MASK)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    out_mask = (cols < n)[:, None] & in_dim[None, :]
    dk_ptrs = _tile_ptrs(DK, b64, h, tok64 + cols, offs_d, stride_dkb, stride_dkt, stride_dkh)
    dv_ptrs = _tile_ptrs(DV, b64, h, tok64 + cols, offs_d, stride_dvb, stride_dvt, stride_dvh)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Key blocks outside the span are all padding: their gradients are exactly zero.
    if (start_n < hi) & (start_n + BLOCK_N > lo):
        real = _real_tokens(KEEP, b, cols, lo, hi, dense, stride_keep_b, HAS_MASK)
        kv_mask = real[:, None] & in_dim[None, :]
        k = tl.load(_tile_ptrs(K, b64, h, tok64 + cols, offs_d, stride_kb, stride_kt, stride_kh), mask=kv_mask,
                    other=0.0)
        v = tl.load(_tile_ptrs(V, b64, h, tok64 + cols, offs_d, stride_vb, stride_vt, stride_vh), mask=kv_mask,
                    other=0.0)
        q_base = _sequence_base(Q, b64, h, tok64, stride_qb, stride_qt, stride_qh)
        do_base = _sequence_base(DOUT, b64, h, tok64, stride_dob, stride_dot, stride_doh)
        lse_row0 = _lse_row0(b64, tok64, seqlen, IS_VARLEN)
        # Padding queries attend to the real keys too, so every query block contributes.
        for start_m in range(0, n, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < n
            tile_mask = row_ok[:, None] & in_dim[None, :]
            q = tl.load(q_base + _row_offsets(rows, stride_qt) + offs_d[None, :], mask=tile_mask, other=0.0)
            do = tl.load(do_base + _row_offsets(rows, stride_dot) + offs_d[None, :], mask=tile_mask, other=0.0)
            lse = tl.load(LSE + h * stride_lse_h + lse_row0 + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + h * stride_lse_h + lse_row0 + rows, mask=row_ok, other=0.0)
            p_dropped, ds = _bwd_tile(q, k, v, do, lse, delta, real, rows, start_n, pid_bh, seed, dropout_p,
                                      scale_log2, BLOCK_M, BLOCK_N, HAS_DROPOUT, DOT_PRECISION)
            dv += tl.dot(tl.trans(p_dropped.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    tl.store(dk_ptrs, (dk * softmax_scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=out_mask)


# ---------------------------------------------------------------------------------------------------
# Launch configurations: autotuned per (sequence-length bucket, head dim) on the GPU
# ---------------------------------------------------------------------------------------------------
_AUTOTUNE_KEY = ["seqlen_bucket", "HEAD_DIM", "IS_VARLEN", "HAS_MASK", "HAS_DROPOUT"]


class Tile(NamedTuple):
    """One launch shape of an attention kernel."""

    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    warps: int
    stages: int

    def config(self) -> triton.Config:
        return triton.Config({"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}, num_warps=self.warps,
                             num_stages=self.stages)


class TunedTile(NamedTuple):
    """An autotuner candidate and the largest padded head dims (BLOCK_D) it compiles at without a
    spill on sm_90, without and with dropout (0 = never with dropout)."""

    block_m: int
    block_n: int
    warps: int
    stages: int
    max_block_d: int
    max_block_d_dropout: int

    @property
    def tile(self) -> Tile:
        return Tile(self.block_m, self.block_n, self.warps, self.stages)

    def max_head_block(self, dropout: bool) -> int:
        return self.max_block_d_dropout if dropout else self.max_block_d


# Hopper-oriented: large query tiles for the forward, 2-4 pipeline stages. Past each entry's head-dim
# limits the sm_90 compile spills registers (measured with the static report,
# `python -m fastbert.kernels.static`; tests/test_sm90_compile.py fails if a kept entry spills), so
# the autotuner never tries it there.
_FWD_CONFIGS = [
    TunedTile(128, 64, 4, 3, 64, 32),
    TunedTile(128, 64, 8, 3, 128, 128),
    TunedTile(128, 128, 8, 3, 128, 32),
    TunedTile(64, 64, 4, 2, 128, 128),
    TunedTile(128, 32, 4, 4, 64, 64),  # spills 8 B at head dim 128 in the varlen layout
]
# The dQ kernel favours tall query tiles, dK/dV wide key tiles.
_BWD_DQ_CONFIGS = [
    TunedTile(128, 64, 8, 2, 128, 128),
    TunedTile(128, 32, 4, 3, 64, 32),
    TunedTile(64, 64, 4, 2, 128, 64),
    TunedTile(64, 32, 4, 3, 128, 128),
]
_BWD_DKDV_CONFIGS = [
    TunedTile(64, 128, 8, 2, 32, 0),
    TunedTile(32, 128, 4, 3, 32, 0),
    TunedTile(64, 64, 4, 2, 64, 32),
    TunedTile(32, 64, 4, 3, 64, 64),
    # dK and dV accumulate in registers: at head dim 128 only 32 x 64 on 8 warps fits (static report).
    TunedTile(32, 64, 8, 3, 128, 128),
    TunedTile(64, 32, 4, 2, 64, 64),
]


# Without autotuning (16-bit inputs): per kernel, an entry of its table above that is declared
# spill-free at every head dim, with and without dropout (tests/test_sm90_compile.py checks this). The
# dQ kernel's 64 x 64 on 4 warps spills at head dim 128 with dropout; the dK/dV kernel keeps two
# (BLOCK_N, head dim) fp32 accumulators, which 32 x 64 tiles on 8 warps hold (sm_90 static report).
_FIXED_CONFIG = Tile(64, 64, 4, 2).config()
_FIXED_DQ_CONFIG = Tile(64, 32, 4, 3).config()
_FIXED_DKDV_CONFIG = Tile(32, 64, 8, 3).config()
_INTERPRETER_CONFIG = Tile(32, 32, 4, 1).config()

# fp32 inputs run full-precision ("ieee") dots, which lower to FMA, not wgmma: every thread holds its
# operand rows over the whole reduction in registers, so the 16-bit tiles above spill (140 of the 168
# fp32 rows of the 2026-12-01 sm_90 report, up to 142 KB), and ptxas spills erratically with the tile,
# the exact head dim and the layout. fp32 (for accuracy, not speed) therefore runs one configuration
# per (padded head dim BLOCK_D, dropout), autotuning or not, each measured spill-free at every head dim
# of its block, in the padded, masked and varlen layouts (the full sm_90 sweep compiles them all).
# {(BLOCK_D, dropout): Tile}
_FP32_FWD = {
    (16, False): Tile(32, 64, 4, 1), (16, True): Tile(32, 64, 4, 1),
    (32, False): Tile(32, 64, 8, 2), (32, True): Tile(32, 64, 8, 2),
    (64, False): Tile(32, 64, 8, 1), (64, True): Tile(32, 64, 8, 1),
    (128, False): Tile(32, 16, 8, 2), (128, True): Tile(32, 16, 8, 2),
}
_FP32_BWD_DQ = {
    (16, False): Tile(32, 32, 8, 2), (16, True): Tile(32, 32, 8, 2),
    (32, False): Tile(32, 32, 8, 2), (32, True): Tile(32, 32, 8, 2),  # 32 x 64 spills 8 B at head dim 24, varlen
    (64, False): Tile(32, 64, 8, 2), (64, True): Tile(32, 64, 8, 2),
    (128, False): Tile(32, 16, 8, 2), (128, True): Tile(32, 16, 8, 2),
}
# dK/dV also keeps two (BLOCK_N, head dim) fp32 accumulators: smaller tiles, and at BLOCK_D 16 and 128 one
# per dropout setting (BLOCK_D 16: 32 x 64 spills 8 B with dropout at head dim 8, padded, since the shared
# backward tile; BLOCK_D 128: 32 x 32 spills with dropout at head dims 80 and 96, 16 x 16 on 8 warps without).
_FP32_BWD_DKDV = {
    (16, False): Tile(32, 64, 8, 1), (16, True): Tile(32, 32, 8, 1),
    (32, False): Tile(16, 32, 8, 1), (32, True): Tile(16, 32, 8, 1),
    (64, False): Tile(16, 16, 4, 1), (64, True): Tile(16, 16, 4, 1),
    (128, False): Tile(32, 32, 8, 1), (128, True): Tile(16, 16, 8, 2),
}


def _tile_of(config: triton.Config) -> Tile:
    return Tile(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


def _prune_spilling(candidates: list[TunedTile]):
    """The autotuner's early pruning: drop the configurations that spill at this padded head dim
    (BLOCK_D), with or without dropout, per the limits of ``candidates``."""
    limits = {c.tile: c for c in candidates}

    def prune(configs, named_args, **kwargs):
        kept = [c for c in configs if kwargs["BLOCK_D"] <= limits[_tile_of(c)].max_head_block(kwargs["HAS_DROPOUT"])]
        return kept or configs[-1:]  # never empty (Triton requires one); the sm_90 test would flag a spill

    return prune


def _tuned(kernel, candidates: list[TunedTile]):
    return triton.autotune(
        configs=[c.tile.config() for c in candidates],
        key=_AUTOTUNE_KEY,
        prune_configs_by={"early_config_prune": _prune_spilling(candidates)},
    )(kernel)


_fwd_tuned = _tuned(_attention_fwd_kernel, _FWD_CONFIGS)
_bwd_dq_tuned = _tuned(_attention_bwd_dq_kernel, _BWD_DQ_CONFIGS)
_bwd_dkdv_tuned = _tuned(_attention_bwd_dkdv_kernel, _BWD_DKDV_CONFIGS)


def fp32_config(table: dict, block_d: int, dropout: bool) -> triton.Config:
    """The one configuration fp32 inputs run with (see ``_FP32_FWD``), autotuning or not."""
    return table[(block_d, dropout)].config()


def _launch(kernel, tuned, fixed: triton.Config, fp32_table: dict, grid_rows: str, num_rows: int,
            batch_heads: int, args: tuple, meta: dict) -> None:
    """Run ``kernel`` on a (row blocks, batch * heads) grid; ``grid_rows`` names the block size that
    tiles the rows (BLOCK_M for query-block kernels, BLOCK_N for the key-block one); ``fixed``: the
    16-bit configuration on a GPU without autotuning; ``fp32_table``: the fp32 configurations."""
    if interpreted():
        fixed = _INTERPRETER_CONFIG
    elif meta["DOT_PRECISION"] == "ieee":
        tuned, fixed = None, fp32_config(fp32_table, meta["BLOCK_D"], meta["HAS_DROPOUT"])
    launch(kernel, tuned, lambda cfg: (triton.cdiv(num_rows, cfg[grid_rows]), batch_heads), args, meta, fixed)


# ---------------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------------
def token_spans(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """int32 (batch, 3): per sequence (first real token, last real token + 1, 1 if every token between
    is real else 0); (0, 0, 1) for a sequence with no real token. A few reductions on the device, no sync."""
    real = key_padding_mask != 0
    seqlen = real.shape[1]
    positions = torch.arange(seqlen, device=real.device, dtype=torch.int32)
    hi = torch.where(real, positions + 1, 0).amax(dim=1)
    lo = torch.minimum(torch.where(real, positions, seqlen).amin(dim=1), hi)
    dense = real.sum(dim=1, dtype=torch.int32) == hi - lo
    return torch.stack((lo, hi, dense.to(torch.int32)), dim=1).to(torch.int32).contiguous()


# The spans of the last mask seen: a model passes one mask to every layer, forward and backward, so
# they are computed once per batch. Keyed by the mask object and its version counter (an in-place
# change of the mask invalidates them); a weak reference keeps no mask alive.
_last_spans: tuple = (None, -1, None)


def _spans_of(key_padding_mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    global _last_spans
    ref, version, spans = _last_spans
    if ref is not None and ref() is key_padding_mask and key_padding_mask._version == version:
        return spans
    spans = token_spans(keep)
    _last_spans = (weakref.ref(key_padding_mask), key_padding_mask._version, spans)
    return spans


class _Layout:
    """What the kernels need to know about q/k/v's layout: strides, sizes, the masks' pointers."""

    def __init__(self, q: torch.Tensor, key_padding_mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                 max_seqlen: int):
        self.is_varlen = cu_seqlens is not None
        self.num_heads, self.head_dim = q.shape[-2], q.shape[-1]
        if self.is_varlen:
            self.batch = cu_seqlens.numel() - 1
            self.seqlen = max_seqlen
            self.rows = q.shape[0]
        else:
            self.batch, self.seqlen = q.shape[0], q.shape[1]
            self.rows = self.batch * self.seqlen
        self.has_mask = key_padding_mask is not None
        # One placeholder serves every pointer a flag turns off (the kernels never read it).
        placeholder = cu_seqlens if self.is_varlen else q
        if self.has_mask:
            keep = key_padding_mask.view(torch.uint8) if key_padding_mask.dtype == torch.bool else key_padding_mask
            self.keep = keep if keep.stride(-1) == 1 else keep.contiguous()
            self.spans = _spans_of(key_padding_mask, self.keep) if self.keep.numel() else placeholder
        else:
            self.keep = placeholder
            self.spans = placeholder
        self.cu_seqlens = cu_seqlens if self.is_varlen else placeholder
        self.block_d = padded_block(self.head_dim)
        self.seqlen_bucket = padded_block(max(self.seqlen, 1))

    def strides(self, t: torch.Tensor) -> tuple[int, int, int]:
        """(batch, token, head) strides; the varlen layout has no batch dimension (stride 0)."""
        if self.is_varlen:
            return 0, t.stride(0), t.stride(1)
        return t.stride(0), t.stride(1), t.stride(2)

    def meta(self, dtype: torch.dtype, dropout_p: float) -> dict:
        return dict(
            HEAD_DIM=self.head_dim, BLOCK_D=self.block_d, IS_VARLEN=self.is_varlen, HAS_MASK=self.has_mask,
            HAS_DROPOUT=dropout_p > 0.0,
            # fp32 inputs get full-precision dots, not tf32, so they match an fp32 reference (and run the
            # fp32 configurations, see _launch).
            DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        )

    @property
    def keep_stride(self) -> int:
        return self.keep.stride(0) if self.has_mask else 0


def _kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """``t`` when its last dim is contiguous and its other strides are multiples of STRIDE_MULTIPLE (the
    kernels' promise to the compiler), else a contiguous copy. A dim of size 1 is never stepped through,
    so its stride (which torch leaves arbitrary) does not count."""
    aligned = all(stride % _STRIDE_MULTIPLE == 0 for size, stride in zip(t.shape[:-1], t.stride()[:-1]) if size > 1)
    return t if aligned and t.stride(-1) == 1 else t.contiguous()


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None,
            cu_seqlens: torch.Tensor | None = None, max_seqlen: int = 0, softmax_scale: float,
            dropout_p: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Inputs are assumed validated by ``fastbert.ops.attention``.

    q, k, v: (batch, seqlen, heads, head_dim) with ``key_padding_mask`` (batch, seqlen) or None, or
    (total, heads, head_dim) with ``cu_seqlens`` int32 (batch + 1,) and ``max_seqlen``; ``seed`` an
    int in [0, 2**31). Returns ``(out, lse)``: out like q (contiguous); lse fp32 (heads, rows), base-2
    log-sum-exp of the scaled scores per query row (+inf where a row has no real key), rows = batch *
    seqlen or total.
    """
    check_seed(seed)
    q, k, v = (_kernel_ready(t) for t in (q, k, v))
    layout = _Layout(q, key_padding_mask, cu_seqlens, max_seqlen)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((layout.num_heads, layout.rows), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or layout.batch == 0:
        return out, lse
    args = (
        q, k, v, out, lse, layout.keep, layout.spans, layout.cu_seqlens,
        *layout.strides(q), *layout.strides(k), *layout.strides(v), *layout.strides(out),
        layout.keep_stride, lse.stride(0),
        layout.num_heads, layout.seqlen,
        softmax_scale * LOG2_E, dropout_p, seed, layout.seqlen_bucket,
    )
    _launch(_attention_fwd_kernel, _fwd_tuned, _FIXED_CONFIG, _FP32_FWD, "BLOCK_M", layout.seqlen,
            layout.batch * layout.num_heads, args, layout.meta(q.dtype, dropout_p))
    return out, lse


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None,
             cu_seqlens: torch.Tensor | None = None, max_seqlen: int = 0, softmax_scale: float,
             dropout_p: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the deterministic backward: the dQ kernel (which also writes delta), then dK/dV.

    Same layouts as :func:`forward`; ``out`` and ``lse`` are the forward's, ``seed`` and ``dropout_p``
    the forward's too (the dropout mask is regenerated, never stored). Returns (dq, dk, dv) like q, k, v.
    """
    check_seed(seed)
    dout, q, k, v, out = (_kernel_ready(t) for t in (dout, q, k, v, out))
    layout = _Layout(q, key_padding_mask, cu_seqlens, max_seqlen)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or layout.batch == 0:
        return dq, dk, dv
    delta = torch.empty(lse.shape, dtype=torch.float32, device=lse.device)
    common = (layout.keep_stride, lse.stride(0), layout.num_heads, layout.seqlen,
              softmax_scale, softmax_scale * LOG2_E, dropout_p, seed, layout.seqlen_bucket)
    meta = layout.meta(q.dtype, dropout_p)
    batch_heads = layout.batch * layout.num_heads
    dq_args = (
        q, k, v, out, dout, dq, lse, delta, layout.keep, layout.spans, layout.cu_seqlens,
        *layout.strides(q), *layout.strides(k), *layout.strides(v), *layout.strides(out), *layout.strides(dout),
        *layout.strides(dq), *common,
    )
    _launch(_attention_bwd_dq_kernel, _bwd_dq_tuned, _FIXED_DQ_CONFIG, _FP32_BWD_DQ, "BLOCK_M", layout.seqlen,
            batch_heads, dq_args, meta)
    dkdv_args = (
        q, k, v, dout, dk, dv, lse, delta, layout.keep, layout.spans, layout.cu_seqlens,
        *layout.strides(q), *layout.strides(k), *layout.strides(v), *layout.strides(dout),
        *layout.strides(dk), *layout.strides(dv), *common,
    )
    _launch(_attention_bwd_dkdv_kernel, _bwd_dkdv_tuned, _FIXED_DKDV_CONFIG, _FP32_BWD_DKDV, "BLOCK_N",
            layout.seqlen, batch_heads, dkdv_args, meta)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------
# Static sm_90 cases (fastbert.kernels.static): the launches the report compiles
# ---------------------------------------------------------------------------------------------------
def static_cases(case_set: str) -> list:
    from .limits import attention_head_dims
    from .static.case import StaticCase as Case

    if case_set == "smoke":
        return []
    if case_set == "quick":
        return [Case("attention", "bf16", 768, 64, "padded+mask", True)]
    if case_set == "default":
        return [
            Case("attention", "bf16", 768, 64, "padded+mask", True),
            Case("attention", "fp16", 768, 128, "varlen", False),
            # An odd multiple of 8: its head stride (24) is no multiple of 16, yet its loads must vectorise.
            Case("attention", "bf16", 1024, 24, "varlen", True),
            # fp32: FMA dots, its own configurations (the largest head dim, dropout: most registers).
            Case("attention", "fp32", 768, 128, "padded+mask", True),
        ]
    # Every head dim the op takes (multiples of 8 up to 128), not only the padded ones (BLOCK_D): the
    # exact head dim changes the masks, hence ptxas' schedule and the loads' vector width.
    head_dims = attention_head_dims()
    cases = [Case("attention", dtype, 768, head_dim, layout, dropout) for dtype in ("bf16", "fp16")
             for head_dim in head_dims for layout in ("padded+mask", "varlen") for dropout in (False, True)]
    cases.append(Case("attention", "bf16", 1024, 64, "padded", False))
    # fp32's FMA dots spill erratically with the exact head dim and layout: every layout too.
    cases += [Case("attention", "fp32", 12 * head_dim, head_dim, layout, dropout) for head_dim in head_dims
              for layout in ("padded", "padded+mask", "varlen") for dropout in (False, True)]
    return cases


def run_static_case(case) -> None:
    from .static.case import DTYPES, cuda_tensor

    dtype = DTYPES[case.dtype]
    heads, batch, seqlen = case.hidden // case.head_dim, 2, 128
    kw = dict(softmax_scale=case.head_dim ** -0.5, dropout_p=0.1 if case.dropout else 0.0, seed=1234)
    if case.layout == "varlen":
        total = batch * seqlen - 37
        q, k, v, dout = (cuda_tensor((total, heads, case.head_dim), dtype) for _ in range(4))
        kw.update(cu_seqlens=cuda_tensor((batch + 1,), torch.int32), max_seqlen=seqlen)
    else:
        # q, k, v as the model makes them: slices of one fused projection (B, L, 3, H, D).
        q, k, v = cuda_tensor((batch, seqlen, 3, heads, case.head_dim), dtype).unbind(2)
        dout = cuda_tensor((batch, seqlen, heads, case.head_dim), dtype)
        if case.layout == "padded+mask":
            kw["key_padding_mask"] = cuda_tensor((batch, seqlen), torch.bool)
    out, lse = forward(q, k, v, **kw)
    out = cuda_tensor(q.shape, dtype)  # the recorder wrote nothing: the backward only needs shapes
    backward(dout, q, k, v, out, lse, **kw)
