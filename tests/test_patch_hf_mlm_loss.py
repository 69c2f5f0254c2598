"""patch_hf(model, fused_mlm_loss=True) on transformers' MLM heads: transformers' loss and gradients by
fastbert.ops.mlm_loss on the labelled rows only, logits=None under labels, exact logits without them."""
import copy
import warnings

import pytest
import torch

import fastbert
from fastbert import hf
from fastbert.hf.mlm_loss import FusedMlmDecoder, decoder_of
from tests.spies import count_calls
from tests.threads import call_in_threads
from tests.test_patch_hf_clients import batch, close, make, roberta_ids

transformers = pytest.importorskip("transformers")

HEADS = [  # (class, config class, extra config)
    ("BertForMaskedLM", "BertConfig", {}),
    ("BertForPreTraining", "BertConfig", {}),
    ("RobertaForMaskedLM", "RobertaConfig", {}),
    ("XLMRobertaForMaskedLM", "XLMRobertaConfig", {}),
    ("CamembertForMaskedLM", "CamembertConfig", {}),
    ("ElectraForMaskedLM", "ElectraConfig", dict(embedding_size=48)),
]
PATCHES = {  # the fused loss alone, and with every fused layer (the encoder unpadded)
    "loss_only": dict(attention=False, layer_norm=False, gelu=False, fused_mlm_loss=True),
    "all_unpadded": dict(unpad=True, fused_mlm_loss=True),
}


def head_and_inputs(cls_name, config_cls, extra, seed=0):
    model = make(cls_name, config_cls=config_cls, max_position_embeddings=30, pad_token_id=1, **extra)
    ids, mask = batch(seed=seed, lengths=(19, 1, 11, 7), seqlen=19)
    ids = roberta_ids(ids, mask)
    g = torch.Generator().manual_seed(seed + 1)
    chosen = (torch.rand(ids.shape, generator=g) < 0.3) & mask.bool()
    chosen[0, 0] = True  # at least one target
    inputs = dict(input_ids=ids, attention_mask=mask, labels=torch.where(chosen, ids, -100))
    if cls_name == "BertForPreTraining":
        inputs["next_sentence_label"] = torch.tensor([0, 1, 1, 0])
    return model, inputs


def loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out, {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("patch", list(PATCHES))
@pytest.mark.parametrize("cls_name,config_cls,extra", HEADS)
def test_loss_and_gradients_are_transformers_within_its_own_error(cls_name, config_cls, extra, patch, monkeypatch):
    plain, inputs = head_and_inputs(cls_name, config_cls, extra)
    reference = copy.deepcopy(plain).double()
    patched = copy.deepcopy(plain)
    tensors = {n: p.data_ptr() for n, p in patched.named_parameters()}
    keys = list(patched.state_dict())
    fastbert.patch_hf(patched, **PATCHES[patch])
    assert hf.is_patched(patched)["fused_mlm_loss"] and isinstance(decoder_of(patched)[2], FusedMlmDecoder)
    assert {n: p.data_ptr() for n, p in patched.named_parameters()} == tensors  # no copies, same names
    assert list(patched.state_dict()) == keys
    calls = count_calls(monkeypatch, fastbert.ops, ("mlm_loss",))

    ref, ref_grads = loss_and_grads(reference, inputs)
    hf_out, hf_grads = loss_and_grads(plain, inputs)
    out, grads = loss_and_grads(patched, inputs)
    assert calls["mlm_loss"] == 1
    logits = "prediction_logits" if cls_name == "BertForPreTraining" else "logits"
    assert getattr(out, logits) is None and getattr(hf_out, logits) is not None
    hf_error = (hf_out.loss.double() - ref.loss).abs().item()
    assert (out.loss.double() - ref.loss).abs().item() <= 3 * hf_error + 1e-6, (out.loss, hf_out.loss, ref.loss)
    assert grads.keys() == ref_grads.keys()
    for name, ref_grad in ref_grads.items():
        hf_error = (hf_grads[name] - ref_grad).abs().max().item()
        assert (grads[name] - ref_grad).abs().max().item() <= 3 * hf_error + 1e-6, name


@pytest.mark.parametrize("cls_name,config_cls,extra", [HEADS[0], HEADS[1], HEADS[5]])
def test_calls_without_labels_give_transformers_logits_exactly(cls_name, config_cls, extra):
    plain, inputs = head_and_inputs(cls_name, config_cls, extra)
    patched = fastbert.patch_hf(copy.deepcopy(plain), **PATCHES["loss_only"])
    del inputs["labels"]
    with torch.no_grad():
        a, b = plain(**inputs), patched(**inputs)
    name = "prediction_logits" if cls_name == "BertForPreTraining" else "logits"
    assert torch.equal(getattr(b, name), getattr(a, name))
    if cls_name == "BertForPreTraining":  # only one of the two labels: transformers computes no loss, logits
        inputs["labels"] = torch.zeros_like(inputs["input_ids"])
        del inputs["next_sentence_label"]
        with torch.no_grad():
            out = patched(**inputs)
        assert out.loss is None and torch.equal(out.prediction_logits, a.prediction_logits)


@pytest.mark.parametrize("cls_name,config_cls,extra", [HEADS[0], HEADS[1]])
def test_tuple_outputs_and_positional_labels(cls_name, config_cls, extra):
    plain, inputs = head_and_inputs(cls_name, config_cls, extra)
    patched = fastbert.patch_hf(copy.deepcopy(plain), **PATCHES["loss_only"])
    with torch.no_grad():
        expected = plain(**inputs).loss
        as_tuple = patched(**inputs, return_dict=False)
        assert isinstance(as_tuple, tuple) and close(as_tuple[0], expected)
        patched.config.return_dict = False
        assert isinstance(patched(**inputs), tuple)
        patched.config.return_dict = True
        # transformers' positional order: input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, ...
        names = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")
        positional = [inputs.get(n) for n in names]
        if cls_name == "BertForPreTraining":
            out = patched(*positional, inputs["labels"], inputs["next_sentence_label"])
        else:
            out = patched(*positional, None, None, inputs["labels"])  # encoder_hidden_states, encoder_attention_mask
        assert out.logits is None if cls_name != "BertForPreTraining" else out.prediction_logits is None
        assert close(out.loss, expected)


def test_on_the_triton_backend(triton_dispatch):
    plain, inputs = head_and_inputs("RobertaForMaskedLM", "RobertaConfig", dict(
        hidden_size=32, num_attention_heads=2, intermediate_size=40, num_hidden_layers=1))
    patched = fastbert.patch_hf(copy.deepcopy(plain), **PATCHES["all_unpadded"])
    with fastbert.backend.use("triton"):
        out, grads = loss_and_grads(patched, inputs)
    expected, expected_grads = loss_and_grads(plain, inputs)
    assert out.logits is None and close(out.loss, expected.loss, 1e-4)
    for name, grad in expected_grads.items():
        assert close(grads[name], grad, 1e-4), name
    assert ("mlm_loss", True) in triton_dispatch and all(used for _, used in triton_dispatch), triton_dispatch


def test_no_target_gives_zero_not_nan_and_bad_labels_are_named():
    plain, inputs = head_and_inputs(*HEADS[0])
    patched = fastbert.patch_hf(copy.deepcopy(plain), **PATCHES["loss_only"])
    inputs["labels"] = torch.full_like(inputs["labels"], -100)
    with torch.no_grad():
        assert torch.isnan(plain(**inputs).loss)  # transformers' mean over no target
    out = patched(**inputs)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in patched.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="labels must have shape"):
        patched(input_ids=inputs["input_ids"], labels=inputs["labels"][:, :5])
    with pytest.raises(ValueError, match="targets must be in"):
        patched(input_ids=inputs["input_ids"], labels=torch.full_like(inputs["labels"], 5000))


def test_threads_each_get_their_own_loss():
    plain, _ = head_and_inputs(*HEADS[0])
    patched = fastbert.patch_hf(copy.deepcopy(plain), **PATCHES["loss_only"])
    batches = [head_and_inputs(*HEADS[0], seed=seed)[1] for seed in range(4)]
    with torch.no_grad():
        expected = [plain(**inputs).loss for inputs in batches]

    def loss(k):
        with torch.no_grad():
            return patched(**batches[k]).loss

    results = call_in_threads(loss, len(batches))
    assert len({round(e.item(), 6) for e in expected}) == len(expected)  # the batches' losses differ
    for k, loss in enumerate(expected):
        assert close(results[k], loss)


