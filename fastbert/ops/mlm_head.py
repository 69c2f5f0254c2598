"""``mlm_loss``: BERT's MLM decoder and its cross-entropy in one op, without the (rows, vocab) logits.

The decoder is ``logits = hidden @ decoder_weight.T + decoder_bias``; the loss is the cross-entropy
summed over the targets that are not ``ignore_index``, divided by their count (at least 1, so a batch
with no target gives 0, not NaN) — what ``fastbert.modeling._masked_lm`` computes from full logits.

The op runs the rows in chunks (:func:`chunk_rows`): per chunk, the logits by a GEMM, a cross-entropy
step that computes each row's loss and argmax and, when a gradient is needed, overwrites the logits
with the gradient of the loss (the Triton kernel of :mod:`fastbert.kernels.mlm_head`, or the same in
torch), then the chunk's share of the hidden, weight and bias gradients by GEMMs. So the gradients are
computed during the forward; nothing of size rows x vocab outlives its chunk, and the backward only
scales the gradients by ``grad_loss / count``. Under ``no_grad`` there is no gradient work.

Three layers, as the other ops: the custom op ``fastbert::mlm_loss_fwd`` (the chunked forward; opaque
to torch.compile through its fake implementation; eager calls skip the custom-op dispatch) → an
autograd Function that saves the gradients and scales them in its backward → the public function,
which checks the input, resolves autocast and picks the cross-entropy step (:func:`_use_kernel`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from fastbert import backend
from fastbert._validation import DtypeError, check_floating, check_tensor, value_checks_cheap
from fastbert.kernels.limits import KERNEL_DTYPES, mlm_logits_width  # triton-free
from fastbert.ops._dispatch import kernel_module, kernel_op

IGNORE_INDEX = -100
# The chunk rule: a chunk's logits buffer (rows x the vocabulary padded to a multiple of 16,
# kernels.limits.mlm_logits_width, in the compute dtype) takes at most CHUNK_BYTES, and the rows are
# split into equal chunks. 1 GiB keeps the GEMMs large (BERT's 30522-word vocabulary: 17 k bf16 rows
# per chunk; XLM-R's 250002: 2 k) while the peak stays a small part of the full logits' (20 k x 250002
# targets: 10 GB in bf16, then their fp32 copy and gradient). The torch step works on an fp32 copy of
# a 16-bit chunk: twice the bytes there.
CHUNK_BYTES = 1 << 30


def mlm_loss_reference(hidden: torch.Tensor, decoder_weight: torch.Tensor, decoder_bias: torch.Tensor | None,
                       targets: torch.Tensor, ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition: full logits by ``F.linear``, then ``F.cross_entropy`` in at least fp32 (the
    model's MLM head today). Returns (loss, num_correct) as :func:`mlm_loss`."""
    logits = F.linear(hidden, decoder_weight, decoder_bias)
    logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    count = (targets != ignore_index).sum()
    loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets,
                           ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing)
    return loss / count.clamp(min=1), (logits.argmax(-1) == targets).sum()


