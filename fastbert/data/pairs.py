"""BERT's next-sentence pairs, built on the fly from prepared shards, and the pre-training sampler.

:class:`BertPairDataset` follows BERT's ``create_pretraining_data.py`` rules for one instance:

* target length ``max_seq_len - 3`` (room for ``[CLS]``, ``[SEP]``, ``[SEP]``); with probability
  ``short_seq_prob`` a random shorter target in ``[2, max_seq_len - 3]``;
* a chunk of whole sentences of one document, from a start sentence until the target is reached (or
  the document ends); segment A = its first 1..n-1 sentences (a random cut);
* with probability ``random_next_prob`` segment B comes from another random document of the same
  split (label 1), else B = the rest of the chunk (label 0);
* while A + B is too long, the longer side loses a token, each time from its front or its back at
  random.

Instance ``i`` depends only on ``(seed, split, i)``: its start is the token at about
``i / len(self)`` of the split (so one epoch covers the split's tokens once), and every random
choice comes from a generator seeded with ``(seed, split, i)``. There is no hidden state, so a
resumed run (or another worker) rebuilds exactly the same examples.

The eval split is ``eval_fraction`` of the documents (at least one, and at least one document is
left for training), spread evenly over the corpus (see :func:`eval_documents`) so that it samples
every part of it rather than the last topics; train examples never read an eval document, not even
as a random next sentence, and eval examples never read a train one.

Edge rules (BERT leaves them open): a label-0 pair needs two sentences, so a one-sentence chunk grows
by the next sentence (or the previous one at the document's end); a document of a single sentence
always gives a random next (label 1). A split with a single document takes its random next sentences
from that same document.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch

from fastbert.data.prepare import PreparedData, load_prepared

SPLITS = ("train", "eval")


class BertPairDataset(torch.utils.data.Dataset):
    """Map-style dataset of BERT pre-training pairs (unpadded; masking is the collator's job).

    ``dataset[i]`` is a dict: ``input_ids`` (1-D int64 numpy array, ``[CLS] A [SEP] B [SEP]``, at
    most ``max_seq_len`` long), ``token_type_ids`` (int64, 0 for ``[CLS]`` A ``[SEP]``, 1 for B
    ``[SEP]``) and ``next_sentence_label`` (int: 0 = B follows A, 1 = B is random).
    ``len(dataset)`` is about the split's tokens / ``max_seq_len`` (one epoch). ``documents``: the
    split's document numbers (sorted int64 array).
    """

    def __init__(self, data_dir: str | os.PathLike | PreparedData, max_seq_len: int, *,
                 short_seq_prob: float = 0.1, random_next_prob: float = 0.5, seed: int = 0,
                 split: str = "train", eval_fraction: float = 0.01):
        self.data = data_dir if isinstance(data_dir, PreparedData) else load_prepared(data_dir)
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int):
            raise TypeError(f"max_seq_len must be an int, got {type(max_seq_len).__name__}")
        if max_seq_len < 5:
            raise ValueError(f"max_seq_len must be >= 5 ([CLS] A [SEP] B [SEP] with A and B of 1+ tokens), "
                             f"got {max_seq_len}")
        self.short_seq_prob = _probability("short_seq_prob", short_seq_prob)
        self.random_next_prob = _probability("random_next_prob", random_next_prob)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(eval_fraction, (int, float)) or not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
        num_documents = self.data.num_documents
        if num_documents < 2:
            raise ValueError(f"{self.data.data_dir} has {num_documents} document(s); pre-training pairs need at "
                             "least 2 (one for training, one held out for evaluation)")
        self.max_seq_len = max_seq_len
        self.seed = int(seed)
        self.split = split
        self.eval_fraction = float(eval_fraction)
        held_out = eval_documents(num_documents, eval_fraction)
        if split == "eval":
            self.documents = held_out
        else:
            self.documents = np.setdiff1d(np.arange(num_documents, dtype=np.int64), held_out)
        self._store = self.data.token_store()
        self._document_starts: np.ndarray | None = None  # token offset of each split document (+ total)
        self.num_tokens = int(self._starts()[-1])
        self._length = max(1, self.num_tokens // max_seq_len)

    @property
    def num_documents(self) -> int:
        return len(self.documents)

    def __len__(self) -> int:
        return self._length

    def __getstate__(self) -> dict:
        # Workers rebuild the document index and reopen the memory maps themselves.
        state = self.__dict__.copy()
        state["_document_starts"] = None
        return state

    def _starts(self) -> np.ndarray:
        if self._document_starts is None:
            counts = self._store.document_token_counts()[self.documents]
            self._document_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return self._document_starts

    def __getitem__(self, index: int) -> dict:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        index = int(index)
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for a dataset of {self._length} pairs")
        split_code = SPLITS.index(self.split)
        rng = np.random.default_rng([self.seed, split_code, index])

        max_tokens = self.max_seq_len - 3
        target = max_tokens
        if rng.random() < self.short_seq_prob:
            target = int(rng.integers(2, max_tokens + 1))

        # Start at the sentence holding the split's token number ~ index / len.
        starts = self._starts()
        position = min(int((index + rng.random()) * self.num_tokens / self._length), self.num_tokens - 1)
        local_document = int(np.searchsorted(starts, position, side="right")) - 1
        tokens, offsets = self._store.sentence_offsets(int(self.documents[local_document]))
        num_sentences = len(offsets) - 1
        token_in_document = offsets[0] + position - starts[local_document]
        start = min(int(np.searchsorted(offsets, token_in_document, side="right")) - 1, num_sentences - 1)
        end = _chunk_end(offsets, start, target)

        is_random_next = bool(rng.random() < self.random_next_prob)
        if not is_random_next and end - start == 1:
            if end < num_sentences:
                end += 1
            elif start > 0:
                start -= 1
            else:
                is_random_next = True  # a one-sentence document has no next sentence
        a_end = int(rng.integers(start + 1, end)) if end - start >= 2 else end
        segment_a = tokens[offsets[start]:offsets[a_end]]

        if is_random_next:
            segment_b = self._random_segment(rng, local_document, max(1, target - len(segment_a)))
        else:
            segment_b = tokens[offsets[a_end]:offsets[end]]
        segment_a, segment_b = _truncate_pair(rng, segment_a, segment_b, target)

        length_a, length_b = len(segment_a), len(segment_b)
        ids = self.data
        input_ids = np.empty(length_a + length_b + 3, dtype=np.int64)
        input_ids[0] = ids.cls_id
        input_ids[1:1 + length_a] = segment_a
        input_ids[1 + length_a] = ids.sep_id
        input_ids[2 + length_a:2 + length_a + length_b] = segment_b
        input_ids[-1] = ids.sep_id
        token_type_ids = np.zeros_like(input_ids)
        token_type_ids[2 + length_a:] = 1
        return {"input_ids": input_ids, "token_type_ids": token_type_ids,
                "next_sentence_label": int(is_random_next)}

    def _random_segment(self, rng: np.random.Generator, local_document: int, target: int) -> np.ndarray:
        """Sentences of another random document of the split, from a random sentence, ~``target`` tokens."""
        other = local_document
        if self.num_documents >= 2:
            other = int(rng.integers(0, self.num_documents - 1))
            other += other >= local_document  # any document but this one
        tokens, offsets = self._store.sentence_offsets(int(self.documents[other]))
        start = int(rng.integers(0, len(offsets) - 1))
        return tokens[offsets[start]:offsets[_chunk_end(offsets, start, target)]]


def eval_documents(num_documents: int, eval_fraction: float) -> np.ndarray:
    """The held-out document numbers (sorted int64): ``round(eval_fraction * num_documents)`` of them,
    at least 1 and at most ``num_documents - 1``, evenly spaced (the middle document of each of that
    many equal runs). The corpus order often follows topics (the built-in one is sorted by module), so a
    tail slice would hold out a few topics only."""
    num_eval = min(num_documents - 1, max(1, round(eval_fraction * num_documents)))
    middles = (np.arange(num_eval, dtype=np.float64) + 0.5) * num_documents / num_eval
    return np.floor(middles).astype(np.int64)


def _probability(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _chunk_end(offsets: np.ndarray, start: int, target: int) -> int:
    """One past the last sentence of the chunk that starts at ``start`` and reaches ``target`` tokens
    (or the document's end); at least one sentence."""
    end = int(np.searchsorted(offsets, offsets[start] + target, side="left"))
    return min(max(end, start + 1), len(offsets) - 1)


def _truncate_pair(rng: np.random.Generator, a: np.ndarray, b: np.ndarray, target: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """BERT's truncate_seq_pair in closed form: the longer side loses one token at a time (B on a tie)
    until ``len(a) + len(b) <= target``; each lost token comes off the front or the back at random."""
    excess = len(a) + len(b) - target
    if excess <= 0:
        return a, b
    cut_a, cut_b = 0, 0
    gap = abs(len(a) - len(b))
    first = min(gap, excess)
    if len(a) > len(b):
        cut_a += first
    else:
        cut_b += first
    rest = excess - first
    # Equal lengths now: B loses the first token, then they alternate.
    cut_b += (rest + 1) // 2
    cut_a += rest // 2
    return _cut(rng, a, cut_a), _cut(rng, b, cut_b)


def _cut(rng: np.random.Generator, segment: np.ndarray, count: int) -> np.ndarray:
    if count == 0:
        return segment
    front = int(rng.binomial(count, 0.5))
    return segment[front:len(segment) - (count - front)]


class PretrainSampler(torch.utils.data.Sampler):
    """An endless, deterministic stream of dataset indices for one rank.

    The global stream is epoch 0's permutation of ``range(dataset_len)``, then epoch 1's, ...; epoch
    ``e``'s permutation comes from ``(seed, e)`` alone. Rank ``r`` of ``world_size`` takes stream
    positions ``r, r + world_size, r + 2 * world_size, ...`` so within an epoch no two ranks see the
    same index. ``start_index`` = how many indices this rank has already consumed: the stream then
    continues exactly where a run stopped.
    """

    def __init__(self, dataset_len: int, *, seed: int, rank: int = 0, world_size: int = 1, start_index: int = 0):
        for name, value, low in (("dataset_len", dataset_len, 1), ("world_size", world_size, 1),
                                 ("rank", rank, 0), ("start_index", start_index, 0), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
        self.dataset_len = int(dataset_len)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.start_index = int(start_index)

    def permutation(self, epoch: int) -> np.ndarray:
        dtype = np.int32 if self.dataset_len < 2**31 else np.int64
        return np.random.default_rng([self.seed, epoch]).permutation(np.arange(self.dataset_len, dtype=dtype))

    def __iter__(self) -> Iterator[int]:
        position = self.start_index * self.world_size + self.rank  # in the global stream
        while True:
            epoch, offset = divmod(position, self.dataset_len)
            chosen = self.permutation(epoch)[offset::self.world_size]
            yield from chosen.tolist()
            position += len(chosen) * self.world_size
