"""`fastbert prepare` on hostile corpora and folders: damaged .gz files, huge words, output folders inside
the corpus, literal special tokens in text, two prepares on one folder."""
import gzip
import multiprocessing

import numpy as np
import pytest

from fastbert.data import Corpus, load_prepared, prepare_corpus
from fastbert.data.tokenizer import train_wordpiece
from fastbert._folder_lock import FolderLock, FolderLockedError
from tests.test_data_prepare import random_documents, stored_documents, write_bert_format


def test_damaged_gzip_files_are_errors_naming_the_file(tmp_path):
    lines = "\n".join(f"sentence number {k} of the corpus." for k in range(2000)).encode()
    whole = gzip.compress(lines)
    truncated, corrupted = tmp_path / "truncated.txt.gz", tmp_path / "corrupted.txt.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    damaged = bytearray(whole)
    damaged[len(damaged) // 2] ^= 0xFF
    corrupted.write_bytes(bytes(damaged))
    for path in (truncated, corrupted):
        with pytest.raises(ValueError, match=f"{path}: truncated or corrupted gzip file"):
            list(Corpus(path).documents())


def test_huge_words_never_reach_the_trainer_and_leave_the_vocabulary_alone(monkeypatch):
    """The trainer's time grows with the square of a word's length (a 2 MB word took minutes): words over
    WordPiece's 100 characters (which encode as [UNK] anyway) must not reach it."""
    from tokenizers import BertWordPieceTokenizer

    base = [sentence for document in random_documents(0, 60) for sentence in document]
    clean = train_wordpiece(base, vocab_size=200)
    longest = []
    train = BertWordPieceTokenizer.train_from_iterator

    def recording(self, iterator, *args, **kwargs):
        sentences = list(iterator)
        longest.append(max(len(word) for sentence in sentences for word in sentence.split()))
        return train(self, sentences, *args, **kwargs)

    monkeypatch.setattr(BertWordPieceTokenizer, "train_from_iterator", recording)
    word = "".join(np.random.default_rng(0).choice(list("abcdefghij"), 300_000))
    trained = train_wordpiece(base + [f"a {word} b", word, "x" * 101], vocab_size=200)
    assert trained.vocab_tokens() == clean.vocab_tokens()  # words that encode as [UNK] teach nothing
    train_wordpiece(base + ["y" * 100 + " z"], vocab_size=200)
    assert longest == [max(len(w) for s in base for w in s.split()), 100]  # exactly the limit is kept


def test_an_output_folder_inside_the_corpus_folder_is_not_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_bert_format(corpus / "a.txt", random_documents(1, 30))
    first = prepare_corpus(corpus, corpus / "data", vocab_size=120)
    again = prepare_corpus(corpus, corpus / "data", vocab_size=120)
    assert again.reused and again.fingerprint == first.fingerprint
    model = corpus / "models" / "finetuned"  # a saved model with its tokenizer
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "vocab.txt").write_text("[PAD]\nhello\n")
    (corpus / "run").mkdir()
    (corpus / "run" / "run_config.json").write_text("{}")
    (corpus / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    assert [d for d in Corpus(corpus).documents()] == [d for d in Corpus(corpus / "a.txt").documents()]
    assert prepare_corpus(corpus, corpus / "data", vocab_size=120).reused
    assert stored_documents(load_prepared(corpus / "data")) == stored_documents(first)


def test_literal_special_tokens_in_text_are_text(tmp_path):
    path = tmp_path / "corpus.txt"
    documents = random_documents(2, 20)
    documents[0][0] = "the [MASK] and [CLS] [SEP] [PAD] [UNK] word"
    write_bert_format(path, documents)
    data = prepare_corpus(path, tmp_path / "data", vocab_size=150)
    first_sentence = data.token_store().document(0)[0].tolist()
    assert not set(data.special_token_ids) & set(first_sentence)
    tokenizer = data.load_tokenizer()
    spelled = tokenizer.tokenizer.decode(first_sentence).replace(" ", "").replace("##", "")
    assert spelled == documents[0][0].lower().replace(" ", "")
    # the saved tokenizer still matches special tokens in text, as transformers' fill-mask needs
    assert data.mask_id in tokenizer.tokenizer.encode("the [MASK] word", add_special_tokens=False).ids


def _hold_lock(folder, ready, release):
    with FolderLock(folder):
        ready.set()
        release.wait(30)


def test_two_prepares_on_one_folder_the_second_stops_naming_the_first(tmp_path):
    path = tmp_path / "corpus.txt"
    write_bert_format(path, random_documents(3, 10))
    out = tmp_path / "data"
    out.mkdir()
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(out, ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(FolderLockedError, match=f"in use by another run \\(pid {holder.pid} "):
            prepare_corpus(path, out, vocab_size=100)
        assert not (out / "metadata.json").exists()
    finally:
        release.set()
        holder.join(30)
    prepare_corpus(path, out, vocab_size=100)  # the lock went with its process
    assert prepare_corpus(path, out, vocab_size=100).reused


def _prepared(tmp_path):
    path = tmp_path / "corpus.txt"
    write_bert_format(path, random_documents(4, 30))
    return prepare_corpus(path, tmp_path / "data", vocab_size=120).data_dir


def test_a_tampered_data_folder_is_refused_naming_the_file(tmp_path):
    import json
    import shutil

    data = _prepared(tmp_path)
    load_prepared(data)  # intact: loads

    edited = tmp_path / "edited"
    shutil.copytree(data, edited)
    metadata = json.loads((edited / "metadata.json").read_text())
    metadata["num_documents"] *= 10
    (edited / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="num_documents .* is not the sum over its shards"):
        load_prepared(edited)

    swapped = tmp_path / "swapped"
    shutil.copytree(data, swapped)
    vocab = (swapped / "vocab.txt").read_text().splitlines()
    vocab[-1], vocab[-2] = vocab[-2], vocab[-1]  # same size, other ids
    (swapped / "vocab.txt").write_text("\n".join(vocab) + "\n")
    with pytest.raises(ValueError, match=f"{swapped / 'vocab.txt'} is not the vocabulary"):
        load_prepared(swapped)

    truncated = tmp_path / "truncated"
    shutil.copytree(data, truncated)
    shard = next(truncated.glob("*.tokens.npy"))
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(ValueError, match=f"{shard} is truncated or damaged"):
        load_prepared(truncated)
