"""The torch reference ops against straightforward float64 math, and their input checks."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastbert import ops
from fastbert._validation import DtypeError


def naive_attention(q, k, v, keep, scale):
    """Per (batch, head) loops in float64, written independently of the reference."""
    b, l, h, d = q.shape
    out = torch.zeros(b, l, h, d, dtype=torch.float64)
    for bi in range(b):
        real = keep[bi].nonzero().flatten()
        if real.numel() == 0:
            continue
        for hi in range(h):
            s = q[bi, :, hi].double() @ k[bi, real, hi].double().T * scale
            out[bi, :, hi] = torch.softmax(s, dim=-1) @ v[bi, real, hi].double()
    return out


@pytest.mark.parametrize("b, l, h, d", [(2, 7, 3, 8), (3, 33, 2, 40)])
def test_attention_reference(b, l, h, d):
    q, k, v = (torch.randn(b, l, h, d) for _ in range(3))
    keep = torch.rand(b, l) > 0.3
    keep[0] = False  # a fully padded sequence gives zeros
    keep[-1, 0] = True
    v_poisoned = v.clone()
    v_poisoned[~keep] = float("nan")  # padded values must never reach the output
    k_poisoned = k.clone()
    k_poisoned[~keep] = float("nan")
    out = ops.attention(q, k_poisoned, v_poisoned, keep)
    want = naive_attention(q, k, v, keep, 1 / math.sqrt(d))
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[0], torch.zeros_like(out[0]))


def test_attention_varlen_equals_padded():
    b, l, h, d = 4, 9, 2, 16
    mask = torch.arange(l)[None, :] < torch.tensor([9, 1, 0, 5])[:, None]
    q, k, v = (torch.randn(b, l, h, d) for _ in range(3))
    padded = ops.attention(q, k, v, mask, softmax_scale=0.3)
    qu, indices, cu, max_len = ops.unpad_input(q, mask)
    ku, vu = ops.unpad_input(k, mask)[0], ops.unpad_input(v, mask)[0]
    varlen = ops.attention_varlen(qu, ku, vu, cu, max_len, softmax_scale=0.3)
    torch.testing.assert_close(varlen, padded[mask])


def test_attention_dropout_is_unbiased_and_seeded():
    q, k, v = (torch.randn(2, 16, 2, 8) for _ in range(3))
    torch.manual_seed(3)
    a = ops.attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    assert torch.equal(a, ops.attention(q, k, v, dropout_p=0.5))
    mean = torch.stack([ops.attention(q, k, v, dropout_p=0.5) for _ in range(400)]).mean(0)
    torch.testing.assert_close(mean, ops.attention(q, k, v), atol=0.15, rtol=0)


@pytest.mark.parametrize("call, error, message", [
    (lambda: ops.attention(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)), ValueError, "4-D"),
    (lambda: ops.attention(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4).half(), torch.randn(1, 2, 1, 4)),
     DtypeError, "must match"),
    (lambda: ops.attention(*(torch.randn(1, 2, 1, 4),) * 3, key_padding_mask=torch.ones(1, 3, dtype=torch.bool)),
     ValueError, "key_padding_mask must have shape"),
    (lambda: ops.attention(*(torch.randn(1, 2, 1, 4),) * 3, key_padding_mask=torch.ones(1, 2)), TypeError,
     "bool or an integer"),
    (lambda: ops.attention(*(torch.randn(1, 2, 1, 4),) * 3, dropout_p=1.0), ValueError, "dropout_p"),
    (lambda: ops.attention(*(torch.randint(0, 3, (1, 2, 1, 4)),) * 3), TypeError, "float16"),
    (lambda: ops.attention_varlen(*(torch.randn(5, 1, 4),) * 3, torch.tensor([0, 5]), 5), TypeError, "int32"),
    (lambda: ops.attention_varlen(*(torch.randn(5, 1, 4),) * 3, torch.tensor([0, 4], dtype=torch.int32), 5),
     ValueError, "must equal the number of tokens"),
    (lambda: ops.attention_varlen(*(torch.randn(5, 1, 4),) * 3, torch.tensor([0, 3, 2, 5], dtype=torch.int32), 5),
     ValueError, "non-decreasing"),
    (lambda: ops.attention_varlen(*(torch.randn(5, 1, 4),) * 3, torch.tensor([0, 5], dtype=torch.int32), 4),
     ValueError, "max_seqlen"),
    # an absurd max_seqlen would size a (batch, max_seqlen) grid: refused before anything is allocated
    (lambda: ops.attention_varlen(*(torch.randn(5, 1, 4),) * 3, torch.tensor([0, 5], dtype=torch.int32), 2**40),
     ValueError, "max_seqlen .* is larger than the number of tokens in q \\(5\\)"),
    (lambda: ops.attention_varlen(*(torch.randn(5, 1, 4),) * 3, torch.tensor([0, 2, 5], dtype=torch.int32), 6),
     ValueError, "larger than the number of tokens"),
    *[(lambda scale=scale: ops.attention(*(torch.randn(1, 2, 1, 4),) * 3, softmax_scale=scale), ValueError,
       "softmax_scale must be a finite positive float") for scale in (math.inf, -math.inf, math.nan, 0.0, -1.0)],
    (lambda: ops.attention_varlen(*(torch.randn(5, 1, 4),) * 3, torch.tensor([0, 5], dtype=torch.int32), 5,
                                  softmax_scale=math.inf), ValueError, "softmax_scale"),
])
def test_attention_input_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_dropout_add_layer_norm_reference():
    x, r = torch.randn(5, 37, dtype=torch.float64), torch.randn(5, 37, dtype=torch.float64)
    w, b = torch.randn(37, dtype=torch.float64), torch.randn(37, dtype=torch.float64)
    h = x + r
    want = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-12) * w + b
    torch.testing.assert_close(ops.dropout_add_layer_norm(x, r, w, b), want)
    torch.manual_seed(0)
    dropped = ops.dropout_add_layer_norm(x, torch.zeros_like(r), torch.ones(37, dtype=torch.float64), None,
                                         dropout_p=0.5)
    torch.manual_seed(0)
    mask = F.dropout(torch.ones_like(x), 0.5, training=True)
    torch.testing.assert_close(dropped, F.layer_norm(x * mask, (37,), eps=1e-12))
    with pytest.raises(ValueError, match=r"weight must have shape \(37,\)"):
        ops.dropout_add_layer_norm(x, r, torch.ones(36, dtype=torch.float64), b)
    with pytest.raises(ValueError, match="residual has shape"):
        ops.dropout_add_layer_norm(x, r[:4], w, b)


def test_bias_gelu_reference_is_exact_erf_gelu():
    x, bias = torch.randn(3, 7, 11, dtype=torch.float64), torch.randn(11, dtype=torch.float64)
    h = x + bias
    torch.testing.assert_close(ops.bias_gelu(x, bias), 0.5 * h * (1 + torch.erf(h / math.sqrt(2))))
    with pytest.raises(ValueError, match=r"bias must have shape \(11,\)"):
        ops.bias_gelu(x, torch.randn(10, dtype=torch.float64))
