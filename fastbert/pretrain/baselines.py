"""What counting alone scores on the held-out [MASK] targets: the yardsticks printed beside the model's
MLM accuracy, so a run shows how far above them it is.

Both are fitted on the training documents only and scored on exactly the eval's targets whose input is
[MASK] (the ones only context can predict):

* ``unigram_at_mask``: always the commonest training token;
* ``bigram_at_mask``: the commonest successor of the left neighbour *as the model sees it*; when that
  neighbour is a special token ([CLS], [SEP], [MASK], ...) or never seen in training, the unigram guess.
"""
from __future__ import annotations

import numpy as np
import torch

from fastbert.masking import IGNORE_INDEX


class CountBaselines:
    def __init__(self, unigram: int, successor: np.ndarray):
        self.unigram = unigram          # the commonest ordinary token
        self.successor = successor      # (vocab,) the commonest next token of each token; -1: never seen/special

    @classmethod
    def fit(cls, data, documents: np.ndarray) -> "CountBaselines":
        """Counts over ``documents`` (the training split) of the prepared ``data``."""
        vocab = data.vocab_size
        special = np.asarray(sorted(data.special_token_ids), dtype=np.int64)
        store = data.token_store()
        unigram = np.zeros(vocab, dtype=np.int64)
        pair_keys = []
        for document in documents:
            tokens, offsets = store.sentence_offsets(int(document))
            ids = np.asarray(tokens[offsets[0]:offsets[-1]], dtype=np.int64)
            unigram += np.bincount(ids, minlength=vocab)
            pair_keys.append(ids[:-1] * vocab + ids[1:])
        unigram[special] = -1
        keys, counts = np.unique(np.concatenate(pair_keys) if pair_keys else np.empty(0, np.int64),
                                 return_counts=True)
        left, right = keys // vocab, keys % vocab
        keep = ~np.isin(left, special) & ~np.isin(right, special)
        left, right, counts = left[keep], right[keep], counts[keep]
        # Per left token, the right token of the largest count (ties: the smallest id, for a fixed answer).
        order = np.lexsort((right, -counts, left))
        left, right = left[order], right[order]
        first = np.ones(len(left), dtype=bool)
        first[1:] = left[1:] != left[:-1]
        successor = np.full(vocab, -1, dtype=np.int64)
        successor[left[first]] = right[first]
        return cls(int(unigram.argmax()), successor)

    def score(self, batches: list[dict], mask_token_id: int) -> dict[str, float]:
        """Both baselines' accuracy at the [MASK] inputs of the collated eval ``batches``."""
        successor = torch.from_numpy(self.successor)
        hits_unigram = hits_bigram = total = 0
        for batch in batches:
            input_ids, labels = batch["input_ids"], batch["labels"]
            at_mask = (labels != IGNORE_INDEX) & (input_ids == mask_token_id)
            at_mask[:, 0] = False  # position 0 is [CLS], never a target; keeps the left neighbour in the row
            rows, columns = at_mask.nonzero(as_tuple=True)
            targets = labels[rows, columns]
            guess = successor[input_ids[rows, columns - 1]]
            guess = torch.where(guess >= 0, guess, torch.full_like(guess, self.unigram))
            hits_unigram += int((targets == self.unigram).sum())
            hits_bigram += int((targets == guess).sum())
            total += targets.numel()
        total = max(total, 1)
        return {"unigram_at_mask": hits_unigram / total, "bigram_at_mask": hits_bigram / total}
