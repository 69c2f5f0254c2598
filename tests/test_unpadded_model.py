"""The unpadded encoder: with the Triton attention on, BertModel unpads once after the embeddings, runs
every layer on (total_tokens, hidden) with attention_varlen and pads once at the end. It must give
the torch backend's padded numbers on real tokens, forward and backward.

LayerNorm and GELU have no Triton kernels on this branch, so the model calls their torch references
(patched in below); only the attention takes the Triton path, under the interpreter on the CPU.
"""
import pytest
import torch

import fastbert
from fastbert import backend, ops

fa = pytest.importorskip("fastbert.kernels.flash_attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEQLEN = 30
LENGTHS = [30, 17, 5]


@pytest.fixture(autouse=True)
def reference_layer_norm_and_gelu(monkeypatch):
    monkeypatch.setattr(ops, "dropout_add_layer_norm", ops.dropout_add_layer_norm_reference)
    monkeypatch.setattr(ops, "bias_gelu", ops.bias_gelu_reference)


@pytest.fixture
def attention_launches(monkeypatch):
    """Records the layout of every Triton attention forward launch ("varlen" or "padded")."""
    layouts = []
    original = fa.forward

    def recording(*args, **kwargs):
        layouts.append("varlen" if kwargs.get("cu_seqlens") is not None else "padded")
        return original(*args, **kwargs)

    monkeypatch.setattr(fa, "forward", recording)
    return layouts


def _config(**overrides):
    fields = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                  max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    fields.update(overrides)
    return fastbert.BertConfig(**fields)


def _batch():
    mask = (torch.arange(SEQLEN)[None, :] < torch.tensor(LENGTHS)[:, None]).long().to(DEVICE)
    input_ids = torch.randint(1, 97, (len(LENGTHS), SEQLEN), device=DEVICE) * mask
    token_type_ids = (torch.arange(SEQLEN, device=DEVICE)[None, :] >= 8).long().expand_as(mask) * mask
    return input_ids, mask, token_type_ids


def _run(model, backend_name, input_ids, mask, token_type_ids):
    """Outputs and parameter gradients of a loss that reads real tokens only (as a training loss does)."""
    model.zero_grad()
    with backend.use(backend_name):
        out = model(input_ids, attention_mask=mask, token_type_ids=token_type_ids)
    weights = torch.linspace(-1, 1, out.last_hidden_state.shape[-1], device=DEVICE)
    loss = (out.last_hidden_state * mask[..., None] * weights).square().sum() + out.pooler_output.sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("unpad", [None, False])
def test_triton_encoder_equals_torch_padded_encoder(unpad, attention_launches):
    """unpad=None: BertModel chooses the unpadded path itself (varlen kernel); unpad=False: padded kernel."""
    model = fastbert.BertModel(_config()).to(DEVICE)
    model.unpad = unpad
    batch = _batch()
    mask = batch[1].bool()

    expected, expected_grads = _run(model, "torch", *batch)
    assert attention_launches == []
    got, got_grads = _run(model, "triton", *batch)
    assert attention_launches == ["varlen" if unpad is None else "padded"] * 2  # one per layer

    torch.testing.assert_close(got.last_hidden_state[mask], expected.last_hidden_state[mask], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=1e-4, atol=1e-5)
    if unpad is None:
        assert torch.all(got.last_hidden_state[~mask] == 0)  # padded once at the end, zeros at padding
    assert got_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_pretraining_with_attention_dropout_runs_unpadded_and_is_reproducible(attention_launches):
    model = fastbert.BertForPreTraining(_config(attention_probs_dropout_prob=0.1, hidden_dropout_prob=0.1)).to(DEVICE)
    model.train()
    input_ids, mask, token_type_ids = _batch()
    labels = torch.where((torch.rand(input_ids.shape, device=DEVICE) < 0.3) & (mask == 1), input_ids, -100)
    next_sentence_label = torch.tensor([0, 1, 0], device=DEVICE)

    def step(seed):
        model.zero_grad()
        torch.manual_seed(seed)
        with backend.use("triton"):
            out = model(input_ids, attention_mask=mask, token_type_ids=token_type_ids, labels=labels,
                        next_sentence_label=next_sentence_label)
        out.loss.backward()
        return out.loss.detach(), model.bert.encoder.layer[0].attention.self.query.weight.grad.clone()

    loss, grad = step(4)
    loss_again, grad_again = step(4)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.equal(loss, loss_again) and torch.equal(grad, grad_again)
    assert set(attention_launches) == {"varlen"}


def test_no_attention_mask_stays_padded_without_a_mask(attention_launches):
    model = fastbert.BertModel(_config()).to(DEVICE).eval()
    input_ids, _, token_type_ids = _batch()
    with torch.no_grad():
        with backend.use("triton"):
            got = model(input_ids, token_type_ids=token_type_ids).last_hidden_state
        with backend.use("torch"):
            expected = model(input_ids, token_type_ids=token_type_ids).last_hidden_state
    assert attention_launches == ["padded"] * 2
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
