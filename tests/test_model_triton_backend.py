"""The BERT model with the fused LayerNorm and bias+GELU kernels (Triton backend, under the interpreter on
the CPU) gives the torch backend's outputs and gradients. Attention has no Triton kernel on this branch,
so both runs use its torch reference."""
import pytest
import torch

import fastbert
from fastbert import backend, ops
from tests.spies import count_calls

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


@pytest.fixture
def reference_attention(monkeypatch):
    monkeypatch.setattr(ops, "attention", ops.attention_reference)
    monkeypatch.setattr(ops, "attention_varlen", ops.attention_varlen_reference)


@pytest.fixture
def kernel_launches(monkeypatch):
    """Counts of each launcher call of the two kernel modules."""
    import fastbert.kernels.gelu as gelu_kernels
    import fastbert.kernels.layer_norm as ln_kernels
    import fastbert.kernels.mlm_head as mlm_kernels

    counts = count_calls(monkeypatch, ln_kernels, ("layer_norm_fwd", "layer_norm_bwd"))
    counts = count_calls(monkeypatch, mlm_kernels, ("cross_entropy_rows_",), counts)
    return count_calls(monkeypatch, gelu_kernels, ("bias_gelu_fwd", "bias_gelu_bwd"), counts)


def _tiny_config(dropout: float) -> fastbert.BertConfig:
    # Odd sizes on purpose: hidden 48 and intermediate 80 are not powers of two.
    return fastbert.BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=80, max_position_embeddings=32, hidden_dropout_prob=dropout,
                               attention_probs_dropout_prob=dropout)


def _batch():
    input_ids = torch.randint(1, 97, (3, 11))
    attention_mask = torch.ones(3, 11, dtype=torch.int64)
    attention_mask[1, 7:] = 0
    attention_mask[2, 4:] = 0
    token_type_ids = torch.zeros(3, 11, dtype=torch.int64)
    token_type_ids[:, 5:] = 1
    labels = torch.full((3, 11), -100)
    labels[:, 1:4] = input_ids[:, 1:4]
    return dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, labels=labels,
                next_sentence_label=torch.tensor([0, 1, 0]))


def _run(model, batch, backend_name):
    model.zero_grad(set_to_none=True)
    with backend.use(backend_name):
        out = model(**batch)
        out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_pretraining_step_matches_torch_backend(reference_attention, kernel_launches):
    model = fastbert.BertForPreTraining(_tiny_config(dropout=0.0))
    model.bert.unpad = False
    model.train()
    batch = _batch()
    out_torch, grads_torch = _run(model, batch, "torch")
    assert not any(kernel_launches.values())
    out_triton, grads_triton = _run(model, batch, "triton")
    # embeddings + 2 per layer + MLM head transform; one bias+GELU per layer + the head transform; the
    # fused MLM loss's cross-entropy step once (one chunk; it writes the gradient in the forward)
    assert kernel_launches == {"layer_norm_fwd": 6, "layer_norm_bwd": 6, "bias_gelu_fwd": 3, "bias_gelu_bwd": 3,
                               "cross_entropy_rows_": 1}
    assert out_torch.prediction_logits is None is out_triton.prediction_logits
    for name in ("loss", "mlm_num_correct", "seq_relationship_logits"):
        torch.testing.assert_close(getattr(out_triton, name), getattr(out_torch, name), rtol=1e-4, atol=1e-5)
    assert grads_triton.keys() == grads_torch.keys()
    for name, g in grads_triton.items():
        torch.testing.assert_close(g, grads_torch[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_eval_outputs_match_torch_backend(reference_attention):
    """Default BERT dropout (0.1): in eval mode no dropout runs, so the backends agree."""
    model = fastbert.BertModel(_tiny_config(dropout=0.1)).eval()
    model.unpad = False
    batch = _batch()
    with torch.no_grad():
        with backend.use("torch"):
            expected = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        with backend.use("triton"):
            got = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=1e-4, atol=1e-5)


def test_training_with_dropout_is_reproducible(reference_attention):
    """With dropout on, torch.manual_seed fixes every mask (the kernels' seeds come from torch's generator)."""
    model = fastbert.BertForPreTraining(_tiny_config(dropout=0.1))
    model.bert.unpad = False
    model.train()
    batch = _batch()
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(_run(model, batch, "triton"))
    (out_a, grads_a), (out_b, grads_b), (out_c, _) = runs
    assert torch.isfinite(out_a.loss)
    assert torch.equal(out_a.loss, out_b.loss)
    assert all(torch.equal(grads_a[name], grads_b[name]) for name in grads_a)
    assert not torch.equal(out_a.loss, out_c.loss)
