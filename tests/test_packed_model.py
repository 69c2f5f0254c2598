"""Packed rows (several sequences per row) give each sequence exactly what it gets alone in a padded batch."""
import pytest
import torch

import fastbert
from fastbert.data import MLMCollator

CONFIG = fastbert.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=48, max_position_embeddings=32, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0)
PAD, CLS, SEP, MASK = 0, 1, 2, 3


def examples():
    g = torch.Generator().manual_seed(0)
    out = []
    for length in (9, 3, 14, 6, 5, 11):
        ids = torch.randint(4, 64, (length,), generator=g)
        ids[0], ids[-1] = CLS, SEP
        types = (torch.arange(length) >= length // 2).long()
        out.append({"input_ids": ids.tolist(), "token_type_ids": types.tolist(),
                    "next_sentence_label": int(length % 2)})
    return out


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_packed_equals_padded(backend_name):
    torch.manual_seed(0)
    model = fastbert.BertForPreTraining(CONFIG).eval()
    common = dict(vocab_size=64, mask_token_id=MASK, pad_token_id=PAD, special_token_ids=(CLS, SEP), max_len=16,
                  mlm_probability=0.0)  # no masking: the ids must match across layouts
    packed = MLMCollator(packing=True, **common)(examples(), seed=5)
    padded = MLMCollator(return_unpad_metadata=False, **common)(examples(), seed=5)
    assert packed["input_ids"].shape[0] < len(examples())  # really packed several per row
    with fastbert.backend.use(backend_name), torch.no_grad():
        p = model.bert(packed["input_ids"], packed["attention_mask"], packed["token_type_ids"],
                       packed["position_ids"], cu_seqlens=packed["cu_seqlens"], max_seqlen=packed["max_seqlen"],
                       indices=packed["indices"])
        q = model.bert(padded["input_ids"], padded["attention_mask"], padded["token_type_ids"])
    # packed sequences come back in packing order; match them to the padded rows by their tokens
    cu = packed["cu_seqlens"].tolist()
    flat_hidden = p.last_hidden_state.reshape(-1, CONFIG.hidden_size)[packed["indices"]]
    flat_ids = packed["input_ids"].reshape(-1)[packed["indices"]]
    matched = 0
    for s in range(len(cu) - 1):
        ids = flat_ids[cu[s]:cu[s + 1]]
        for row in range(padded["input_ids"].shape[0]):
            n = int(padded["attention_mask"][row].sum())
            if n == len(ids) and torch.equal(padded["input_ids"][row, :n], ids):
                torch.testing.assert_close(flat_hidden[cu[s]:cu[s + 1]], q.last_hidden_state[row, :n],
                                           atol=2e-5, rtol=1e-4)
                torch.testing.assert_close(p.pooler_output[s], q.pooler_output[row], atol=2e-5, rtol=1e-4)
                matched += 1
    assert matched == len(examples())


def test_packed_pretraining_loss_uses_every_sequence():
    torch.manual_seed(0)
    model = fastbert.BertForPreTraining(CONFIG).train()
    collate = MLMCollator(vocab_size=64, mask_token_id=MASK, pad_token_id=PAD, special_token_ids=(CLS, SEP),
                          max_len=16, packing=True)
    batch = collate(examples(), seed=1)
    out = model(**{k: v for k, v in batch.items()})
    assert out.seq_relationship_logits.shape == (len(examples()), 2)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="next_sentence_label must have shape"):
        model(**{**batch, "next_sentence_label": batch["next_sentence_label"][:-1]})
    with pytest.raises(ValueError, match="needs indices and max_seqlen"):
        model(batch["input_ids"], batch["attention_mask"], cu_seqlens=batch["cu_seqlens"])


def test_masked_positions_from_the_collator_give_the_same_loss_without_a_search():
    torch.manual_seed(0)
    model = fastbert.BertForPreTraining(CONFIG).eval()
    collate = MLMCollator(vocab_size=64, mask_token_id=MASK, pad_token_id=PAD, special_token_ids=(CLS, SEP),
                          max_len=16, mlm_probability=0.3)
    batch = collate(examples(), seed=2)
    positions = batch.pop("masked_positions")
    assert torch.equal(positions, torch.nonzero(batch["labels"].view(-1) != -100).flatten())
    with torch.no_grad():
        a = model(**batch)
        b = model(**batch, masked_positions=positions)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.mlm_num_correct, b.mlm_num_correct)
    with pytest.raises(ValueError, match="masked_positions must be the row-major"):
        model(**batch, masked_positions=positions[1:])
