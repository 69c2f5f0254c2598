"""`fastbert prepare` is reproducible: the same corpus and settings give the same bytes, whatever the
process (hash seeds) or the tokenizer thread count; and the WordPiece trainer's ties are settled the
documented way."""
import os
import subprocess
import sys

import numpy as np

from fastbert._folder_lock import LOCK_NAME
from fastbert.data import train_wordpiece

from .test_data_prepare import random_documents, write_bert_format


def unicode_documents(seed, count):
    """Documents with many rare characters, so the alphabet cut and the merges meet count ties."""
    rng = np.random.default_rng(seed)
    letters = [chr(c) for c in range(0x3B1, 0x3C9)] + list("abcdefghijklmnopqrstuvwxyz")
    documents = []
    for _ in range(count):
        sentences = []
        for _ in range(int(rng.integers(1, 6))):
            words = ["".join(rng.choice(letters, int(rng.integers(1, 7)))) for _ in range(int(rng.integers(3, 9)))]
            sentences.append(" ".join(words) + ".")
        documents.append(sentences)
    return documents


def prepare_in_subprocess(corpus, out, workers, hash_seed):
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
    env.pop("RAYON_NUM_THREADS", None)
    subprocess.run([sys.executable, "-m", "fastbert", "prepare", "--corpus", str(corpus), "--out", str(out),
                    "--workers", str(workers), "--vocab-size", "160", "--shard-tokens", "2000"],
                   check=True, capture_output=True, env=env, timeout=120)
    # OUT/.lock names the process that held the folder (pid, host, time): not data
    return {path.name: path.read_bytes() for path in sorted(out.iterdir()) if path.name != LOCK_NAME}


def test_two_prepare_processes_with_different_workers_write_the_same_bytes(tmp_path):
    corpus = write_bert_format(tmp_path / "corpus.txt", random_documents(5, 60) + unicode_documents(6, 60))
    first = prepare_in_subprocess(corpus, tmp_path / "one", workers=1, hash_seed=1)
    second = prepare_in_subprocess(corpus, tmp_path / "two", workers=2, hash_seed=2)
    assert {"vocab.txt", "tokenizer.json", "metadata.json", "shard_00001.tokens.npy"} <= set(first)
    assert sorted(first) == sorted(second)
    differing = [name for name in first if first[name] != second[name]]
    assert not differing, f"files that differ between two identical prepare runs: {differing}"


def test_alphabet_cut_keeps_the_most_frequent_characters_ties_by_code_point():
    # counts: x y z twice, v w once; room for four characters → x y z and v (v < w)
    tokenizer = train_wordpiece(["zz yy xx w v"], vocab_size=40, limit_alphabet=4, min_frequency=1)
    tokens = tokenizer.vocab_tokens()
    assert tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tokens[5:9] == ["v", "x", "y", "z"]  # the alphabet, then pieces inside words
    assert "w" not in tokens and tokens[9:12] == ["##x", "##y", "##z"]


def test_trained_vocabulary_has_only_the_five_special_tokens_as_added_tokens():
    sentences = [s for document in unicode_documents(1, 30) for s in document]
    tokenizer = train_wordpiece(sentences, vocab_size=120)
    added = tokenizer.tokenizer.get_added_tokens_decoder()
    assert sorted(token.content for token in added.values()) == sorted(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    # a "##" piece written in the text is text, not a token matched before pre-tokenization
    assert "##a" in tokenizer.tokenizer.get_vocab()
    assert tokenizer.tokenizer.encode("##a", add_special_tokens=False).tokens != ["##a"]
    # the same list, read as a stream or as a callable, gives the same vocabulary
    assert train_wordpiece(iter(sentences), vocab_size=120).vocab_tokens() == tokenizer.vocab_tokens()
    assert train_wordpiece(lambda: iter(sentences), vocab_size=120).vocab_tokens() == tokenizer.vocab_tokens()


def _prepared_bytes(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.name != LOCK_NAME}


def test_worker_processes_write_what_one_process_writes(tmp_path):
    from fastbert.data import Corpus, load_wordpiece, prepare_corpus

    from .test_data_prepare import stored_documents

    # Several sources and kinds (paragraphs to split, .jsonl), many chunks of a few lines each, so every
    # worker gets chunks, results come back out of order and shards end mid-stream.
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_bert_format(folder / "a.txt", random_documents(7, 40) + unicode_documents(8, 40))
    (folder / "b.jsonl").write_text("\n".join(
        '{"text": "%s"}' % " ".join(document) for document in random_documents(9, 30)) + "\n")
    vocab = tmp_path / "vocab"
    prepare_corpus([folder], vocab, vocab_size=200)
    written = {}
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        data = prepare_corpus([folder], out, tokenizer=vocab, workers=workers, batch_lines=7, shard_tokens=1500)
        written[workers] = _prepared_bytes(out)
    assert len(data.shards) > 2
    assert written[1] == written[2] == written[3]
    # ... and it is the definition: each document of the corpus, split and tokenized
    wordpiece = load_wordpiece(vocab)
    expected = [wordpiece.encode_batch(document) for document in Corpus([folder]).documents()]
    assert stored_documents(data) == [[s for s in document if s] for document in expected]


def test_the_vocabulary_sample_is_uniform_fixed_and_bounded(tmp_path):
    from fastbert.data import prepare_corpus
    from fastbert.data.prepare import sample_sentences

    lines = [[f"line {i}."] for i in range(10_000)]
    sample = sample_sentences(lines, 1000)
    numbers = [int(s.split()[1].rstrip(".")) for s in sample]
    assert len(numbers) == 1000 == len(set(numbers)) and numbers == sorted(numbers)  # in corpus order
    assert sample == sample_sentences(lines, 1000)  # the same every time
    assert 0.4 < np.mean(np.array(numbers) < 5000) < 0.6  # spread over the corpus, not its start
    assert sample_sentences(lines[:10], 1000) == [f"line {i}." for i in range(10)]  # fewer lines: all of them
    # In prepare: the same vocabulary twice, another than the whole corpus's, a fingerprint of its own
    corpus = write_bert_format(tmp_path / "corpus.txt", random_documents(5, 200) + unicode_documents(6, 200))
    sampled = [prepare_corpus([corpus], tmp_path / f"s{i}", vocab_size=300, vocab_sample=50) for i in (1, 2)]
    whole = prepare_corpus([corpus], tmp_path / "whole", vocab_size=300)
    assert _prepared_bytes(tmp_path / "s1") == _prepared_bytes(tmp_path / "s2")
    assert sampled[0].vocab_sha256 != whole.vocab_sha256 and sampled[0].fingerprint != whole.fingerprint
