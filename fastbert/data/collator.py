"""MLMCollator: turns a list of tokenized examples into one masked pre-training batch, on the CPU.

Use it as a DataLoader's ``collate_fn``. It pads (or packs) the examples, applies BERT's dynamic MLM
masking (the rule and generator of :func:`fastbert.masking.mask_tokens`: same seed, same masks) and,
when asked, computes the unpad metadata here, so the GPU step needs no ``nonzero()`` or ``.item()``
host sync. All of it is one C++ call (``fastbert._C.collate_mlm``) for the usual forms below (dicts,
tuples, bare sequences of Python ints, integer numpy arrays or CPU tensors); other forms and bad
examples take a Python path that gives the same batch or the error naming the example.

Accepted examples (mixing forms in one batch is fine):

* a dict with ``input_ids`` and optionally ``token_type_ids`` and ``next_sentence_label``;
* a tuple/list ``(input_ids,)``, ``(input_ids, token_type_ids)`` or
  ``(input_ids, token_type_ids, next_sentence_label)`` (``token_type_ids`` may be None);
* a bare id sequence: a 1-D tensor, a 1-D numpy array, or a list of ints.

Id sequences may be lists of ints, 1-D integer numpy arrays (uint16/int32 shards included) or 1-D
integer tensors; they must already carry their special tokens (``[CLS] A [SEP] B [SEP]``) and be at
most ``max_len`` long (longer is an error, not a silent truncation). Missing ``token_type_ids`` are
zeros. ``next_sentence_label`` is given for every example or for none.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from fastbert import _extension, masking
from fastbert._validation import DtypeError
from fastbert.data.packing import plan_packing
from fastbert.ops.padding import unpad_metadata

__all__ = ["MLMCollator"]

_SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]")


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _split_example(example: Any, index: int) -> tuple[Any, Any, Any]:
    """(input_ids, token_type_ids or None, next_sentence_label or None) of one example."""
    if isinstance(example, Mapping):
        if "input_ids" not in example:
            raise ValueError(f"example {index} is a dict without 'input_ids' (keys: {sorted(example)})")
        return example["input_ids"], example.get("token_type_ids"), example.get("next_sentence_label")
    if isinstance(example, (torch.Tensor, np.ndarray)):
        return example, None, None
    if isinstance(example, (list, tuple)):
        if not example or _is_int(example[0]):
            return example, None, None
        if len(example) > 3:
            raise ValueError(
                f"example {index} is a {type(example).__name__} of {len(example)} items; expected "
                "(input_ids[, token_type_ids[, next_sentence_label]])"
            )
        input_ids, token_type_ids, label = (*example, None, None)[:3]
        return input_ids, token_type_ids, label
    raise TypeError(
        f"example {index} is a {type(example).__name__}; expected a dict, a tuple (input_ids, token_type_ids, "
        "next_sentence_label), or an id sequence"
    )


def _as_ids(values: Any, what: str, index: int) -> torch.Tensor:
    """A 1-D int64 tensor of an id sequence, refusing floats and bools rather than rounding them."""
    if isinstance(values, torch.Tensor):
        if values.dtype == torch.bool or values.dtype.is_floating_point or values.dtype.is_complex:
            raise DtypeError(f"example {index}: {what} must hold integers, got {values.dtype}")
        tensor = values
    else:
        try:
            array = np.asarray(values)  # a list of ints goes through numpy ~6x faster than torch.as_tensor
        except ValueError:  # ragged nesting
            raise ValueError(f"example {index}: {what} must be a flat sequence of ints") from None
        if array.size and array.dtype.kind not in "iu":
            raise DtypeError(f"example {index}: {what} must hold integers, got {array.dtype}")
        tensor = torch.from_numpy(array.astype(np.int64, copy=False))
    if tensor.dim() != 1:
        raise ValueError(f"example {index}: {what} must be 1-D, got shape {tuple(tensor.shape)}")
    return tensor.to(torch.int64)


class MLMCollator:
    """Pads or packs examples and masks them: one pre-training batch per call.

    Args:
        vocab_size, mask_token_id, pad_token_id: from the vocabulary.
        special_token_ids: ids never masked nor drawn as random replacements ([CLS], [SEP], ...);
            ``pad_token_id`` and ``mask_token_id`` are always added.
        is_continuation: bool (vocab_size,) from :func:`fastbert.masking.continuation_table`; needed
            for ``whole_word_mask``.
        max_len: the longest example allowed, and the row length when packing.
        pad_to_multiple_of: padded batches are as long as their longest example rounded up to this
            (8 suits tensor cores), at most ``max_len``. None: no rounding.
        mlm_probability, mask_ratio, random_ratio: BERT's 15% and 80/10/10 (see :mod:`fastbert.masking`).
        whole_word_mask: select whole words (needs ``is_continuation``).
        packing: first-fit-decreasing packing into rows of ``max_len`` (see :mod:`fastbert.data.packing`);
            returns ``position_ids`` and the per-sequence unpad metadata, which the model must use.
        return_unpad_metadata: add ``indices``, ``cu_seqlens``, ``max_seqlen``; None (default) = only
            when packing (packing without them is an error: nothing would keep sequences apart).
        seed: None draws each batch's masks from torch's generator (reproducible with
            ``torch.manual_seed``, and DataLoader workers get distinct streams). An int gives a fixed
            sequence of masks per (seed, DataLoader worker seed, call number).

    Returns a dict of CPU tensors (pin them with ``DataLoader(pin_memory=True)``), B = rows:
        input_ids int64 (B, L), masked; attention_mask int64 (B, L), 1 = real token;
        token_type_ids int64 (B, L); labels int64 (B, L), -100 where not masked; masked_positions int64
        (num_masked,), the row-major flat indices of labels != -100 (the model's MLM gather, sync-free);
        next_sentence_label int64 (N,) when the examples have it (in packed order when packing);
        position_ids int64 (B, L) when packing; indices int64 (total,), cu_seqlens int32 (N+1,) and
        max_seqlen (a Python int) with the unpad metadata.
    """

    def __init__(self, *, vocab_size: int, mask_token_id: int, pad_token_id: int,
                 special_token_ids: Sequence[int] = (), is_continuation: torch.Tensor | None = None,
                 max_len: int = 512, pad_to_multiple_of: int | None = 8, mlm_probability: float = 0.15,
                 mask_ratio: float = 0.8, random_ratio: float = 0.1, whole_word_mask: bool = False,
                 packing: bool = False, return_unpad_metadata: bool | None = None, seed: int | None = None):
        special = [pad_token_id, mask_token_id, *special_token_ids]
        # The masking checks, run once here so a bad option fails at construction, not mid-epoch.
        masking._check_masking_args(torch.empty((0, 0), dtype=torch.int64), mask_token_id, vocab_size, special,
                                    mlm_probability, mask_ratio, random_ratio, None, seed)
        self.vocab_size = vocab_size
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id
        self.special_token_ids = tuple(dict.fromkeys(special))
        self.max_len = _check_positive_int("max_len", max_len)
        self.pad_to_multiple_of = (None if pad_to_multiple_of is None
                                   else _check_positive_int("pad_to_multiple_of", pad_to_multiple_of))
        self.mlm_probability = mlm_probability
        self.mask_ratio = mask_ratio
        self.random_ratio = random_ratio
        self.whole_word_mask = bool(whole_word_mask)
        self.packing = bool(packing)
        if return_unpad_metadata is None:
            return_unpad_metadata = self.packing
        if self.packing and not return_unpad_metadata:
            raise ValueError("packing=True needs the unpad metadata (cu_seqlens keeps packed sequences apart); "
                             "leave return_unpad_metadata unset or True")
        self.return_unpad_metadata = bool(return_unpad_metadata)
        if self.whole_word_mask:
            if is_continuation is None:
                raise ValueError("whole_word_mask=True needs is_continuation (see "
                                 "fastbert.masking.continuation_table, or build with MLMCollator.from_vocab)")
            if not isinstance(is_continuation, torch.Tensor) or is_continuation.dtype != torch.bool:
                raise TypeError("is_continuation must be a bool tensor (one entry per vocabulary id)")
            if is_continuation.shape != (vocab_size,):
                raise ValueError(f"is_continuation must have shape ({vocab_size},) (vocab_size), "
                                 f"got {tuple(is_continuation.shape)}")
        self.is_continuation = is_continuation
        self.seed = seed
        self._calls = 0
        self._special_ids = torch.tensor(self.special_token_ids, dtype=torch.int64)

    @classmethod
    def from_vocab(cls, vocab: str | os.PathLike | Sequence[str], **options: Any) -> "MLMCollator":
        """A collator for a WordPiece vocabulary (a ``vocab.txt`` path or its tokens in id order):
        [PAD], [CLS], [SEP] and [MASK] are looked up by name and kept from masking ([UNK] is masked like
        any other token, as in BERT); ``options`` are the other constructor arguments."""
        tokens = masking.read_vocab(vocab) if isinstance(vocab, (str, os.PathLike)) else list(vocab)
        ids = {token: i for i, token in enumerate(tokens)}
        missing = [t for t in _SPECIAL_TOKENS if t not in ids]
        if missing:
            raise ValueError(f"the vocabulary has no {', '.join(missing)} token")
        extra = tuple(options.pop("special_token_ids", ()))
        return cls(vocab_size=len(tokens), mask_token_id=ids["[MASK]"], pad_token_id=ids["[PAD]"],
                   special_token_ids=(ids["[CLS]"], ids["[SEP]"], *extra),
                   is_continuation=masking.continuation_table(tokens), **options)

    def _next_seed(self) -> int | None:
        if self.seed is None:
            return None
        worker = get_worker_info()
        worker_seed = 0 if worker is None else worker.seed
        entropy = [self.seed % 2**64, worker_seed % 2**64, self._calls]
        self._calls += 1
        return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])

    def __call__(self, examples: Sequence[Any], *, seed: int | None = None) -> dict[str, torch.Tensor | int]:
        """One batch. ``seed`` (optional) fixes this batch's masks regardless of the collator's own seed
        stream: a trainer that derives it from the batch's sample indices gets masks that a resumed run
        reproduces whatever the worker count."""
        if not isinstance(examples, Sequence) or isinstance(examples, (str, bytes)) or not examples:
            raise ValueError("MLMCollator needs a non-empty list of examples")
        if seed is None:
            seed = self._next_seed()
        if seed is None:
            seed = masking._seed_from_torch()
        else:
            seed = masking._check_int("seed", seed)
        # One C++ call reads the examples in the usual forms, pads or packs, masks and builds the metadata.
        # It returns the index of an example it does not read instead; the Python path below then reads
        # it (an unusual form) or says what is wrong with it, with the same seed, so the same masks.
        batch = _extension.load().collate_mlm(
            examples if isinstance(examples, (list, tuple)) else list(examples), self.max_len,
            self.pad_to_multiple_of, self.packing, self.return_unpad_metadata, self.pad_token_id,
            self._special_ids, self.mask_token_id, self.vocab_size, float(self.mlm_probability),
            float(self.mask_ratio), float(self.random_ratio),
            self.is_continuation if self.whole_word_mask else None, seed % 2**64)
        if isinstance(batch, dict):
            return batch
        return self._collate_in_python(examples, seed)

    def _collate_in_python(self, examples: Sequence[Any], seed: int) -> dict[str, torch.Tensor | int]:
        """The same batch as the C++ path, one example at a time: every form, and the clear errors."""
        ids, types, labels = [], [], []
        for index, example in enumerate(examples):
            input_ids, token_type_ids, label = _split_example(example, index)
            ids.append(_as_ids(input_ids, "input_ids", index))
            if not 1 <= len(ids[-1]) <= self.max_len:
                raise ValueError(f"example {index} has {len(ids[-1])} tokens; expected 1 to max_len={self.max_len}")
            types.append(None if token_type_ids is None else _as_ids(token_type_ids, "token_type_ids", index))
            if types[-1] is not None and len(types[-1]) != len(ids[-1]):
                raise ValueError(f"example {index}: token_type_ids has {len(types[-1])} entries but "
                                 f"input_ids has {len(ids[-1])}")
            labels.append(label)
        have_labels = [label is not None for label in labels]
        if any(have_labels) and not all(have_labels):
            raise ValueError("next_sentence_label must be given for every example or for none "
                             f"(missing in example {have_labels.index(False)})")
        lengths = torch.tensor([len(t) for t in ids], dtype=torch.int64)

        if self.packing:
            plan = plan_packing(lengths, self.max_len)
            order = plan.order.tolist()
            ids, types, labels = [ids[i] for i in order], [types[i] for i in order], [labels[i] for i in order]
            shape = (plan.num_rows, self.max_len)
            indices, cu_seqlens, max_seqlen = plan.indices, plan.cu_seqlens, plan.max_seqlen
            attention_mask = torch.zeros(shape, dtype=torch.int64)
            attention_mask.view(-1).index_fill_(0, indices, 1)
        else:
            width = int(lengths.max())
            if self.pad_to_multiple_of is not None:
                width = min(-(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of, self.max_len)
            shape = (len(ids), width)
            attention_mask = (torch.arange(width) < lengths[:, None]).to(torch.int64)
            indices, cu_seqlens, max_seqlen = unpad_metadata(attention_mask)

        # Real tokens go to `indices`, the row-major positions of the non-padding slots, in order.
        # index_copy_ (the indices are unique) ran 10-100x faster than indexed assignment on a busy 2-core box.
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.int64)
        input_ids.view(-1).index_copy_(0, indices, torch.cat(ids))
        token_type_ids = torch.zeros(shape, dtype=torch.int64)
        if any(t is not None for t in types):  # missing segment ids are zeros
            types = [torch.zeros_like(i) if t is None else t for i, t in zip(ids, types)]
            token_type_ids.view(-1).index_copy_(0, indices, torch.cat(types))

        word_starts = (masking.word_starts(input_ids, self.is_continuation) if self.whole_word_mask else None)
        masked_ids, mlm_labels = masking.mask_tokens(
            input_ids, mask_token_id=self.mask_token_id, vocab_size=self.vocab_size,
            special_token_ids=self.special_token_ids, mlm_probability=self.mlm_probability,
            mask_ratio=self.mask_ratio, random_ratio=self.random_ratio, word_starts=word_starts,
            seed=seed,
        )
        # The flat indices of the masked tokens, found here on the CPU so that the model's MLM gather needs
        # no device sync.
        masked_positions = torch.nonzero(mlm_labels.view(-1) != masking.IGNORE_INDEX).flatten()
        batch: dict[str, torch.Tensor | int] = {"input_ids": masked_ids, "attention_mask": attention_mask,
                                                 "token_type_ids": token_type_ids, "labels": mlm_labels,
                                                 "masked_positions": masked_positions}
        if all(have_labels):
            batch["next_sentence_label"] = torch.tensor([int(label) for label in labels], dtype=torch.int64)
        if self.packing:
            batch["position_ids"] = plan.position_ids
        if self.return_unpad_metadata:
            batch["indices"] = indices
            batch["cu_seqlens"] = cu_seqlens
            batch["max_seqlen"] = max_seqlen
        return batch
