"""torch.compile over the fused ops, a fastbert model and a patched transformers model (CPU, torch backend).

``fullgraph=True`` turns any graph break into an error, so these tests fail if an op stops being
traceable. ``aot_eager`` traces forward and backward with fake tensors (what a custom op's fake
implementation is for) without paying for code generation; one test runs the default inductor backend.
"""
import copy
from pathlib import Path

import pytest
import torch

import fastbert
from fastbert.modeling import AttentionInputs

OPS_DIR = Path(fastbert.ops.__file__).parent
FASTBERT_DIR = Path(fastbert.__file__).parent
CONFIG = dict(vocab_size=101, hidden_size=40, num_hidden_layers=2, num_attention_heads=5, intermediate_size=56,
              max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    with fastbert.backend.use("torch"):
        yield
    torch._dynamo.reset()


def padding_mask(batch=3, seqlen=13):
    lengths = torch.tensor([seqlen, 1, seqlen // 2][:batch])
    return torch.arange(seqlen)[None, :] < lengths[:, None]


def leaves(*shapes):
    return [torch.randn(*s, requires_grad=True) for s in shapes]


def eager_and_compiled(fn, inputs, backend="aot_eager"):
    """Forward and the input gradients of ``fn`` run eagerly and under torch.compile(fullgraph=True)."""
    results = []
    for run in (fn, torch.compile(fn, fullgraph=True, backend=backend)):
        xs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
        out = run(*xs)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)  # a loss that weighs every output differently
        (out * weights).sum().backward()
        results.append((out.detach(), [x.grad for x in xs if x.requires_grad]))
    return results


def assert_close(eager, compiled, tol=1e-5):
    (out_e, grads_e), (out_c, grads_c) = eager, compiled
    assert torch.isfinite(out_c).all()
    assert (out_e - out_c).abs().max() <= tol
    assert len(grads_e) == len(grads_c) and grads_e
    for a, b in zip(grads_e, grads_c):
        assert (a - b).abs().max() <= tol


def breaks_in(explanation, directory: Path) -> list[str]:
    """Graph-break reasons raised from code under ``directory``."""
    found = []
    for reason in explanation.break_reasons:
        for frame in reason.user_stack or []:
            if Path(frame.filename).resolve().is_relative_to(directory.resolve()):
                found.append(f"{frame.filename}:{frame.lineno}: {reason.reason}")
    return found


def test_break_detector_sees_breaks():
    def deliberately_broken(x):
        x = x + 1
        torch._dynamo.graph_break()
        return x * 2

    explanation = torch._dynamo.explain(deliberately_broken)(torch.ones(3))
    assert explanation.graph_break_count == 1
    assert breaks_in(explanation, Path(__file__).parent)


# ---- the ops, one at a time ---------------------------------------------------------------------------
def test_attention_fullgraph():
    q, k, v = leaves((3, 13, 5, 8), (3, 13, 5, 8), (3, 13, 5, 8))
    mask = padding_mask()
    eager, compiled = eager_and_compiled(lambda q, k, v: fastbert.ops.attention(q, k, v, mask), [q, k, v])
    assert_close(eager, compiled)


def test_dropout_add_layer_norm_fullgraph():
    x, residual, weight, bias = leaves((3, 7, 40), (3, 7, 40), (40,), (40,))
    eager, compiled = eager_and_compiled(
        lambda x, r, w, b: fastbert.ops.dropout_add_layer_norm(x, r, w, b, 1e-12, 0.0), [x, residual, weight, bias])
    assert_close(eager, compiled)


def test_bias_gelu_fullgraph():
    x, bias = leaves((3, 7, 56), (56,))
    eager, compiled = eager_and_compiled(fastbert.ops.bias_gelu, [x, bias])
    assert_close(eager, compiled)


def test_dropout_in_compiled_ops_is_live():
    """Under compile, dropout still drops (and the expectation is kept): not traced away as a constant."""
    x, residual, weight, bias = torch.ones(64, 40), torch.zeros(64, 40), torch.ones(40), torch.zeros(40)
    compiled = torch.compile(lambda x: fastbert.ops.dropout_add_layer_norm(x, residual, weight, bias, 1e-12, 0.5),
                             fullgraph=True, backend="aot_eager")
    a, b = compiled(x), compiled(x)
    assert not torch.equal(a, b)


def test_attention_varlen_fullgraph():
    cu_seqlens = torch.tensor([0, 13, 14, 20], dtype=torch.int32)
    q, k, v = leaves((20, 5, 8), (20, 5, 8), (20, 5, 8))
    eager, compiled = eager_and_compiled(
        lambda q, k, v: fastbert.ops.attention_varlen(q, k, v, cu_seqlens, 13), [q, k, v])
    assert_close(eager, compiled)


# ---- a fastbert model ---------------------------------------------------------------------------------
def test_fastbert_encoder_fullgraph():
    """Every fused op of the model (attention, dropout+residual+LN, bias+GELU) in one graph."""
    torch.manual_seed(0)
    model = fastbert.BertModel(fastbert.BertConfig(**CONFIG)).train()  # dropout is 0: train mode, deterministic
    mask = padding_mask()
    (hidden,) = leaves((3, 13, CONFIG["hidden_size"]))
    eager, compiled = eager_and_compiled(lambda h: model.encoder(h, AttentionInputs(key_padding_mask=mask)),
                                         [hidden])
    assert_close(eager, compiled)


@pytest.mark.slow
def test_fastbert_encoder_fullgraph_inductor():
    torch.manual_seed(0)
    model = fastbert.BertModel(fastbert.BertConfig(**CONFIG))
    mask = padding_mask()
    (hidden,) = leaves((3, 13, CONFIG["hidden_size"]))
    eager, compiled = eager_and_compiled(lambda h: model.encoder(h, AttentionInputs(key_padding_mask=mask)),
                                         [hidden], backend="inductor")
    assert_close(eager, compiled, tol=1e-4)


def test_compiled_fastbert_model_matches_and_breaks_only_outside_the_ops():
    torch.manual_seed(0)
    model = fastbert.BertForSequenceClassification(fastbert.BertConfig(**CONFIG, num_labels=3)).eval()
    mask = padding_mask().long()
    ids = torch.randint(5, CONFIG["vocab_size"], mask.shape) * mask
    labels = torch.tensor([0, 2, 1])
    explanation = torch._dynamo.explain(model)(ids, mask)
    # The model's own input checks read token ids on the CPU (a data-dependent branch): a break there is
    # allowed; one inside an op is not.
    assert breaks_in(explanation, OPS_DIR) == []
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    out_c = compiled(ids, mask, labels=labels)
    out_c.loss.backward()
    grads_c = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out_e = model(ids, mask, labels=labels)
    out_e.loss.backward()
    assert (out_c.logits - out_e.logits).abs().max() < 1e-5
    for name, p in model.named_parameters():
        assert (p.grad - grads_c[name]).abs().max() < 1e-5, name


# ---- a patched transformers model ---------------------------------------------------------------------
def test_compiled_patched_hf_model_matches_and_never_breaks_in_fastbert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_model = transformers.BertForSequenceClassification(
        transformers.BertConfig(**CONFIG, type_vocab_size=2, num_labels=3)).eval()
    patched = fastbert.patch_hf(copy.deepcopy(hf_model))
    mask = padding_mask().long()
    ids = torch.randint(5, CONFIG["vocab_size"], mask.shape) * mask
    labels = torch.tensor([0, 2, 1])
    explanation = torch._dynamo.explain(patched)(input_ids=ids, attention_mask=mask)
    assert breaks_in(explanation, FASTBERT_DIR) == []
    torch._dynamo.reset()
    compiled = torch.compile(patched, backend="aot_eager")
    out = compiled(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    reference = hf_model(input_ids=ids, attention_mask=mask, labels=labels)
    reference.loss.backward()
    assert (out.logits - reference.logits).abs().max() < 1e-5
    for (name, p), q in zip(patched.named_parameters(), hf_model.parameters()):
        assert (p.grad - q.grad).abs().max() < 1e-5, name
