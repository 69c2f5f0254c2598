"""GPU checks of the flash attention kernels: bf16 at BERT-base size (autotuned, as training runs it),
head dims and sequence lengths the interpreter tests cannot afford, auto-backend dispatch, dropout
on real hardware, the unpadded encoder.

Tolerance as in tests/test_attention.py (flash-attention's rule): kernel error vs an fp32 reference
<= FACTOR x the error of PyTorch at the kernel's precision + one ulp of the largest reference value.
"""
import importlib

import pytest
import torch

import fastbert
from fastbert import backend, ops
from tests.kernel_checks import check_against_reference, cu_seqlens_of, lengths_mask
from tests.spies import count_calls

pytestmark = pytest.mark.gpu

fa = pytest.importorskip("fastbert.kernels.flash_attention")
attention_module = importlib.import_module("fastbert.ops.flash_attention")

FACTOR = 3.0


@pytest.fixture
def fixed_config(monkeypatch):
    """One launch configuration instead of autotuning: the shape sweeps below would otherwise compile
    every candidate configuration for every head dim."""
    monkeypatch.setenv("FASTBERT_AUTOTUNE", "0")


@pytest.fixture
def kernel_calls(monkeypatch):
    return count_calls(monkeypatch, fa, ("forward", "backward"))


def _compare(run_kernel, run_reference, inputs):
    return check_against_reference(run_kernel, run_reference, inputs, torch.float32, factor=FACTOR, min_scale=1.0)


def _assert_same_up_to_rounding(got, want):
    """Two kernel runs that may tile differently (autotuned per layout): equal up to a couple of bf16
    roundings of the largest value."""
    scale = want.float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * 2**-8, atol=2 * 2**-8 * scale)


def _lengths_mask(lengths, seqlen):
    return lengths_mask(lengths, seqlen, "cuda")


def _cu_seqlens(lengths):
    return cu_seqlens_of(lengths, "cuda")


def test_bf16_bert_base_random_lengths_vs_fp32_reference(kernel_calls):
    batch, seqlen, heads, head_dim = 32, 512, 12, 64
    lengths = torch.randint(1, seqlen + 1, (batch,))
    lengths[0], lengths[1] = seqlen, 1
    mask = _lengths_mask(lengths, seqlen)
    inputs = [torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
              for _ in range(3)]
    out, grads, grad_out = _compare(lambda q, k, v: ops.attention(q, k, v, mask),
                                    lambda q, k, v: ops.attention_reference(q, k, v, mask), inputs)
    assert kernel_calls == {"forward": 1, "backward": 1}

    # Deterministic backward: the same inputs give bit-identical gradients.
    with backend.use("triton"):
        again = torch.autograd.grad(ops.attention(*inputs, mask), inputs, grad_out)
    for a, b in zip(grads, again):
        assert torch.equal(a, b)

    # The unpadded layout gives the same numbers on real tokens.
    flat = [ops.unpad_input(x.detach(), mask)[0].requires_grad_() for x in inputs]
    _, _, cu_seqlens, max_seqlen = ops.unpad_input(inputs[0].detach(), mask)
    with backend.use("triton"):
        varlen = ops.attention_varlen(*flat, cu_seqlens, max_seqlen)
    varlen_grads = torch.autograd.grad(varlen, flat, ops.unpad_input(grad_out * mask[..., None, None], mask)[0])
    _assert_same_up_to_rounding(varlen, out[mask])
    with backend.use("triton"):
        masked_grads = torch.autograd.grad(ops.attention(*inputs, mask), inputs, grad_out * mask[..., None, None])
    for got, want in zip(varlen_grads, masked_grads):
        _assert_same_up_to_rounding(got, want[mask])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 40, 96, 128])
def test_head_dims_and_odd_lengths(dtype, head_dim, fixed_config):
    lengths = [1025, 97, 7, 1, 0]
    mask = _lengths_mask(lengths, 1025)
    inputs = [torch.randn(len(lengths), 1025, 2, head_dim, device="cuda", dtype=dtype, requires_grad=True)
              for _ in range(3)]
    _compare(lambda q, k, v: ops.attention(q, k, v, mask), lambda q, k, v: ops.attention_reference(q, k, v, mask),
             inputs)


