"""The cross-entropy step of :func:`fastbert.ops.mlm_loss`: one Triton kernel over a chunk of logits.

The op computes a chunk of decoder logits (without the bias) with a GEMM into a buffer whose row stride
is the vocabulary rounded up to a multiple of 16 elements; this kernel then reads each row of it, adds
the bias as it reads (a plain GEMM writes the chunk once; a GEMM into a strided buffer with a bias
would first copy the bias into it and then read it back), and, in fp32:

* pass 1 (always): the running max ``m`` and the running sum of ``exp(z - m)`` (online log-sum-exp),
  the index of the first maximum (``torch.argmax``'s tie rule: the lowest index), and, with label
  smoothing, the sum of the logits; the row's loss goes to ``LossRows``, whether its argmax is its
  target to ``CorrectRows``;
* pass 2 (``WRITE_GRAD``): the gradient of the row's loss, unscaled, over the logits in place:
  ``softmax - (1 - eps) * onehot(target) - eps / V``; zero for ignored rows and in the padding columns.
  The op feeds it to the GEMMs of the hidden, weight and bias gradients and applies
  ``grad_loss / count`` in its backward, in fp32 (a 1/count folded in here would underflow fp16).

One program per row: a row of 30522 bf16 logits is 61 KB, so pass 2 reads it back mostly from L2.
Each tile spans the buffer's padded width, which is a multiple of 16 elements: the load mask is then
constant over every 16-byte vector and the loads vectorise; columns from ``V`` on are set to -inf after
loading. A target outside [0, V) that is not ``ignore_index`` (unchecked on CUDA without
FASTBERT_DEBUG=1) makes its row's loss and gradient NaN: visible, and never an out-of-bounds read.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import interpreted

# Tile of the GPU launches, every dtype: 2048 columns, 8 elements per thread (one 16-byte load of bf16,
# two of fp32), so 8 warps. 4096-column tiles at 16 elements per thread spilled on sm_90 under label
# smoothing (80 registers); at 8 per thread no variant passes 60.
_GPU_BLOCK_V = 2048
_GPU_ELEMENTS_PER_THREAD = 8
# Under the interpreter: small tiles, so that the tests' odd vocabularies (97, 1025) span several tiles.
_INTERPRETER_BLOCK_V = 64


@triton.jit
def _mlm_cross_entropy_kernel(
    Logits,  # (rows, stride_row): hidden @ W.T in columns < V; overwritten with the gradient when WRITE_GRAD
    Bias,  # (stride_row,) the decoder bias, zero-padded like a row (not read unless HAS_BIAS)
    Targets,  # (rows,) integer targets
    LossRows,  # (rows,) fp32 out: each row's loss; 0 for ignored rows
    CorrectRows,  # (rows,) int32 out: 1 where the row's argmax is its target
    stride_row,  # the buffer's row stride (padded width); columns [V, stride_row) are padding
    V,  # vocabulary size
    ignore_index,
    smoothing,  # label smoothing eps; read only when HAS_SMOOTHING
    WRITE_GRAD: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = Logits + row * stride_row
    target = tl.load(Targets + row)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)

    m = tl.full([], float("-inf"), tl.float32)
    sum_exp = tl.zeros([], tl.float32)
    best = tl.zeros([], tl.int32)
    sum_logits = tl.zeros([], tl.float32)
    for start in range(0, stride_row, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(base + cols, mask=cols < stride_row, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(Bias + cols, mask=cols < stride_row, other=0.0).to(tl.float32)
        z = tl.where(cols < V, z, float("-inf"))
        tile_max, tile_arg = tl.max(z, 0, return_indices=True, return_indices_tie_break_left=True)
        # Strictly greater: on a tie with an earlier tile the earlier (lower) index stays.
        best = tl.where(tile_max > m, start + tile_arg, best)
        m_new = tl.maximum(m, tile_max)
        sum_exp = sum_exp * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
        if HAS_SMOOTHING:
            sum_logits += tl.sum(tl.where(cols < V, z, 0.0), 0)
    lse = m + tl.log(sum_exp)

    z_target = tl.load(base + target, mask=valid & in_range, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z_target += tl.load(Bias + target, mask=valid & in_range, other=0.0).to(tl.float32)
    loss = lse - z_target
    if HAS_SMOOTHING:
        loss = (1.0 - smoothing) * loss + smoothing * (lse - sum_logits / V)
    loss = tl.where(in_range, loss, float("nan"))
    tl.store(LossRows + row, tl.where(valid, loss, 0.0))
    tl.store(CorrectRows + row, (valid & (best == target)).to(tl.int32))

    if WRITE_GRAD:
        if HAS_SMOOTHING:
            on_target = 1.0 - smoothing
            uniform = smoothing / V
        else:
            on_target = 1.0
            uniform = 0.0
        for start in range(0, stride_row, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < stride_row
            z = tl.load(base + cols, mask=in_row, other=0.0).to(tl.float32)
            if HAS_BIAS:
                z += tl.load(Bias + cols, mask=in_row, other=0.0).to(tl.float32)
            grad = tl.exp(tl.where(cols < V, z, float("-inf")) - lse) - uniform
            grad = tl.where(cols == target, grad - on_target, grad)
            grad = tl.where(in_range, grad, float("nan"))
            grad = tl.where(valid & (cols < V), grad, 0.0)
            tl.store(base + cols, grad.to(Logits.dtype.element_ty), mask=in_row)


def tile(width: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of a launch over rows ``width`` elements wide (the buffer's row stride):
    the full tile, or the power of two that covers a narrower row, with warps to match."""
    if interpreted():
        return min(_INTERPRETER_BLOCK_V, triton.next_power_of_2(width)), 1
    block_v = min(_GPU_BLOCK_V, max(16, triton.next_power_of_2(width)))
    return block_v, max(1, block_v // (_GPU_ELEMENTS_PER_THREAD * 32))


def cross_entropy_rows_(buffer: torch.Tensor, vocab: int, bias: torch.Tensor | None, targets: torch.Tensor,
                        loss_rows: torch.Tensor, correct_rows: torch.Tensor, ignore_index: int,
                        label_smoothing: float, write_grad: bool) -> None:
    """Each row's loss into ``loss_rows`` (fp32) and argmax == target into ``correct_rows`` (int32), the
    logits being ``buffer[:, :vocab] + bias``; with ``write_grad`` the unscaled gradient over
    ``buffer[:, :vocab]`` in place (zeros beyond).

    buffer: (rows, width) contiguous fp16/bf16/fp32, ``hidden @ W.T`` in its first ``vocab`` columns,
    width >= vocab (the op pads it to a multiple of 16); bias: (width,) contiguous (zero beyond
    ``vocab``) or None; targets: (rows,) contiguous integers."""
    rows, width = buffer.shape
    if not buffer.is_contiguous() or width < vocab:
        raise ValueError(f"the logits buffer must be contiguous and at least {vocab} wide, got "
                         f"{tuple(buffer.shape)} with strides {buffer.stride()}")
    if bias is not None and (bias.shape != (width,) or not bias.is_contiguous()):
        raise ValueError(f"the padded bias must be contiguous of shape ({width},), got {tuple(bias.shape)}")
    if rows == 0:
        return
    block_v, warps = tile(width)
    _mlm_cross_entropy_kernel[(rows,)](
        buffer, bias if bias is not None else buffer, targets, loss_rows, correct_rows, width, vocab, ignore_index,
        float(label_smoothing), WRITE_GRAD=write_grad, HAS_SMOOTHING=label_smoothing > 0.0,
        HAS_BIAS=bias is not None, BLOCK_V=block_v, num_warps=warps)


# The launches the static sm_90 report (fastbert.kernels.static) compiles, as (dtype, vocab, write_grad,
# label_smoothing, bias): the BERT and XLM-R vocabularies (not multiples of 16: padded rows, masked
# tails) at the full tile in each dtype, with and without the gradient pass, label smoothing and the bias.
_DEFAULT_STATIC = (
    ("bf16", 30522, True, False, True),
    ("bf16", 250002, False, False, True),
    ("fp16", 30522, True, True, True),
    ("bf16", 250002, True, True, False),
    ("fp32", 30522, True, False, True),
    ("bf16", 30528, True, False, True),  # a padded vocabulary (a multiple of 16): no padding columns
    ("bf16", 97, True, False, True),  # a row narrower than the full tile (width 112, BLOCK_V 128)
)


def _full_static() -> list[tuple[str, int, bool, bool, bool]]:
    """Every tile :func:`tile` can pick on the GPU (each power of two from 16 to the full tile, reached
    by a vocabulary just above the previous power), in every dtype and kernel variant (the decoder
    without bias at the full tile only: the bias adds one load beside the logits' own)."""
    vocabs = [3] + [2 ** k // 2 + 1 for k in range(5, _GPU_BLOCK_V.bit_length())] + [30522, 30528, 250002]
    cases = []
    for name in ("bf16", "fp16", "fp32"):
        for vocab in vocabs:
            for write_grad in (False, True):
                for smoothing in (False, True):
                    cases.append((name, vocab, write_grad, smoothing, True))
                    if vocab == 30522:
                        cases.append((name, vocab, write_grad, smoothing, False))
    return cases


def static_cases(case_set: str) -> list:
    from .static.case import StaticCase

    chosen = {"smoke": (), "quick": _DEFAULT_STATIC[:1], "default": _DEFAULT_STATIC}.get(case_set) or (
        _full_static() if case_set == "full" else ())
    return [StaticCase("mlm_loss", dtype, 768, layout=("grad" if write_grad else "nograd")
                       + ("+smooth" if smoothing else "") + ("" if bias else "+nobias"), vocab=vocab)
            for dtype, vocab, write_grad, smoothing, bias in chosen]


def run_static_case(case) -> None:
    from .limits import mlm_logits_width
    from .static.case import DTYPES, cuda_tensor

    rows = 4096
    dtype, width = DTYPES[case.dtype], mlm_logits_width(case.vocab)
    buffer = cuda_tensor((rows, width), dtype)  # the op's padded logits buffer, and its padded bias
    bias = None if "nobias" in case.layout else cuda_tensor((width,), dtype)
    cross_entropy_rows_(buffer, case.vocab, bias, cuda_tensor((rows,), torch.int64),
                        cuda_tensor((rows,), torch.float32), cuda_tensor((rows,), torch.int32), -100,
                        0.1 if "smooth" in case.layout else 0.0, case.layout.startswith("grad"))
