"""Flash attention (padded and varlen): kernel vs float64 reference, masking, dropout, dispatch, errors.

Without a GPU the Triton kernels run under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so shapes stay tiny. Tolerances follow flash-attention: the kernel's error against a float64 reference
must stay within a small factor of the error of PyTorch at the kernel's own precision on the same
inputs. Output buffers are poisoned with NaN, so a row the kernels forget to write fails the test.
"""
import importlib
import math

import pytest
import torch

import fastbert
from fastbert import backend, ops
from tests.kernel_checks import check_against_reference, cu_seqlens_of, lengths_mask
from tests.spies import count_calls

# The module, not the function of the same name that fastbert.ops exports.
attention_module = importlib.import_module("fastbert.ops.flash_attention")

fa = pytest.importorskip("fastbert.kernels.flash_attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Kernel error <= FACTOR * same-precision PyTorch error + a slack of a few ulps of the largest exact
# value (at least 1: the inputs are O(1)). The slack matters where PyTorch happens to be exact: a row with a single real key has
# dS = P (dP - delta) = 0 exactly, which PyTorch's rowsum(P * dP) reproduces but the flash-attention
# form delta = rowsum(dO * O) only up to rounding, summed over every query that sees that key.
FACTOR = 3.0
SLACK_ULPS = {torch.float32: 16, torch.float16: 1, torch.bfloat16: 1}


@pytest.fixture(autouse=True)
def poisoned_buffers(poison_empty, monkeypatch):
    """Every buffer the kernels fill starts as NaN (the conftest fixture: an unwritten element shows up)."""
    # On a GPU, one fixed launch configuration: autotuning every small shape here would only add compiles.
    monkeypatch.setenv("FASTBERT_AUTOTUNE", "0")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts launches of the Triton forward and backward (proof that no torch fallback ran)."""
    return count_calls(monkeypatch, fa, ("forward", "backward"))


def _qkv(shape, dtype, *, requires_grad=True):
    return [torch.randn(shape, dtype=dtype, device=DEVICE).requires_grad_(requires_grad) for _ in range(3)]


def _mask_from_lengths(lengths, seqlen):
    return lengths_mask(lengths, seqlen, DEVICE)


def _cu_seqlens(lengths):
    return cu_seqlens_of(lengths, DEVICE)


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def _check_against_reference(run_kernel, run_reference, inputs, dtype):
    """Forward and dQ/dK/dV of the kernel vs float64, bounded by PyTorch's error at ``dtype``."""
    check_against_reference(run_kernel, run_reference, inputs, torch.float64, factor=FACTOR,
                            slack_ulps=SLACK_ULPS[dtype], min_scale=1.0)


# ---------------------------------------------------------------------------------------------------
# Padded layout
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype, head_dim, seqlen, lengths",
    [
        # a full sequence, a length-1 sequence, a fully padded one; odd lengths
        (torch.float32, 16, 37, [37, 1, 0]),
        (torch.float32, 32, 70, [70, 41, 5]),
        (torch.float32, 64, 17, [9, 17]),
        (torch.float32, 40, 45, [45, 0, 23]),  # non-power-of-two head dim: the block is padded
        (torch.float32, 16, 1, [1, 0]),  # sequence length 1
        (torch.float16, 64, 33, [33, 1, 0]),
        (torch.float16, 40, 50, [50, 27]),
    ],
)
def test_padded_forward_and_grads_match_float64(dtype, head_dim, seqlen, lengths, kernel_calls):
    mask = _mask_from_lengths(lengths, seqlen)
    inputs = _qkv((len(lengths), seqlen, 2, head_dim), dtype)
    _check_against_reference(lambda q, k, v: ops.attention(q, k, v, mask),
                             lambda q, k, v: ops.attention_reference(q, k, v, mask), inputs, dtype)
    assert kernel_calls == {"forward": 1, "backward": 1}