def chunk_rows(rows: int, vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk: as many as keep one chunk's logits buffer within :data:`CHUNK_BYTES` (at least
    one), then evened out so that every chunk but the last has the same count and none is a sliver."""
    width = mlm_logits_width(vocab)
    limit = max(1, CHUNK_BYTES // (width * dtype.itemsize))
    chunks = max(1, math.ceil(rows / limit))
    return max(1, math.ceil(rows / chunks))


def _accumulation_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def _cross_entropy_rows_torch(buffer, vocab, bias, targets, loss_rows, correct_rows, ignore_index, label_smoothing,
                              write_grad) -> None:
    """The torch cross-entropy step, as the kernel (:mod:`fastbert.kernels.mlm_head`) computes it (the
    bias added in fp32): in place over the chunk (a 16-bit chunk through one fp32 copy); nothing else
    of the chunk's size."""
    logits = buffer[:, :vocab]
    z = logits.to(loss_rows.dtype)  # the buffer itself when it is fp32/fp64: overwritten below
    if bias is not None:
        z.add_(bias[:vocab])
    valid = targets != ignore_index
    in_range = (targets >= 0) & (targets < vocab)
    safe_targets = torch.where(in_range, targets, 0)[:, None]
    m, first_max = z.max(1, keepdim=True)  # the index of the first maximum, as torch.argmax and the kernel
    correct_rows.copy_((first_max[:, 0] == targets) & valid)
    z_target = z.gather(1, safe_targets)[:, 0]
    sum_logits = z.sum(1) if label_smoothing > 0.0 else None
    exp = z.sub_(m).exp_()
    sum_exp = exp.sum(1, keepdim=True)
    lse = (m + sum_exp.log())[:, 0]
    loss = lse - z_target
    if sum_logits is not None:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - sum_logits / vocab)
    loss = torch.where(in_range, loss, float("nan"))
    loss_rows.copy_(torch.where(valid, loss, 0.0))
    if write_grad:
        # One pass: softmax for rows with a target, zeros for ignored rows, NaN for out-of-range targets.
        row_factor = torch.where(valid, torch.where(in_range, sum_exp.reciprocal()[:, 0], float("nan")), 0.0)
        grad = exp.mul_(row_factor[:, None])
        grad.scatter_add_(1, safe_targets, torch.where(valid, label_smoothing - 1.0, 0.0)[:, None].to(grad.dtype))
        if label_smoothing > 0.0:
            grad.sub_(torch.where(valid, label_smoothing / vocab, 0.0)[:, None].to(grad.dtype))
        if grad.data_ptr() != logits.data_ptr():
            logits.copy_(grad)


def _chunked_forward(hidden, weight, bias, targets, ignore_index, label_smoothing, compute_dtype, grad_hidden,
                     grad_weight, grad_bias, use_kernel):
    """(loss, num_correct, grad_hidden, grad_weight, grad_bias): the gradients unscaled (the sum over
    rows, not divided by the count), dH in the compute dtype, dW and db in fp32 (fp64 for fp64); an
    empty (0,) tensor for a gradient not asked for. hidden: (rows, H); targets: (rows,) int64."""
    accumulate = _accumulation_dtype(compute_dtype)
    device, rows, vocab = hidden.device, hidden.shape[0], weight.shape[0]
    write_grad = grad_hidden or grad_weight or grad_bias
    ce_step = kernel_module("mlm_head").cross_entropy_rows_ if use_kernel else _cross_entropy_rows_torch
    with torch.autocast(device.type, enabled=False):
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        loss_rows = torch.empty((rows,), dtype=accumulate, device=device)
        correct_rows = torch.empty((rows,), dtype=torch.int32, device=device)
        dh = torch.empty(h.shape, dtype=compute_dtype, device=device) if grad_hidden else h.new_empty((0,))
        dw = db = None
        step, width = chunk_rows(rows, vocab, compute_dtype), mlm_logits_width(vocab)
        # One buffer, reused by every chunk (each chunk's GEMMs have read it before the next overwrites it).
        buffer = torch.empty((min(step, rows), width), dtype=compute_dtype, device=device)
        # The bias, padded as a row: the cross-entropy step adds it to the logits as it reads them.
        padded_bias = torch.zeros((width,), dtype=compute_dtype, device=device) if b is not None else None
        if padded_bias is not None:
            padded_bias[:vocab] = b
        for start in range(0, rows, step):
            end = min(start + step, rows)
            chunk = buffer[: end - start]
            logits, h_chunk = chunk[:, :vocab], h[start:end]
            torch.mm(h_chunk, w.t(), out=logits)
            ce_step(chunk, vocab, padded_bias, targets[start:end], loss_rows[start:end], correct_rows[start:end],
                    ignore_index, label_smoothing, write_grad)
            if grad_hidden:
                torch.mm(logits, w, out=dh[start:end])
            if grad_weight:
                dw = _accumulate_mm(dw, logits.t(), h_chunk, accumulate)
            if grad_bias:
                part = logits.sum(0, dtype=accumulate)
                db = part if db is None else db.add_(part)
        if dw is None:  # no rows, or not asked for
            dw = torch.zeros(weight.shape, dtype=accumulate, device=device) if grad_weight else h.new_empty((0,))
        if db is None:
            db = torch.zeros((vocab,), dtype=accumulate, device=device) if grad_bias else h.new_empty((0,))
        count = (targets != ignore_index).sum()
        loss = loss_rows.sum() / count.clamp(min=1)
    return loss, correct_rows.sum(dtype=torch.int64), dh, dw, db