@pytest.mark.parametrize("head_dim", [24, 40, 72, 128])
def test_fp32_runs_its_own_tiles_at_full_precision(head_dim):
    """fp32 keeps ieee dots (no tf32) on its own spill-free tiles (flash_attention._FP32_*): within a few
    fp32 roundings of float64 on real hardware; the dropout variant runs and stays finite."""
    lengths = [300, 97, 1, 0]
    mask = _lengths_mask(lengths, 300)
    inputs = [torch.randn(len(lengths), 300, 2, head_dim, device="cuda", requires_grad=True) for _ in range(3)]
    check_against_reference(lambda q, k, v: ops.attention(q, k, v, mask),
                            lambda q, k, v: ops.attention_reference(q, k, v, mask), inputs, torch.float64,
                            factor=FACTOR, slack_ulps=16, min_scale=1.0)
    with backend.use("triton"):
        torch.manual_seed(3)
        out = ops.attention(*inputs, mask, dropout_p=0.1)
    assert torch.isfinite(out).all() and torch.isfinite(torch.autograd.grad(out.sum(), inputs)[0]).all()


@pytest.mark.parametrize("head_dim", [32, 72])
def test_varlen_odd_lengths(head_dim, fixed_config):
    lengths = [1025, 97, 0, 7, 1]
    cu_seqlens = _cu_seqlens(lengths)
    inputs = [torch.randn(sum(lengths), 3, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
              for _ in range(3)]
    _compare(lambda q, k, v: ops.attention_varlen(q, k, v, cu_seqlens, max(lengths)),
             lambda q, k, v: ops.attention_varlen_reference(q, k, v, cu_seqlens, max(lengths)), inputs)


def test_auto_backend_uses_the_kernel_on_cuda_and_falls_back_for_unsupported_head_dims(kernel_calls, fixed_config):
    q = torch.randn(2, 33, 2, 64, device="cuda", dtype=torch.float16)
    with backend.use("auto"):
        ops.attention(q, q, q)
        assert kernel_calls["forward"] == 1
        odd = torch.randn(2, 33, 2, 20, device="cuda", dtype=torch.float16)
        torch.testing.assert_close(ops.attention(odd, odd, odd), ops.attention_reference(odd, odd, odd))
        assert kernel_calls["forward"] == 1
        assert attention_module.varlen_preferred(q.flatten(2), 64)
        assert not attention_module.varlen_preferred(q.flatten(2), 20)


def test_dropout_keep_rate_and_reproducibility(fixed_config):
    batch, seqlen, heads, dropout_p = 4, 128, 4, 0.1
    zeros = torch.zeros(batch, seqlen, heads, 128, device="cuda", dtype=torch.bfloat16)
    identity = torch.eye(seqlen, 128, device="cuda", dtype=torch.bfloat16)[None, :, None, :].expand_as(zeros)
    with backend.use("triton"):
        torch.manual_seed(0)
        out = ops.attention(zeros, zeros, identity.contiguous(), dropout_p=dropout_p)
        torch.manual_seed(0)
        again = ops.attention(zeros, zeros, identity.contiguous(), dropout_p=dropout_p)
    keep_rate = (out[..., :seqlen] > 0).float().mean().item()
    assert abs(keep_rate - (1 - dropout_p)) <= 0.02
    assert abs(out[..., :seqlen].float().sum(-1).mean().item() - 1.0) <= 0.02 / (1 - dropout_p)
    assert torch.equal(out, again)


def test_unpadded_encoder_on_cuda_matches_torch(fixed_config):
    config = fastbert.BertConfig(vocab_size=97, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=256, max_position_embeddings=128, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    model = fastbert.BertModel(config).cuda().eval()
    lengths = torch.tensor([100, 37, 1])
    mask = (torch.arange(100)[None, :] < lengths[:, None]).long().cuda()
    input_ids = torch.randint(1, 97, (3, 100), device="cuda") * mask
    with torch.no_grad():
        with backend.use("auto"):  # attention on Triton (unpadded); LayerNorm/GELU take their references
            got = model(input_ids, attention_mask=mask).last_hidden_state
        with backend.use("torch"):
            want = model(input_ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)
    assert torch.all(got[~real] == 0)
