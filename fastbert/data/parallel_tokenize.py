"""Sentence splitting and tokenizing of a corpus's documents in worker processes, in corpus order.

The reader (one process: decoding, file order, the replaced-byte count) hands raw documents in
chunks to ``workers`` processes, each of which splits them into sentences and tokenizes them on one
thread; the results come back in submission order, so the shards are the same bytes whatever the
number of workers. At most two chunks per worker are in flight, so memory stays bounded however large
the corpus.
"""
from __future__ import annotations

import collections
import itertools
import contextlib
import multiprocessing
import os
import sys
from typing import Iterable, Iterator

import numpy as np
import tokenizers

from fastbert.data.text import sentences_of_lines
from fastbert.data.tokenizer import WordPieceTokenizer

_PARALLELISM = "TOKENIZERS_PARALLELISM"
_worker_tokenizer: WordPieceTokenizer | None = None  # a worker process's copy


def tokenized_documents(raw_documents: Iterable[list[str]], wordpiece: WordPieceTokenizer, *, workers: int,
                        chunk_lines: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(the document's tokens back to back as int32, each sentence's length) for every raw document with
    at least one sentence, in order. ``workers`` = 1 runs in this process on one thread."""
    chunks = _chunks(raw_documents, chunk_lines)
    with _serial_tokenizers():
        if workers == 1:
            for chunk in chunks:
                yield from _per_document(_split_and_tokenize(wordpiece, chunk))
            return
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else None)
        pool = context.Pool(workers, initializer=_start_worker,
                            initargs=(wordpiece.tokenizer.to_str(), wordpiece.lowercase))
        try:
            pending: collections.deque = collections.deque()
            for chunk in chunks:
                pending.append(pool.apply_async(_worker_split_and_tokenize, (chunk,)))
                if len(pending) >= 2 * workers:
                    yield from _per_document(pending.popleft().get())
            while pending:
                yield from _per_document(pending.popleft().get())
            pool.close()
        finally:
            pool.terminate()
            pool.join()


@contextlib.contextmanager
def _serial_tokenizers():
    """tokenizers on one thread while the workers run (each worker is one core's worth of work), and no
    fork warning from it; the previous setting comes back after."""
    previous = os.environ.get(_PARALLELISM)
    os.environ[_PARALLELISM] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_PARALLELISM, None)
        else:
            os.environ[_PARALLELISM] = previous


def _chunks(raw_documents: Iterable[list[str]], chunk_lines: int) -> Iterator[list[list[str]]]:
    chunk: list[list[str]] = []
    lines = 0
    for document in raw_documents:
        chunk.append(document)
        lines += len(document)
        if lines >= chunk_lines:
            yield chunk
            chunk, lines = [], 0
    if chunk:
        yield chunk


def _start_worker(tokenizer_json: str, lowercase: bool) -> None:
    global _worker_tokenizer
    os.environ[_PARALLELISM] = "false"
    _worker_tokenizer = WordPieceTokenizer(tokenizers.Tokenizer.from_str(tokenizer_json), lowercase)


def _worker_split_and_tokenize(chunk: list[list[str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _split_and_tokenize(_worker_tokenizer, chunk)


def _split_and_tokenize(wordpiece: WordPieceTokenizer, chunk: list[list[str]]
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(all tokens, each sentence's length, each document's sentence count) of a chunk of raw documents;
    documents without a sentence are left out."""
    documents = [sentences for sentences in map(sentences_of_lines, chunk) if sentences]
    ids = wordpiece.encode_batch([sentence for document in documents for sentence in document])
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    # int32: half the bytes of int64 through the pipe back to the reader (ids are < 2**31)
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths, np.fromiter(map(len, documents), dtype=np.int64, count=len(documents))


def _per_document(result: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    flat, lengths, sentences_per_document = result
    sentence_start = token_start = 0
    for count in sentences_per_document.tolist():
        document_lengths = lengths[sentence_start:sentence_start + count]
        tokens = int(document_lengths.sum())
        yield flat[token_start:token_start + tokens], document_lengths
        sentence_start += count
        token_start += tokens