def test_padded_scattered_int_mask_and_custom_scale():
    """A mask that is not a prefix (left padding, holes), given as int64, and an explicit scale."""
    seqlen = 29
    mask = (torch.rand(3, seqlen, device=DEVICE) < 0.6).long()
    mask[0, :] = 0
    mask[1, :10] = 0  # left padding
    inputs = _qkv((3, seqlen, 2, 32), torch.float32)
    _check_against_reference(lambda q, k, v: ops.attention(q, k, v, mask, softmax_scale=0.3),
                             lambda q, k, v: ops.attention_reference(q, k, v, mask, softmax_scale=0.3),
                             inputs, torch.float32)


def test_no_mask_and_non_contiguous_inputs():
    """q, k, v cut from one fused qkv projection (strided views, as the model makes them); no mask."""
    qkv = torch.randn(2, 29, 3, 2, 32, device=DEVICE)
    inputs = [t.requires_grad_() for t in qkv.unbind(dim=2)]
    assert not inputs[0].is_contiguous()
    _check_against_reference(lambda q, k, v: ops.attention(q, k, v),
                             lambda q, k, v: ops.attention_reference(q, k, v), inputs, torch.float32)


def test_kernels_take_views_with_strides_in_multiples_of_8_and_copy_other_tensors():
    """The kernels promise the compiler that every row and head offset is a multiple of 8 elements
    (16-byte vector loads at any head dim): views that keep that promise go in as they are, any other
    tensor as a contiguous copy, and both give the reference's result."""
    kept = [
        torch.randn(2, 5, 3, 2, 72, device=DEVICE).unbind(dim=2)[0],  # q of a fused qkv: strides 2160, 432, 72
        torch.randn(2, 5, 3, 72, device=DEVICE)[:, :, :2],  # a slice of the heads
        torch.randn(2, 5, 9, 8, device=DEVICE)[:, :, 1:8:3],  # every third head: head stride 24
        # a dim of size 1 is never stepped through, whatever its stride
        torch.randn(1, 5, 2, 72, device=DEVICE).as_strided((1, 5, 2, 72), (3, 144, 72, 1)),
    ]
    copied = [
        torch.randn(2, 5, 2, 77, device=DEVICE)[..., :72],  # head stride 77
        torch.randn(2, 5, 72, 2, device=DEVICE).transpose(-1, -2),  # last dim not contiguous
    ]
    for t in kept:
        assert fa._kernel_ready(t) is t
    for t in copied:
        ready = fa._kernel_ready(t)
        assert ready.is_contiguous() and ready.data_ptr() != t.data_ptr()
        torch.testing.assert_close(ready, t, rtol=0, atol=0)
    q, k, v = (torch.randn(2, 11, 2, 29, device=DEVICE)[..., :24].requires_grad_() for _ in range(3))
    mask = _mask_from_lengths([11, 6], 11)
    _check_against_reference(lambda q, k, v: ops.attention(q, k, v, mask),
                             lambda q, k, v: ops.attention_reference(q, k, v, mask), [q, k, v], torch.float32)


@pytest.mark.parametrize("shape", [(2, 0, 2, 16), (0, 5, 2, 16)])
def test_empty_inputs(shape):
    q, k, v = _qkv(shape, torch.float32)
    with backend.use("triton"):
        out = ops.attention(q, k, v, torch.ones(shape[:2], dtype=torch.bool, device=DEVICE))
        grads = _grads(out.sum(), (q, k, v), None)
        flat = [x[0, :0] if shape[0] else x.flatten(0, 1) for x in (q, k, v)]
        out_varlen = ops.attention_varlen(*flat, torch.zeros(2, dtype=torch.int32, device=DEVICE), 0)
    assert out.shape == shape and all(g.shape == shape for g in grads)
    assert out_varlen.shape == (0, 2, 16)


