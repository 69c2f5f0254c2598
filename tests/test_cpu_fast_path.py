"""The CPU path of the ops (no Triton kernel): torch's fused kernels, the references' numbers.

Attention runs torch's SDPA (its CPU flash kernel), the intermediate Linear adds its bias in the GEMM,
q/k/v are three GEMMs (no per-call weight concatenation), and an encoder batch with enough padding runs
unpadded. Each is checked against the float64 reference within a small factor of PyTorch's own fp32
error, on random inputs of odd sizes, with NaN at the padded positions.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

import fastbert
from fastbert import backend, ops
from tests.kernel_checks import assert_error_within, cu_seqlens_of, lengths_mask
from tests.spies import count_calls

attention_module = importlib.import_module("fastbert.ops.flash_attention")


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Counts calls of torch's SDPA made by fastbert's attention (proof that the fast path ran)."""
    return count_calls(monkeypatch, attention_module.F, ("scaled_dot_product_attention",))


def _compare(fast, reference, inputs, **within):
    """Output and input gradients of ``fast`` (auto backend, CPU) vs ``reference`` in float64, within
    3x the error of ``reference`` itself in float32."""
    out = fast(*inputs)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    exact_inputs = [x.detach().double().requires_grad_() for x in inputs]
    exact = reference(*exact_inputs)
    exact_grads = torch.autograd.grad(exact, exact_inputs, grad_out.double())
    same_inputs = [x.detach().clone().requires_grad_() for x in inputs]
    same = reference(*same_inputs)
    same_grads = torch.autograd.grad(same, same_inputs, grad_out)
    assert_error_within("out", out, same, exact, slack_ulps=16, min_scale=1.0, **within)
    for name, got, ref_same, ref_exact in zip(("dq", "dk", "dv", "d4"), grads, same_grads, exact_grads):
        assert_error_within(name, got, ref_same, ref_exact, slack_ulps=16, min_scale=1.0, **within)
    return out