def _accumulate_mm(total, a, b, accumulate):
    """``total + a @ b`` in the accumulation dtype: in place by addmm when the operands are of that
    dtype; for 16-bit operands each chunk's product (accumulated in fp32 by the GEMM, rounded once, as
    the unchunked GEMM rounds) is added to the fp32 total."""
    if a.dtype == accumulate:
        return torch.mm(a, b) if total is None else total.addmm_(a, b)
    part = torch.mm(a, b)
    return part.to(accumulate) if total is None else total.add_(part)


@kernel_op("mlm_loss_fwd")
def _forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
            ignore_index: int, label_smoothing: float, compute_dtype: torch.dtype, grad_hidden: bool,
            grad_weight: bool, grad_bias: bool, use_kernel: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _chunked_forward(hidden, weight, bias, targets, ignore_index, label_smoothing, compute_dtype, grad_hidden,
                            grad_weight, grad_bias, use_kernel)


@_forward.register_fake
def _fwd_fake(hidden, weight, bias, targets, ignore_index, label_smoothing, compute_dtype, grad_hidden, grad_weight,
              grad_bias, use_kernel):
    accumulate = _accumulation_dtype(compute_dtype)

    def grad(wanted, shape, dtype):
        return hidden.new_empty(shape if wanted else (0,), dtype=dtype if wanted else compute_dtype)

    return (hidden.new_empty((), dtype=accumulate), hidden.new_empty((), dtype=torch.int64),
            grad(grad_hidden, hidden.shape, compute_dtype), grad(grad_weight, weight.shape, accumulate),
            grad(grad_bias, (weight.shape[0],), accumulate))


class _MlmLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, label_smoothing, compute_dtype, grad_hidden,
                grad_weight, grad_bias, use_kernel):
        loss, num_correct, dh, dw, db = _forward(hidden, weight, bias, targets, ignore_index, label_smoothing,
                                                 compute_dtype, grad_hidden, grad_weight, grad_bias, use_kernel)
        ctx.save_for_backward(dh, dw, db, targets)
        ctx.ignore_index = ignore_index
        ctx.grad_dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(num_correct)
        return loss, num_correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_num_correct):
        dh, dw, db, targets = ctx.saved_tensors
        scale = grad_loss / (targets != ctx.ignore_index).sum().clamp(min=1)  # fp32 (fp64), the loss's dtype
        # Out of place (the saved gradients stay valid for a retained graph's next backward); each product
        # is computed in fp32 from the fp32 scale and rounded once to the gradient's dtype.
        grads = [(grad * scale).to(dtype) if needed else None
                 for grad, dtype, needed in zip((dh, dw, db), ctx.grad_dtypes, ctx.needs_input_grad[:3])]
        return (*grads, None, None, None, None, None, None, None, None)


def _compute_dtype(hidden, weight, bias) -> torch.dtype:
    """The dtype the decoder GEMM runs in: under autocast its dtype, as autocast runs ``nn.Linear``
    (float64 tensors are not cast); otherwise the inputs' one dtype."""
    tensors = [t for t in (hidden, weight, bias) if t is not None]
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        lower = torch.get_autocast_dtype(device_type)
        dtypes = {t.dtype if t.dtype == torch.float64 else lower for t in tensors}
    else:
        dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        found = ", ".join(f"{name} {t.dtype}" for name, t in zip(("hidden", "decoder_weight", "decoder_bias"),
                                                                 (hidden, weight, bias)) if t is not None)
        raise DtypeError(f"hidden, decoder_weight and decoder_bias must have one dtype outside autocast; got {found}")
    return dtypes.pop()