def test_nan_in_padded_keys_and_values_never_leaks():
    seqlen, lengths = 40, [40, 13, 0]
    mask = _mask_from_lengths(lengths, seqlen)
    q, k, v = _qkv((3, seqlen, 2, 16), torch.float32, requires_grad=False)
    grad_out = torch.randn_like(q)

    def run(k_in, v_in):
        inputs = [x.clone().requires_grad_() for x in (q, k_in, v_in)]
        with backend.use("triton"):
            out = ops.attention(*inputs, mask)
        return out, _grads(out, inputs, grad_out)

    clean_out, clean_grads = run(k, v)
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[~mask] = float("nan")
    v_nan[~mask] = float("inf")
    out, (dq, dk, dv) = run(k_nan, v_nan)

    assert torch.equal(out, clean_out)
    for got, clean in zip((dq, dk, dv), clean_grads):
        assert torch.equal(got, clean)
    # Padded keys get exactly zero gradient; a sequence with no real token gives zeros, not NaN.
    assert torch.all(dk[~mask] == 0) and torch.all(dv[~mask] == 0)
    assert torch.all(out[2] == 0) and torch.all(dq[2] == 0)


def _padding_mask(kind, batch, seqlen):
    """A (batch, seqlen) bool mask of one padding style, with odd lengths and a fully padded row."""
    lengths = torch.tensor([seqlen, 1, 0, 27, 11][:batch], device=DEVICE)
    positions = torch.arange(seqlen, device=DEVICE)[None, :]
    if kind == "right":
        return positions < lengths[:, None]
    if kind == "left":
        return positions >= seqlen - lengths[:, None]
    if kind == "middle":  # padding at both ends: still one contiguous run of real tokens
        start = (seqlen - lengths[:, None]) // 2
        return (positions >= start) & (positions < start + lengths[:, None])
    mask = torch.rand(batch, seqlen, device=DEVICE) < 0.6  # "holes": the general mask path
    mask[2] = False
    return mask


@pytest.mark.parametrize("kind", ["right", "left", "middle", "holes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_padding_styles_match_float64(kind, dtype):
    """Every padding style, with fully padded rows and blocks: forward and gradients vs float64."""
    seqlen = 75  # > 2 interpreter blocks of 32: whole key and query blocks of padding get skipped
    mask = _padding_mask(kind, 5, seqlen)
    inputs = _qkv((5, seqlen, 2, 16), dtype)
    _check_against_reference(lambda q, k, v: ops.attention(q, k, v, mask),
                             lambda q, k, v: ops.attention_reference(q, k, v, mask), inputs, dtype)


@pytest.mark.parametrize("kind", ["right", "left", "middle", "holes"])
def test_padding_keys_get_no_gradient_and_empty_sequences_give_zeros(kind):
    seqlen = 70
    mask = _padding_mask(kind, 5, seqlen)
    q, k, v = _qkv((5, seqlen, 2, 16), torch.float32)
    with backend.use("triton"):
        out = ops.attention(q, k, v, mask)
    dq, dk, dv = _grads(out, (q, k, v), torch.randn_like(out))
    pad = ~mask
    assert torch.all(dk[pad] == 0) and torch.all(dv[pad] == 0)
    assert torch.all(out[2] == 0) and torch.all(dq[2] == 0)  # sequence 2 has no real token
    # Padding queries of the other sequences attend to their real keys, as in transformers.
    assert torch.all(out[[0, 1, 3, 4]].abs().sum(-1) > 0)


def test_token_spans_of_each_padding_style():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [1, 0, 1, 0, 0], [0, 0, 0, 0, 0],
                         [1, 1, 1, 1, 1]], dtype=torch.bool, device=DEVICE)
    spans = fa.token_spans(mask)
    assert spans.dtype == torch.int32
    assert spans.tolist() == [[0, 3, 1], [2, 5, 1], [1, 3, 1], [0, 3, 0], [0, 0, 1], [0, 5, 1]]


def test_dense_spans_drive_the_kernel_without_reading_the_mask(monkeypatch):
    """A span marked dense is trusted: the kernels neither read the mask nor visit blocks past the span.
    Here the mask says "all real" but the span says "first 20 tokens": the result must be the span's."""
    seqlen, real = 70, 20
    all_real = torch.ones(2, seqlen, dtype=torch.bool, device=DEVICE)
    spans = torch.tensor([[0, real, 1], [0, real, 1]], dtype=torch.int32, device=DEVICE)
    monkeypatch.setattr(fa, "token_spans", lambda mask: spans)
    inputs = _qkv((2, seqlen, 2, 16), torch.float32)
    prefix = _mask_from_lengths([real, real], seqlen)
    _check_against_reference(lambda q, k, v: ops.attention(q, k, v, all_real),
                             lambda q, k, v: ops.attention_reference(q, k, v, prefix), inputs, torch.float32)