def _poisoned_qkv(shape, mask):
    """q, k, v with NaN at every padded key/value position (what the reference reads as zeros)."""
    q, k, v = (torch.randn(shape) for _ in range(3))
    with torch.no_grad():
        k[~mask], v[~mask] = float("nan"), float("nan")
    return [t.requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("seqlen, heads, head_dim, lengths", [
    (37, 3, 24, [37, 1, 0]),    # a full row, a length-1 row, a row with no keys at all
    (19, 2, 12, [19, 7]),       # a head dim the Triton kernel does not take
    (5, 1, 8, [5, 5]),          # no padding
])
def test_padded_attention_runs_sdpa_with_the_reference_numbers(seqlen, heads, head_dim, lengths, sdpa_calls):
    mask = lengths_mask(lengths, seqlen, "cpu")
    inputs = _poisoned_qkv((len(lengths), seqlen, heads, head_dim), mask)
    out = _compare(lambda q, k, v: ops.attention(q, k, v, mask), lambda q, k, v: ops.attention_reference(q, k, v, mask),
                   inputs)
    assert sdpa_calls["scaled_dot_product_attention"] == 1
    keyless = torch.as_tensor(lengths) == 0
    assert (out[keyless] == 0).all()  # a query with no real key attends to nothing


def test_varlen_attention_runs_sdpa_with_the_reference_numbers(sdpa_calls):
    lengths = [9, 1, 14]
    cu_seqlens = cu_seqlens_of(lengths, "cpu")
    inputs = [torch.randn(sum(lengths), 2, 16).requires_grad_() for _ in range(3)]
    _compare(lambda q, k, v: ops.attention_varlen(q, k, v, cu_seqlens, 14),
             lambda q, k, v: ops.attention_varlen_reference(q, k, v, cu_seqlens, 14), inputs)
    assert sdpa_calls["scaled_dot_product_attention"] == 1


def test_cpu_attention_dropout_draws_as_the_reference():
    """On the CPU SDPA's dropout is F.dropout on the probabilities: the reference's mask, draw for draw."""
    mask = lengths_mask([21, 8, 0], 21, "cpu")
    q, k, v = _poisoned_qkv((3, 21, 2, 16), mask)
    torch.manual_seed(7)
    fast = ops.attention(q, k, v, mask, dropout_p=0.3)
    torch.manual_seed(7)
    reference = ops.attention_reference(q, k, v, mask, dropout_p=0.3)
    torch.manual_seed(8)
    other_draw = ops.attention_reference(q, k, v, mask, dropout_p=0.3)
    scale = reference.abs().max().item()
    assert (fast - reference).abs().max().item() <= 1e-5 * scale
    assert (other_draw - reference).abs().max().item() > 0.1 * scale  # the comparison can tell draws apart


def test_dense_gelu_adds_the_bias_in_the_gemm(monkeypatch):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(3, 7, 20), torch.randn(36, 20) * 0.3, torch.randn(36)
    inputs = [t.requires_grad_() for t in (x, weight, bias)]
    calls = count_calls(monkeypatch, importlib.import_module("fastbert.ops.gelu"), ("bias_gelu_reference",))
    _compare(ops.dense_gelu, lambda x, w, b: ops.bias_gelu_reference(F.linear(x, w), b), inputs)
    assert calls["bias_gelu_reference"] == 0  # torch's own GELU after addmm, not a separate bias add


def test_qkv_are_three_gemms_on_the_cpu(monkeypatch):
    """No concatenated copy of the q/k/v weights per call on the CPU, and the same numbers as HF's three
    Linear modules."""
    from fastbert.modeling import project_qkv

    torch.manual_seed(0)
    layers = [torch.nn.Linear(24, 24) for _ in range(3)]
    hidden = torch.randn(2, 5, 24)
    cats = count_calls(monkeypatch, torch, ("cat",))
    q, k, v = project_qkv(hidden, *layers, heads=3, head_dim=8)
    assert cats["cat"] == 0
    for got, layer in zip((q, k, v), layers):
        assert got.shape == (2, 5, 3, 8) and torch.equal(got, layer(hidden).view(2, 5, 3, 8))


@pytest.mark.parametrize("name", ["auto", "torch"])
def test_cpu_unpads_a_batch_with_enough_padding(name):
    hidden = torch.zeros(4, 10, 32)
    rule = attention_module.CPU_UNPAD_MIN_PADDING
    with backend.use(name):
        assert not attention_module.varlen_preferred(hidden, 16, None)  # nothing says where the padding is
        assert not attention_module.varlen_preferred(hidden, 16, torch.ones(4, 10, dtype=torch.bool))
        little = lengths_mask([10, 10, 10, 10 - int(40 * rule) + 1], 10, "cpu")  # just under the rule
        enough = lengths_mask([10, 10, 10, 10 - int(40 * rule) - 1], 10, "cpu")
        assert not attention_module.varlen_preferred(hidden, 16, little)
        assert attention_module.varlen_preferred(hidden, 16, enough)


def test_fastbert_model_on_a_padded_cpu_batch_runs_unpadded_with_the_padded_numbers(monkeypatch):
    torch.manual_seed(0)
    config = fastbert.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=48, max_position_embeddings=32)
    model = fastbert.BertModel(config).eval()
    mask = lengths_mask([17, 4, 11], 17, "cpu")
    ids = torch.randint(1, 50, mask.shape) * mask
    calls = count_calls(monkeypatch, ops, ("attention", "attention_varlen"))
    with torch.no_grad():
        unpadded = model(ids, mask.long()).last_hidden_state
        model.unpad = False
        padded = model(ids, mask.long()).last_hidden_state
    assert calls == {"attention": 2, "attention_varlen": 2}  # auto: unpadded; forced: padded
    assert (unpadded - padded)[mask].abs().max() < 1e-5