def test_other_heads_warn_and_resized_heads_stay_fused():
    model = make("BertForSequenceClassification")
    with pytest.warns(UserWarning, match="masked-LM loss left as transformers' own: BertForSequenceClassification"):
        fastbert.patch_hf(model, fused_mlm_loss=True)
    assert not hf.is_patched(model)["fused_mlm_loss"]
    with pytest.raises(TypeError, match="fused_mlm_loss"):
        fastbert.patch_hf(model, fused_mlm_loss="yes")

    plain, inputs = head_and_inputs(*HEADS[0])
    patched = fastbert.patch_hf(copy.deepcopy(plain), **PATCHES["loss_only"])
    vocab = plain.config.vocab_size + 3
    for model in (plain, patched):  # transformers resizes the tied decoder in place: it stays fused
        model.resize_token_embeddings(vocab, mean_resizing=False)
    patched.load_state_dict(plain.state_dict())  # the same new rows
    decoder = decoder_of(patched)[2]
    assert isinstance(decoder, FusedMlmDecoder) and decoder.weight.shape[0] == vocab
    assert decoder.weight is patched.bert.embeddings.word_embeddings.weight
    inputs["labels"][0, 0] = vocab - 1  # a new word as a target
    with torch.no_grad():
        assert patched(**inputs).logits is None and close(patched(**inputs).loss, plain(**inputs).loss)
        del inputs["labels"]
        assert torch.equal(patched(**inputs).logits, plain(**inputs).logits)


def test_patch_hf_classes_and_save_pretrained_round_trip(tmp_path):
    plain, inputs = head_and_inputs(*HEADS[0])
    plain.save_pretrained(tmp_path / "plain")
    hf.patch_hf_classes(fused_mlm_loss=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # other classes are built without a fused-loss warning
            bare = transformers.BertModel(plain.config)
            loaded = transformers.BertForMaskedLM.from_pretrained(tmp_path / "plain")
    finally:
        hf.unpatch_hf_classes()
    assert not hf.is_patched(bare)["fused_mlm_loss"] and hf.is_patched(loaded)["fused_mlm_loss"]
    loaded.eval()
    with torch.no_grad():
        assert close(loaded(**inputs).loss, plain(**inputs).loss)
    loaded.save_pretrained(tmp_path / "patched")
    again = transformers.BertForMaskedLM.from_pretrained(tmp_path / "patched").eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=inputs["input_ids"]).logits, plain(input_ids=inputs["input_ids"]).logits)


def test_torch_compile_gives_the_same_loss():
    plain, inputs = head_and_inputs(*HEADS[0])
    patched = fastbert.patch_hf(copy.deepcopy(plain), **PATCHES["all_unpadded"])
    torch._dynamo.reset()
    compiled = torch.compile(patched, backend="eager")
    out = compiled(**inputs)
    assert out.logits is None
    assert close(out.loss, plain(**inputs).loss)


def test_trainer_with_gradient_checkpointing_and_the_collator_matches(tmp_path):
    pytest.importorskip("accelerate")

    class Rows(torch.utils.data.Dataset):
        def __init__(self):
            ids, mask = batch(seed=3, lengths=(19, 4, 11, 7, 15, 19, 2, 9), seqlen=19)
            self.rows = [{"input_ids": roberta_ids(i, m)[m.bool()].tolist()} for i, m in zip(ids, mask)]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, k):
            return self.rows[k]

    class Tokenizer:  # what DataCollatorForLanguageModeling reads of a tokenizer
        mask_token, mask_token_id, pad_token_id, padding_side = "[MASK]", 4, 1, "right"
        model_input_names = ["input_ids", "attention_mask"]

        def __len__(self):
            return 101

        def pad(self, rows, return_tensors="pt", pad_to_multiple_of=None, **kwargs):
            longest = max(len(r["input_ids"]) for r in rows)
            ids = torch.ones(len(rows), longest, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for k, r in enumerate(rows):
                ids[k, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
                mask[k, :len(r["input_ids"])] = 1
            return transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask})

        def get_special_tokens_mask(self, ids, already_has_special_tokens=True):
            return [0] * len(ids)

        def convert_tokens_to_ids(self, token):
            return 4

    losses = {}
    for name in ("plain", "patched"):
        model = make("BertForMaskedLM", max_position_embeddings=30, pad_token_id=1)
        if name == "patched":
            fastbert.patch_hf(model, unpad=True, fused_mlm_loss=True)
        args = transformers.TrainingArguments(output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=4,
                                              learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                                              gradient_checkpointing=True, save_strategy="no", disable_tqdm=True)
        collator = transformers.DataCollatorForLanguageModeling(Tokenizer(), mlm_probability=0.3, seed=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(), data_collator=collator)
        trainer.train()
        losses[name] = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses["plain"]) == 3
    assert losses["patched"] == pytest.approx(losses["plain"], abs=1e-5), losses