def test_spans_are_computed_once_per_mask(monkeypatch):
    """Two layers and their backward on one mask reduce it once; changing the mask in place recomputes."""
    calls = []
    original = fa.token_spans
    monkeypatch.setattr(fa, "token_spans", lambda mask: calls.append(1) or original(mask))
    mask = _padding_mask("right", 3, 40)
    q, k, v = _qkv((3, 40, 2, 16), torch.float32)
    with backend.use("triton"):
        out = ops.attention(ops.attention(q, k, v, mask), k, v, mask)
        out.sum().backward()
        assert len(calls) == 1
        mask[0, 30:] = False
        changed = ops.attention(q, k, v, mask)
    assert len(calls) == 2
    torch.testing.assert_close(changed, ops.attention_reference(q, k, v, mask))


# ---------------------------------------------------------------------------------------------------
# Varlen layout
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype, head_dim, lengths",
    [
        (torch.float32, 32, [7, 0, 1, 61]),
        (torch.float32, 80, [33, 20]),
        (torch.float16, 16, [45, 1, 0, 12]),
    ],
)
def test_varlen_forward_and_grads_match_float64(dtype, head_dim, lengths, kernel_calls):
    cu_seqlens, max_seqlen = _cu_seqlens(lengths), max(lengths)
    inputs = _qkv((sum(lengths), 2, head_dim), dtype)
    _check_against_reference(lambda q, k, v: ops.attention_varlen(q, k, v, cu_seqlens, max_seqlen),
                             lambda q, k, v: ops.attention_varlen_reference(q, k, v, cu_seqlens, max_seqlen),
                             inputs, dtype)
    assert kernel_calls == {"forward": 1, "backward": 1}


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_varlen_equals_padded_on_real_tokens(dropout_p):
    """The same batch, padded with a mask and unpadded: same outputs and gradients on real tokens.
    With the same seed and max_seqlen == seqlen both layouts draw the same dropout mask."""
    seqlen, lengths = 37, [37, 20, 1, 0]
    mask = _mask_from_lengths(lengths, seqlen)
    q, k, v = _qkv((4, seqlen, 2, 32), torch.float32, requires_grad=False)
    # Padded queries attend to real keys too; a zero gradient there (as a loss on real tokens gives)
    # keeps them out of dK/dV, which the unpadded batch has no rows for.
    grad_out = torch.randn_like(q) * mask[:, :, None, None]

    padded_inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    with backend.use("triton"):
        torch.manual_seed(7)
        padded = ops.attention(*padded_inputs, mask, dropout_p=dropout_p)
    padded_grads = _grads(padded, padded_inputs, grad_out)

    varlen_inputs = [ops.unpad_input(x, mask)[0].detach().requires_grad_() for x in (q, k, v)]
    _, indices, cu_seqlens, max_seqlen = ops.unpad_input(q, mask)
    with backend.use("triton"):
        torch.manual_seed(7)
        varlen = ops.attention_varlen(*varlen_inputs, cu_seqlens, max_seqlen, dropout_p=dropout_p)
    varlen_grads = _grads(varlen, varlen_inputs, ops.unpad_input(grad_out, mask)[0])

    real = mask.flatten()
    torch.testing.assert_close(varlen, padded.flatten(0, 1)[real], rtol=1e-6, atol=1e-6)
    for got, want in zip(varlen_grads, padded_grads):
        torch.testing.assert_close(got, want.flatten(0, 1)[real], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("head_dim", [8, 24, 40, 96])  # one per padded head dim 16 / 32 / 64 / 128
def test_fp32_gpu_configurations_compute_attention(monkeypatch, head_dim):
    """The tiles fp32 runs on the GPU (flash_attention._FP32_*: 16-wide blocks, query and key blocks of
    different sizes) give the float64 result, and with dropout the same values as the interpreter's own
    tiles (the mask depends on positions only). Runs them here by letting the launcher take its GPU branch."""
    seqlen, lengths = 45, [45, 17, 0]
    mask = _mask_from_lengths(lengths, seqlen)
    inputs = _qkv((3, seqlen, 1, head_dim), torch.float32)
    configs = []
    real_launch = fa.launch

    def record(kernel, tuned, grid, args, meta, fixed):
        configs.append((fixed.kwargs["BLOCK_M"], fixed.kwargs["BLOCK_N"]))
        real_launch(kernel, tuned, grid, args, meta, fixed)

    def run(dropout_p):
        torch.manual_seed(5)
        out = ops.attention(*inputs, mask, dropout_p=dropout_p)
        return (out, *_grads(out, inputs, grad_out))

    grad_out = torch.randn(inputs[0].shape)
    with backend.use("triton"):
        interpreter_tiles = run(0.2)
    monkeypatch.setattr(fa, "interpreted", lambda: False)
    monkeypatch.setattr(fa, "launch", record)
    _check_against_reference(lambda q, k, v: ops.attention(q, k, v, mask),
                             lambda q, k, v: ops.attention_reference(q, k, v, mask), inputs, torch.float32)
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    want = [fa.fp32_config(table, block_d, False).kwargs for table in (fa._FP32_FWD, fa._FP32_BWD_DQ, fa._FP32_BWD_DKDV)]
    assert configs == [(c["BLOCK_M"], c["BLOCK_N"]) for c in want]
    with backend.use("triton"):
        gpu_tiles = run(0.2)
    for got, expected in zip(gpu_tiles, interpreter_tiles, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------
def _dropout_mask(shape, dropout_p, seed, layout="padded"):
    """Read the kernel's keep-mask back: with q = k = 0 every probability is 1/L, and with v = identity
    the output row i is exactly keep[i, :] / (L (1 - p)). Returns (keep bool (B, H, L, L), output)."""
    batch, seqlen, heads, head_dim = shape
    assert seqlen <= head_dim
    zeros = torch.zeros(shape, device=DEVICE)
    identity = torch.eye(seqlen, head_dim, device=DEVICE)[None, :, None, :].expand(shape).contiguous()
    torch.manual_seed(seed)
    with backend.use("triton"):
        out = ops.attention(zeros, zeros, identity, dropout_p=dropout_p)
    keep = out[..., :seqlen].transpose(1, 2) > 0
    return keep, out


@pytest.mark.parametrize("dropout_p", [0.1, 0.3])
def test_dropout_keep_rate_scale_and_expectation(dropout_p):
    shape = (2, 64, 2, 64)
    keep, out = _dropout_mask(shape, dropout_p, seed=3)
    seqlen = shape[1]
    kept_value = 1.0 / (seqlen * (1.0 - dropout_p))
    # Every entry is either dropped (0) or the probability scaled by 1/(1-p).
    assert torch.all((out == 0) | ((out - kept_value).abs() <= 1e-6 * kept_value))
    keep_rate = keep.float().mean().item()
    assert abs(keep_rate - (1.0 - dropout_p)) <= 0.02, keep_rate
    # Unbiased: on average the dropped-and-rescaled probabilities sum to 1 per row, as without dropout.
    row_sums = out[..., :seqlen].sum(-1)
    assert abs(row_sums.mean().item() - 1.0) <= 0.02 / (1.0 - dropout_p)
    # Masks are not repeated across heads, batch entries or rows.
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])


