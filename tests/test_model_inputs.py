"""Bad input gets a clear error; gradients reach every parameter; outputs behave like HF's."""
import pytest
import torch

import fastbert
from fastbert._validation import DtypeError

CONFIG = fastbert.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=40, max_position_embeddings=16)


@pytest.fixture(scope="module")
def model():
    return fastbert.BertForPreTraining(CONFIG).eval()


def batch(b=2, l=8):
    return torch.randint(1, 50, (b, l)), torch.ones(b, l, dtype=torch.long)


@pytest.mark.parametrize("make, error, message", [
    (lambda: dict(input_ids=torch.randint(0, 50, (2, 17))), ValueError, "max_position_embeddings"),
    (lambda: dict(input_ids=torch.tensor([[1, 2, 50]])), ValueError, r"vocab_size=50"),
    (lambda: dict(input_ids=torch.tensor([[1, -1, 3]])), ValueError, "input_ids must be in"),
    (lambda: dict(input_ids=torch.rand(2, 8)), DtypeError, "int64"),
    (lambda: dict(input_ids=torch.randint(0, 50, (8,))), ValueError, "2-D"),
    (lambda: dict(input_ids=torch.randint(0, 50, (2, 0))), ValueError, "empty"),
    (lambda: dict(input_ids=torch.randint(0, 50, (2, 8)), attention_mask=torch.ones(2, 7)), ValueError,
     "attention_mask has shape"),
    (lambda: dict(input_ids=torch.randint(0, 50, (2, 8)), token_type_ids=torch.zeros(3, 8, dtype=torch.long)),
     ValueError, "token_type_ids has shape"),
    (lambda: dict(input_ids=torch.randint(0, 50, (2, 8)), token_type_ids=torch.full((2, 8), 2)), ValueError,
     "type_vocab_size"),
    (lambda: dict(input_ids=torch.randint(0, 50, (2, 8)), attention_mask=torch.full((2, 8), 2)), ValueError,
     "0 or 1"),
    (lambda: dict(input_ids=[[1, 2, 3]]), TypeError, "torch.Tensor"),
    (lambda: dict(input_ids=torch.randint(0, 50, (2, 8)), labels=torch.full((2, 8), 50)), ValueError,
     "labels must be in"),
    (lambda: dict(input_ids=torch.randint(0, 50, (2, 8)), labels=torch.full((2, 7), -100)), ValueError,
     "labels must have shape"),
    (lambda: dict(input_ids=torch.randint(0, 50, (2, 8)), next_sentence_label=torch.tensor([0, 2])), ValueError,
     "next_sentence_label must be in"),
])
def test_bad_inputs_raise_clear_errors(model, make, error, message):
    with pytest.raises(error, match=message):
        model(**make())


def test_dtype_error_is_both_type_and_value_error():
    with pytest.raises(ValueError):
        fastbert.BertModel(CONFIG)(torch.rand(2, 8))
    with pytest.raises(TypeError):
        fastbert.BertModel(CONFIG)(torch.rand(2, 8))


def test_int32_ids_and_float_or_bool_masks_agree(model):
    ids, mask = batch()
    mask[1, 5:] = 0
    with torch.no_grad():
        ref = model.bert(ids, mask).last_hidden_state
        for m in (mask.bool(), mask.int()):
            assert torch.equal(model.bert(ids.int(), m).last_hidden_state, ref)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = fastbert.BertForPreTraining(CONFIG).train()
    ids, mask = batch(3, 10)
    mask[2, 6:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 1::3] = ids[:, 1::3]
    out = model(ids, mask, torch.zeros_like(ids), labels=labels, next_sentence_label=torch.tensor([0, 1, 0]))
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if "token_type_embeddings" not in name:  # only type 0 is used; its row gets a gradient
            assert p.grad.abs().sum() > 0, name
    assert model.bert.embeddings.token_type_embeddings.weight.grad[0].abs().sum() > 0


def test_no_masked_token_gives_zero_mlm_loss_not_nan(model):
    ids, mask = batch()
    labels = torch.full_like(ids, -100)
    out = model(ids, mask, labels=labels)  # the fused loss
    assert out.mlm_loss.item() == 0.0 and out.prediction_logits is None
    assert out.mlm_num_correct.item() == 0 and out.mlm_num_targets.item() == 0
    out = model(ids, mask, labels=labels, return_logits=True)
    assert out.mlm_loss.item() == 0.0 and out.prediction_logits.shape == (0, CONFIG.vocab_size)
    with pytest.raises(TypeError, match="return_logits must be True or False"):
        model(ids, mask, labels=labels, return_logits="yes")


def test_fully_padded_sequence_gives_finite_outputs(model):
    ids, mask = batch()
    mask[1] = 0
    with torch.no_grad():
        out = model(ids, mask)
    assert torch.isfinite(out.prediction_logits).all() and torch.isfinite(out.seq_relationship_logits).all()


def test_dropout_active_only_in_training():
    config = CONFIG.replace(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    model = fastbert.BertModel(config)
    ids, mask = batch()
    model.train()
    a, b = model(ids, mask).last_hidden_state, model(ids, mask).last_hidden_state
    assert not torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, mask).last_hidden_state, model(ids, mask).last_hidden_state)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = fastbert.BertModel(CONFIG).train()
    ids, mask = batch()
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.encoder.gradient_checkpointing = flag
        torch.manual_seed(1)  # same dropout masks in both runs; checkpointing must replay them
        out = model(ids, mask)
        (out.last_hidden_state.square().sum() + out.pooler_output.sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1)


def test_output_tuple_behaviour(model):
    ids, mask = batch()
    with torch.no_grad():
        out = model(ids, mask)
    assert out[0] is out.prediction_logits and out[1] is out.seq_relationship_logits
    assert out["prediction_logits"] is out.prediction_logits and len(out) == 2
    assert out.keys() == ["prediction_logits", "seq_relationship_logits"]
    with pytest.raises(KeyError):
        out["nope"]


def test_config_type_checked():
    with pytest.raises(TypeError, match="BertConfig"):
        fastbert.BertModel({"hidden_size": 32})