def _check_inputs(hidden, weight, bias, targets, ignore_index, label_smoothing) -> None:
    check_floating("hidden", hidden)
    check_floating("decoder_weight", weight)
    if bias is not None:
        check_floating("decoder_bias", bias)
    check_tensor("targets", targets)
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise DtypeError(f"targets must be an integer tensor, got {targets.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have a last (hidden-size) dimension, got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"decoder_weight must have shape (vocab >= 1, {hidden.shape[-1]}) to match hidden's last "
                         f"dimension, got {tuple(weight.shape)}")
    vocab = weight.shape[0]
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"decoder_bias must have shape ({vocab},), got {tuple(bias.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])} (hidden's leading dimensions), got "
                         f"{tuple(targets.shape)}")
    for name, t in (("decoder_weight", weight), ("decoder_bias", bias), ("targets", targets)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if value_checks_cheap(targets) and targets.numel() and not torch.compiler.is_compiling():
        bad = ~(((targets >= 0) & (targets < vocab)) | (targets == ignore_index))
        if bool(bad.any()):
            raise ValueError(f"targets must be in [0, {vocab}) or ignore_index ({ignore_index}); found "
                             f"{targets[bad][0].item()}")


def _use_kernel(hidden: torch.Tensor, compute_dtype: torch.dtype) -> bool:
    """The dispatch rule: the Triton cross-entropy step, or the torch one. Either way the op is
    chunked; the full-logits reference runs only when called by name."""
    why_not = "" if compute_dtype in KERNEL_DTYPES else (
        f"the decoder computes in {compute_dtype}; the kernel takes float16, bfloat16 and float32")
    return backend.use_triton("mlm_loss", hidden, supported=not why_not, unsupported_reason=why_not)


def mlm_loss(hidden: torch.Tensor, decoder_weight: torch.Tensor, decoder_bias: torch.Tensor | None,
             targets: torch.Tensor, ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLM decoder and its cross-entropy without materialising the logits: ``(loss, num_correct)``.

    hidden: (..., H), the MLM head's transformed hidden states (after ``cls.predictions.transform``),
    typically the masked rows only; decoder_weight: (vocab, H) (tied to the word embeddings: its
    gradient adds into theirs); decoder_bias: (vocab,) or None; targets: hidden's leading shape, integer
    class ids in [0, vocab) or ``ignore_index`` (checked on CPU tensors; on CUDA under FASTBERT_DEBUG=1,
    otherwise an out-of-range target makes the loss NaN). ``label_smoothing`` in [0, 1] as in
    ``F.cross_entropy``.

    Returns the loss (0-d float32, float64 for float64 inputs): the cross-entropy summed over the targets
    that are not ``ignore_index``, divided by their count (0 when there is none), and ``num_correct``
    (0-d int64, on the device; no host sync): how many of them are the argmax of their logits (ties to
    the lowest index, as ``torch.argmax``). Gradients flow to hidden, decoder_weight and decoder_bias.

    Precision: the logits are computed in the inputs' dtype (under autocast, in its dtype, as autocast
    runs the model's ``nn.Linear`` decoder: bf16 logits from fp32 weights), the cross-entropy in fp32.
    The weight and bias gradients accumulate over the chunks in fp32 and come back in each input's dtype.
    With a gradient needed, the forward computes the gradients (kept until the backward, which scales
    them): its time is most of the op's, and the backward is a few element-wise products.
    """
    _check_inputs(hidden, decoder_weight, decoder_bias, targets, ignore_index, label_smoothing)
    compute_dtype = _compute_dtype(hidden, decoder_weight, decoder_bias)
    rows = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).to(torch.int64).contiguous()
    needs = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, decoder_weight,
                                                                                     decoder_bias)]
    args = (rows, decoder_weight, decoder_bias, flat_targets, ignore_index, float(label_smoothing), compute_dtype,
            *needs, _use_kernel(hidden, compute_dtype))
    if any(needs):
        return _MlmLoss.apply(*args)
    return tuple(_forward(*args)[:2])  # inference: no autograd node, no gradient work