def test_dropout_reproducible_under_manual_seed():
    q, k, v = _qkv((2, 23, 2, 16), torch.float32, requires_grad=False)

    def run(seed):
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        torch.manual_seed(seed)
        with backend.use("triton"):
            out = ops.attention(*inputs, dropout_p=0.2)
        return (out, *_grads(out, inputs, torch.ones_like(out)))

    first, again, other = run(11), run(11), run(12)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


def test_dropout_gradients_use_the_forward_mask():
    """The backward regenerates the forward's mask: compare with a float64 reference that applies the
    mask read back from the kernel (same seed, same shape)."""
    shape, dropout_p, seed = (2, 29, 2, 32), 0.2, 5
    keep, _ = _dropout_mask(shape, dropout_p, seed)
    mask = _mask_from_lengths([29, 11], shape[1])
    inputs = _qkv(shape, torch.float32)

    def reference(q, k, v):
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(shape[-1])
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1) * keep / (1.0 - dropout_p)
        return torch.einsum("bhqk,bkhd->bqhd", probs, v)

    def kernel(q, k, v):
        torch.manual_seed(seed)
        return ops.attention(q, k, v, mask, dropout_p=dropout_p)

    _check_against_reference(kernel, reference, inputs, torch.float32)


# ---------------------------------------------------------------------------------------------------
# Dispatch, validation, custom ops
# ---------------------------------------------------------------------------------------------------
def test_triton_backend_never_falls_back(monkeypatch, kernel_calls):
    def forbidden(*args, **kwargs):
        raise AssertionError("the torch reference ran under the triton backend")

    monkeypatch.setattr(attention_module, "attention_reference", forbidden)
    monkeypatch.setattr(attention_module, "attention_varlen_reference", forbidden)
    q, k, v = _qkv((2, 9, 1, 16), torch.float32)
    with backend.use("triton"):
        ops.attention(q, k, v).sum().backward()
        ops.attention_varlen(q[0], k[0], v[0], _cu_seqlens([4, 5]), 5).sum().backward()
    assert kernel_calls == {"forward": 2, "backward": 2}


