"""Token shards on disk: written one shard at a time, read back through memory maps.

Shard ``k`` of a prepared data folder is three ``.npy`` files (numpy's format: a small header giving
dtype and shape, then the raw array, so ``np.load(mmap_mode="r")`` maps it without reading it):

* ``shard_{k:05d}.tokens.npy``     the token ids of every sentence, back to back (uint16 when the
  vocabulary has at most 65,536 tokens, else int32);
* ``shard_{k:05d}.sentences.npy``  int64, ``num_sentences + 1`` token offsets: sentence ``s`` is
  ``tokens[sentences[s]:sentences[s + 1]]``;
* ``shard_{k:05d}.documents.npy``  int64, ``num_documents + 1`` sentence offsets: document ``j`` is
  sentences ``documents[j]:documents[j + 1]``.

A document never spans two shards, and empty sentences and documents are not stored. Documents are
numbered globally in corpus order across shards. The writer holds one shard in memory (a shard is
flushed once it reaches ``shard_tokens`` tokens, at the end of a document).
"""
from __future__ import annotations

import array
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from fastbert._atomic import atomic_write

UINT16_VOCAB_LIMIT = 1 << 16
SHARD_PATTERN = "shard_*.npy"


def token_dtype_for(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65,536), else int32."""
    return np.dtype(np.uint16) if vocab_size <= UINT16_VOCAB_LIMIT else np.dtype(np.int32)


def shard_file(data_dir: Path, index: int, kind: str) -> Path:
    return Path(data_dir) / f"shard_{index:05d}.{kind}.npy"


@dataclass
class ShardInfo:
    """One shard's counts (stored in metadata.json)."""

    index: int
    num_tokens: int
    num_sentences: int
    num_documents: int

    def to_json(self) -> dict:
        return {"index": self.index, "num_tokens": self.num_tokens, "num_sentences": self.num_sentences,
                "num_documents": self.num_documents}

    @classmethod
    def from_json(cls, value: dict) -> "ShardInfo":
        return cls(int(value["index"]), int(value["num_tokens"]), int(value["num_sentences"]),
                   int(value["num_documents"]))


def _save_npy(path: Path, values: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a file object: np.save on a path would append ".npy"
            np.save(handle, values, allow_pickle=False)

    atomic_write(path, write)


class ShardWriter:
    """Streams documents into shards of about ``shard_tokens`` tokens each."""

    def __init__(self, data_dir: str | os.PathLike, dtype: np.dtype, shard_tokens: int):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.data_dir = Path(data_dir)
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.shards: list[ShardInfo] = []
        self._reset()

    def _reset(self) -> None:
        # A growable token buffer plus compact offset arrays: about one shard of memory in all.
        self._tokens = np.empty(min(self.shard_tokens, 1 << 20), dtype=self.dtype)
        self._num_tokens = 0
        self._sentence_ends = array.array("q")
        self._document_ends = array.array("q")

    def add_flat_document(self, tokens: np.ndarray, sentence_lengths: np.ndarray) -> None:
        """Append one document: its sentences' tokens back to back, and each sentence's length."""
        sentence_lengths = np.asarray(sentence_lengths, dtype=np.int64)
        total = int(sentence_lengths.sum())
        if total != len(tokens):
            raise ValueError(f"sentence lengths add up to {total} but {len(tokens)} tokens were given")
        sentence_lengths = sentence_lengths[sentence_lengths > 0]
        if total == 0:
            return
        needed = self._num_tokens + total
        if needed > len(self._tokens):
            grown = np.empty(max(needed, 2 * len(self._tokens)), dtype=self.dtype)
            grown[:self._num_tokens] = self._tokens[:self._num_tokens]
            self._tokens = grown
        self._tokens[self._num_tokens:needed] = tokens
        self._sentence_ends.extend((self._num_tokens + np.cumsum(sentence_lengths)).tolist())
        self._document_ends.append(len(self._sentence_ends))
        self._num_tokens = needed
        if self._num_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        """Write the buffered documents as the next shard (nothing when the buffer is empty)."""
        if not self._document_ends:
            return
        index = len(self.shards)
        sentences = np.zeros(len(self._sentence_ends) + 1, dtype=np.int64)
        sentences[1:] = np.frombuffer(self._sentence_ends, dtype=np.int64)
        documents = np.zeros(len(self._document_ends) + 1, dtype=np.int64)
        documents[1:] = np.frombuffer(self._document_ends, dtype=np.int64)
        _save_npy(shard_file(self.data_dir, index, "tokens"), self._tokens[:self._num_tokens])
        _save_npy(shard_file(self.data_dir, index, "sentences"), sentences)
        _save_npy(shard_file(self.data_dir, index, "documents"), documents)
        self.shards.append(ShardInfo(index, self._num_tokens, len(sentences) - 1, len(documents) - 1))
        self._reset()

    def close(self) -> list[ShardInfo]:
        self.flush()
        return self.shards


class TokenStore:
    """Read access to the shards of a prepared folder, by global document number.

    Memory maps open on first use, so the store pickles small (only paths and counts) and each
    DataLoader worker opens its own maps.
    """

    def __init__(self, data_dir: str | os.PathLike, shards: Sequence[ShardInfo]):
        self.data_dir = Path(data_dir)
        self.shards = list(shards)
        counts = np.array([shard.num_documents for shard in self.shards], dtype=np.int64)
        # first global document number of each shard
        self.shard_first_document = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_documents = int(self.shard_first_document[-1])
        self._maps: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = None
        return state

    def _shard(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._maps is None:
            self._maps = {}
        maps = self._maps.get(index)
        if maps is None:
            maps = tuple(np.load(shard_file(self.data_dir, index, kind), mmap_mode="r", allow_pickle=False)
                         for kind in ("tokens", "sentences", "documents"))
            self._maps[index] = maps
        return maps

    def locate(self, document: int) -> tuple[int, int]:
        """(shard index, document number within the shard)."""
        if not 0 <= document < self.num_documents:
            raise IndexError(f"document {document} out of range (the data has {self.num_documents})")
        shard = int(np.searchsorted(self.shard_first_document, document, side="right")) - 1
        return shard, document - int(self.shard_first_document[shard])

    def sentence_offsets(self, document: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens of the document's shard, token offsets of its sentences: ``num_sentences + 1`` int64)."""
        shard, local = self.locate(document)
        tokens, sentences, documents = self._shard(shard)
        first, last = int(documents[local]), int(documents[local + 1])
        return tokens, np.asarray(sentences[first:last + 1])

    def document(self, document: int) -> list[np.ndarray]:
        """The sentences of a document as arrays of token ids."""
        tokens, offsets = self.sentence_offsets(document)
        return [np.asarray(tokens[offsets[s]:offsets[s + 1]]) for s in range(len(offsets) - 1)]

    def document_token_counts(self) -> np.ndarray:
        """Tokens per document, all documents in order (int64; reads only the small index files)."""
        counts = []
        for info in self.shards:
            _, sentences, documents = self._shard(info.index)
            bounds = np.asarray(sentences)[np.asarray(documents)]
            counts.append(np.diff(bounds))
        return np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)
