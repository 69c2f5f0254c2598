"""BERT sentence pairs and the pre-training sampler: layout, statistics, determinism, splits, ranks.

The corpus is synthetic so that every token tells where it came from: document d, sentence s is the
word ``d{d}s{s}`` repeated 3..12 times, and the vocabulary (BERT's layout: [PAD]=0, [UNK]=100,
[CLS]=101, [SEP]=102, [MASK]=103) holds exactly those words.
"""
import math
import pickle

import numpy as np
import pytest
import torch

from fastbert.data import BertPairDataset, PretrainSampler, prepare_corpus
from fastbert.data.pairs import eval_documents

NUM_DOCUMENTS = 60
SENTENCES_PER_DOCUMENT = 40
MAX_SEQ_LEN = 16


def bert_layout_vocab(words):
    return ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(words)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(prepared data, token id -> (document, sentence))"""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(123)
    words, lines = [], []
    for d in range(NUM_DOCUMENTS):
        for s in range(SENTENCES_PER_DOCUMENT):
            word = f"d{d}s{s}"
            words.append(word)
            lines.append(" ".join([word] * int(rng.integers(3, 13))))
        lines.append("")
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    vocab = bert_layout_vocab(words)
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    data = prepare_corpus(root / "corpus.txt", root / "data", tokenizer=root / "vocab.txt")
    origin = {}
    for index, token in enumerate(vocab):
        if token.startswith("d"):
            d, s = token[1:].split("s")
            origin[index] = (int(d), int(s))
    return data, origin


def segments(example, data):
    ids = example["input_ids"]
    seps = np.flatnonzero(ids == data.sep_id)
    assert len(seps) == 2
    return ids[1:seps[0]], ids[seps[0] + 1:seps[1]]


def test_layout_cls_sep_segment_ids_and_lengths(corpus):
    data, origin = corpus
    assert data.special_token_ids == (0, 100, 101, 102, 103)
    dataset = BertPairDataset(data, MAX_SEQ_LEN)
    for i in range(len(dataset)):
        example = dataset[i]
        ids, types = example["input_ids"], example["token_type_ids"]
        assert ids.dtype == np.int64 and types.dtype == np.int64 and ids.ndim == 1 and ids.shape == types.shape
        assert 5 <= len(ids) <= MAX_SEQ_LEN
        assert ids[0] == data.cls_id and ids[-1] == data.sep_id
        assert np.count_nonzero(ids == data.cls_id) == 1
        a, b = segments(example, data)
        assert len(a) >= 1 and len(b) >= 1
        assert all(int(token) in origin for token in np.concatenate([a, b]))  # no [PAD], [UNK], [MASK]
        expected_types = np.concatenate([np.zeros(len(a) + 2), np.ones(len(b) + 1)])
        np.testing.assert_array_equal(types, expected_types)
        assert example["next_sentence_label"] in (0, 1)


def test_actual_next_follows_and_random_next_comes_from_another_document(corpus):
    data, origin = corpus
    # Full targets only: an example then falls short of max_seq_len only when nothing was cut from it.
    dataset = BertPairDataset(data, MAX_SEQ_LEN, short_seq_prob=0.0)
    untruncated_followers = 0
    for i in range(len(dataset)):
        example = dataset[i]
        a, b = ([origin[int(t)] for t in segment] for segment in segments(example, data))
        # each segment reads its document in order
        assert a == sorted(a) and b == sorted(b) and len({d for d, _ in a}) == 1 and len({d for d, _ in b}) == 1
        if example["next_sentence_label"] == 0:
            assert a[0][0] == b[0][0] and a[-1][1] < b[0][1]
            if len(example["input_ids"]) < MAX_SEQ_LEN:  # B starts with the very next sentence
                assert b[0][1] == a[-1][1] + 1
                untruncated_followers += 1
        else:
            assert a[0][0] != b[0][0]
    assert untruncated_followers > 0


def test_random_next_rate_is_the_requested_probability(corpus):
    data, _ = corpus
    for probability in (0.5, 0.2):
        dataset = BertPairDataset(data, MAX_SEQ_LEN, random_next_prob=probability)
        labels = np.array([dataset[i]["next_sentence_label"] for i in range(len(dataset))])
        bound = 4 * math.sqrt(probability * (1 - probability) / len(labels))
        assert abs(labels.mean() - probability) < bound, (probability, labels.mean(), len(labels))


def test_short_sequence_rate(corpus):
    data, _ = corpus
    # Without the short-sequence rule, only document ends leave an example short of max_seq_len;
    # the rule shortens a further short_seq_prob of the others.
    def short_fraction(probability):
        dataset = BertPairDataset(data, MAX_SEQ_LEN, short_seq_prob=probability)
        return np.mean([len(dataset[i]["input_ids"]) < MAX_SEQ_LEN for i in range(len(dataset))]), len(dataset)

    base, n = short_fraction(0.0)
    assert base < 0.2
    for probability in (0.1, 0.3):
        fraction, _ = short_fraction(probability)
        # a target drawn in [2, max_seq_len - 3] is below the full one with probability (L-5)/(L-4)
        expected = base + (1 - base) * probability * (MAX_SEQ_LEN - 5) / (MAX_SEQ_LEN - 4)
        assert abs(fraction - expected) < 4 * math.sqrt(probability * (1 - probability) / n) + 0.02, \
            (probability, fraction, expected)


def test_length_is_about_tokens_over_max_seq_len(corpus):
    data, _ = corpus
    train = BertPairDataset(data, MAX_SEQ_LEN)
    evaluation = BertPairDataset(data, MAX_SEQ_LEN, split="eval")
    assert train.num_tokens + evaluation.num_tokens == data.num_tokens
    assert len(train) == train.num_tokens // MAX_SEQ_LEN
    with pytest.raises(IndexError):
        train[len(train)]
    with pytest.raises(IndexError):
        train[-1]


def test_examples_depend_only_on_seed_and_index(corpus):
    data, _ = corpus
    first = BertPairDataset(data, MAX_SEQ_LEN, seed=7)
    second = pickle.loads(pickle.dumps(BertPairDataset(data.data_dir, MAX_SEQ_LEN, seed=7)))
    other_seed = BertPairDataset(data, MAX_SEQ_LEN, seed=8)
    order = np.random.default_rng(0).permutation(len(first))  # access order must not matter
    differs = 0
    for i in order[:100].tolist():
        a, b = first[i], second[i]
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["token_type_ids"], b["token_type_ids"])
        assert a["next_sentence_label"] == b["next_sentence_label"]
        differs += not np.array_equal(a["input_ids"], other_seed[i]["input_ids"])
    assert differs > 50


def test_dataloader_workers_give_the_same_examples(corpus):
    data, _ = corpus
    dataset = BertPairDataset(data, MAX_SEQ_LEN)
    indices = list(range(0, len(dataset), 7))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=indices, num_workers=2,
                                         collate_fn=list)
    loaded = [example for batch in loader for example in batch]
    assert len(loaded) == len(indices)
    for i, example in zip(indices, loaded):
        np.testing.assert_array_equal(example["input_ids"], dataset[i]["input_ids"])


def test_eval_documents_are_never_used_for_training(corpus):
    data, origin = corpus
    train = BertPairDataset(data, MAX_SEQ_LEN, eval_fraction=0.1)
    evaluation = BertPairDataset(data, MAX_SEQ_LEN, eval_fraction=0.1, split="eval")
    held_out = set(evaluation.documents.tolist())
    assert len(held_out) == round(0.1 * NUM_DOCUMENTS)
    assert held_out.isdisjoint(train.documents.tolist())
    assert held_out | set(train.documents.tolist()) == set(range(NUM_DOCUMENTS))

    def documents_used(dataset):
        return {origin[int(t)][0] for i in range(len(dataset)) for t in np.concatenate(segments(dataset[i], data))}

    # Every token of every pair (A, B, random next sentences) comes from the split's own documents.
    used_by_train, used_by_eval = documents_used(train), documents_used(evaluation)
    assert used_by_train.isdisjoint(held_out)
    assert used_by_eval <= held_out
    assert len(used_by_eval) >= 2  # eval pairs take their random next from the eval documents
    # the default slice: about 1%, at least one document
    assert BertPairDataset(data, MAX_SEQ_LEN, split="eval").num_documents == 1


def test_eval_documents_are_spread_over_the_corpus():
    # The corpus order follows topics: a held-out tail would test the last topics only.
    held_out = eval_documents(700, 0.05)
    assert len(held_out) == 35 and len(set(held_out.tolist())) == 35
    assert held_out.min() < 20 and held_out.max() > 680
    assert set(np.diff(held_out).tolist()) == {20}
    for num_documents, fraction, expected in ((2, 0.01, 1), (2, 0.99, 1), (3, 0.5, 2), (10, 0.3, 3)):
        chosen = eval_documents(num_documents, fraction)
        assert len(chosen) == expected and len(set(chosen.tolist())) == expected
        assert 0 <= chosen.min() and chosen.max() < num_documents


def test_bad_arguments(corpus, tmp_path):
    data, _ = corpus
    with pytest.raises(ValueError, match="max_seq_len"):
        BertPairDataset(data, 4)
    with pytest.raises(ValueError, match="split"):
        BertPairDataset(data, MAX_SEQ_LEN, split="test")
    with pytest.raises(ValueError, match="short_seq_prob"):
        BertPairDataset(data, MAX_SEQ_LEN, short_seq_prob=1.5)
    with pytest.raises(ValueError, match="eval_fraction"):
        BertPairDataset(data, MAX_SEQ_LEN, eval_fraction=0.0)
    with pytest.raises(ValueError, match="not a prepared data folder"):
        BertPairDataset(tmp_path, MAX_SEQ_LEN)
    (tmp_path / "one.txt").write_text("a single document.\nwith two sentences.\n")
    (tmp_path / "vocab.txt").write_text("\n".join(bert_layout_vocab(["a", "single", "document", "with", "two",
                                                                      "sentences", "."])) + "\n")
    one = prepare_corpus(tmp_path / "one.txt", tmp_path / "data", tokenizer=tmp_path / "vocab.txt")
    with pytest.raises(ValueError, match="at least 2"):
        BertPairDataset(one, MAX_SEQ_LEN)


def take(sampler, count):
    iterator = iter(sampler)
    return [next(iterator) for _ in range(count)]


def test_sampler_epochs_are_permutations_and_ranks_are_disjoint():
    length, world = 50, 3
    stream = take(PretrainSampler(length, seed=5), 2 * length * world)
    for epoch in range(2 * world):
        assert sorted(stream[epoch * length:(epoch + 1) * length]) == list(range(length))
    assert stream[:length] != stream[length:2 * length]  # a fresh order each epoch
    ranks = [take(PretrainSampler(length, seed=5, rank=r, world_size=world), 2 * length) for r in range(world)]
    # rank r takes stream positions r, r + world, ...
    for r in range(world):
        assert ranks[r] == stream[r::world][:2 * length]
    first_epoch = [set(stream[r:length:world]) for r in range(world)]
    assert sum(len(part) for part in first_epoch) == length and set.union(*first_epoch) == set(range(length))
    assert take(PretrainSampler(length, seed=6), length) != stream[:length]


def test_sampler_resumes_exactly():
    length, world = 37, 4  # the epoch does not divide evenly among the ranks
    for rank in range(world):
        full = take(PretrainSampler(length, seed=1, rank=rank, world_size=world), 60)
        for consumed in (0, 1, 9, 10, 33):
            resumed = take(PretrainSampler(length, seed=1, rank=rank, world_size=world, start_index=consumed),
                           60 - consumed)
            assert resumed == full[consumed:]


def test_sampler_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        PretrainSampler(10, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="dataset_len"):
        PretrainSampler(0, seed=0)
    with pytest.raises(ValueError, match="start_index"):
        PretrainSampler(10, seed=0, start_index=-1)
    with pytest.raises(TypeError, match="seed"):
        PretrainSampler(10, seed=None)