def test_torch_backend_never_launches_the_kernel(kernel_calls):
    q, k, v = _qkv((2, 9, 1, 16), torch.float32)
    with backend.use("torch"):
        ops.attention(q, k, v).sum().backward()
    assert kernel_calls == {"forward": 0, "backward": 0}


@pytest.mark.parametrize("head_dim", [12, 20, 136])
def test_unsupported_head_dim_is_a_value_error_under_triton(head_dim, kernel_calls):
    q, k, v = _qkv((1, 5, 1, head_dim), torch.float32, requires_grad=False)
    with backend.use("triton"), pytest.raises(ValueError, match=f"head_dim {head_dim}.*multiples of 8 up to 128"):
        ops.attention(q, k, v)
    with backend.use("triton"), pytest.raises(ValueError, match=f"head_dim {head_dim}"):
        ops.attention_varlen(q[0], k[0], v[0], _cu_seqlens([5]), 5)
    assert kernel_calls["forward"] == 0


def test_float64_is_a_value_error_under_triton():
    q, k, v = _qkv((1, 5, 1, 16), torch.float64, requires_grad=False)
    with backend.use("triton"), pytest.raises(ValueError, match="float64"):
        ops.attention(q, k, v)


@pytest.mark.parametrize(
    "cu_seqlens, max_seqlen, error, message",
    [
        (torch.tensor([0, 4, 9], dtype=torch.int64), 5, TypeError, "int32"),
        (torch.tensor([0, 4, 8], dtype=torch.int32), 5, ValueError, "equal the number of tokens"),
        (torch.tensor([0, 7, 5, 9], dtype=torch.int32), 7, ValueError, "non-decreasing"),
        (torch.tensor([1, 4, 9], dtype=torch.int32), 5, ValueError, "start at 0"),
        (torch.tensor([0, 4, 9], dtype=torch.int32), 3, ValueError, "max_seqlen"),
        (torch.tensor([0, 4, 9], dtype=torch.int32), 2**40, ValueError, "larger than the number of tokens"),
        (torch.tensor([9], dtype=torch.int32), 9, ValueError, "length batch \\+ 1"),
        (torch.tensor([[0, 9]], dtype=torch.int32), 9, ValueError, "1-D"),
    ],
)
def test_bad_cu_seqlens_are_rejected(cu_seqlens, max_seqlen, error, message, kernel_calls):
    q, k, v = _qkv((9, 1, 16), torch.float32, requires_grad=False)
    with backend.use("triton"), pytest.raises(error, match=message):
        ops.attention_varlen(q, k, v, cu_seqlens.to(DEVICE), max_seqlen)
    assert kernel_calls["forward"] == 0


