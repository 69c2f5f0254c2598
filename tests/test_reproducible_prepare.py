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