def test_bad_padded_inputs_are_rejected():
    q, k, v = _qkv((2, 5, 1, 16), torch.float32, requires_grad=False)
    with backend.use("triton"):
        with pytest.raises(ValueError, match="key_padding_mask must have shape"):
            ops.attention(q, k, v, torch.ones(2, 4, dtype=torch.bool, device=DEVICE))
        with pytest.raises(TypeError, match="key_padding_mask must be bool or an integer"):
            ops.attention(q, k, v, torch.ones(2, 5, device=DEVICE))
        with pytest.raises(TypeError, match="must match"):
            ops.attention(q, k.half(), v)
        with pytest.raises(ValueError, match="4-D"):
            ops.attention(q[0], k[0], v[0])
        with pytest.raises(ValueError, match="dropout_p"):
            ops.attention(q, k, v, dropout_p=1.0)


def test_custom_ops_have_consistent_fake_implementations():
    """opcheck runs each op for real and under fake tensors / AOT dispatch and compares metadata."""
    q, k, v = _qkv((2, 9, 2, 16), torch.float32, requires_grad=False)
    mask = _mask_from_lengths([9, 4], 9)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    seed = torch.zeros(1, dtype=torch.int64)
    out, lse = torch.ops.fastbert.flash_attention_fwd(q, k, v, seed, mask, 0.0, 0.25)
    torch.library.opcheck(torch.ops.fastbert.flash_attention_fwd, (q, k, v, seed, mask, 0.0, 0.25), test_utils=tests)
    torch.library.opcheck(torch.ops.fastbert.flash_attention_bwd,
                          (torch.randn_like(out), q, k, v, out, lse, seed, mask, 0.0, 0.25), test_utils=tests)
    cu_seqlens = _cu_seqlens([5, 4])
    flat = [x[0] for x in (q, k, v)]
    out, lse = torch.ops.fastbert.flash_attention_varlen_fwd(*flat, seed, cu_seqlens, 5, 0.0, 0.25)
    torch.library.opcheck(torch.ops.fastbert.flash_attention_varlen_fwd, (*flat, seed, cu_seqlens, 5, 0.0, 0.25),
                          test_utils=tests)
    torch.library.opcheck(torch.ops.fastbert.flash_attention_varlen_bwd,
                          (torch.randn_like(out), *flat, out, lse, seed, cu_seqlens, 5, 0.0, 0.25), test_utils=tests)


def test_torch_compile_traces_varlen_without_graph_breaks():
    def step(q, k, v, cu_seqlens, max_seqlen):
        return ops.attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.1).square().sum()

    # Dynamic shapes: the token count and max_seqlen change from batch to batch in training.
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    for seed, lengths in ((2, [6, 3]), (3, [2, 5, 1])):
        cu_seqlens = _cu_seqlens(lengths)
        inputs = _qkv((sum(lengths), 2, 16), torch.float32)
        with backend.use("triton"):
            torch.manual_seed(seed)
            compiled_grads = torch.autograd.grad(compiled(*inputs, cu_seqlens, max(lengths)), inputs)
            torch.manual_seed(seed)
            eager_grads = torch.autograd.grad(step(*inputs, cu_seqlens, max(lengths)), inputs)
        for got, want in zip(compiled_grads, eager_grads):
            torch.testing.assert_close(got, want)


def test_varlen_preferred_follows_the_backend():
    hidden = torch.randn(2, 3, 64, device=DEVICE)
    with backend.use("torch"):
        assert not attention_module.varlen_preferred(hidden, 32)
    with backend.use("triton"):
        assert attention_module.varlen_preferred(hidden, 32)
        assert not attention_module.varlen_preferred(hidden, 20)  # unsupported head dim
        assert not attention_module.varlen_preferred(hidden.double(), 32)
    with backend.use("auto"):
        assert attention_module.varlen_preferred(hidden, 32) == hidden.is_cuda


def test_import_fastbert_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, fastbert; fastbert.ops.attention; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert fastbert.ops.attention is ops.attention
