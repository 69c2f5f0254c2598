"""Dynamic MLM masking for BERT pre-training (BERT's 80/10/10 rule), run by the C++ extension on the CPU.

:func:`mask_tokens` is what the data loader calls on every batch. The rules, exactly:

* Selection is an independent Bernoulli(``mlm_probability``) draw per token, as in BERT and Hugging
  Face's ``DataCollatorForLanguageModeling`` (not an exact count per sequence), so the number of
  selected tokens per sequence varies binomially. Special tokens are never selected.
* With ``word_starts`` (whole-word masking) the draw is per word instead: a word is a start piece plus
  the non-start pieces that follow it, and all its pieces are selected or none. Each token is then
  still selected with probability ``mlm_probability``. A special token ends a word; a non-start piece
  with no word to continue starts its own.
* Each selected token (each piece, for whole words, as in Google's BERT) independently becomes
  ``mask_token_id`` with probability ``mask_ratio``, a random id with probability ``random_ratio``
  (uniform over the vocabulary minus the special ids and ``mask_token_id``), or stays unchanged.
* ``labels`` holds the original id at selected positions and -100 (ignored by cross-entropy) elsewhere.

Random numbers come from a counter-based generator (splitmix64 of ``(seed, row, position)``): the
result depends only on the seed and the batch, never on the thread count. Probabilities act as
thresholds ``floor(p * 2**32)`` on 32-bit draws. :func:`mask_tokens_reference` is a slow pure-Python
version of the same rules and generator, for tests.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence

import torch

from fastbert import _extension
from fastbert._validation import DtypeError, check_tensor

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "continuation_table",
    "mask_tokens",
    "mask_tokens_reference",
    "masking_draws_reference",
    "read_vocab",
    "word_starts",
]


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _check_ids(name: str, ids: object) -> torch.Tensor:
    check_tensor(name, ids)
    if ids.dtype != torch.int64:
        raise DtypeError(f"{name} must be int64, got {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, seqlen), got shape {tuple(ids.shape)}")
    if ids.device.type != "cpu":
        raise ValueError(
            f"{name} is on {ids.device}, but masking runs on the CPU (in the data loader, before the "
            f"batch goes to the GPU); pass {name}.cpu()"
        )
    return ids


def _check_masking_args(input_ids, mask_token_id, vocab_size, special_token_ids, mlm_probability,
                        mask_ratio, random_ratio, word_starts, seed) -> tuple[list[int], int | None]:
    """Every check :func:`mask_tokens` makes before the C++ runs; returns the special ids as a list."""
    _check_ids("input_ids", input_ids)
    vocab_size = _check_int("vocab_size", vocab_size)
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if not 0 <= _check_int("mask_token_id", mask_token_id) < vocab_size:
        raise ValueError(f"mask_token_id {mask_token_id} is outside the vocabulary [0, {vocab_size})")
    if isinstance(special_token_ids, torch.Tensor):
        special_token_ids = special_token_ids.flatten().tolist()
    if isinstance(special_token_ids, (str, bytes)) or not isinstance(special_token_ids, Iterable):
        raise TypeError(f"special_token_ids must be a sequence of ints, got {type(special_token_ids).__name__}")
    specials = [_check_int("special_token_ids entries", i) for i in special_token_ids]
    for i in specials:
        if not 0 <= i < vocab_size:
            raise ValueError(f"special token id {i} is outside the vocabulary [0, {vocab_size})")
    _check_fraction("mlm_probability", mlm_probability)
    mask_ratio = _check_fraction("mask_ratio", mask_ratio)
    random_ratio = _check_fraction("random_ratio", random_ratio)
    if mask_ratio + random_ratio > 1.0 + 1e-12:
        raise ValueError(f"mask_ratio + random_ratio must be <= 1, got {mask_ratio} + {random_ratio}")
    if random_ratio > 0 and len(set(specials) | {mask_token_id}) == vocab_size:
        raise ValueError("random_ratio > 0 but every id in the vocabulary is special: nothing to draw from")
    if word_starts is not None:
        check_tensor("word_starts", word_starts)
        if word_starts.dtype != torch.bool:
            raise DtypeError(f"word_starts must be bool, got {word_starts.dtype}")
        if word_starts.shape != input_ids.shape:
            raise ValueError(
                f"word_starts has shape {tuple(word_starts.shape)} but input_ids has shape {tuple(input_ids.shape)}"
            )
        if word_starts.device.type != "cpu":
            raise ValueError(f"word_starts is on {word_starts.device}; it must be on the CPU like input_ids")
    if seed is not None:
        seed = _check_int("seed", seed)
    return specials, seed


def _empty_result(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mask_tokens' result for a batch without tokens: nothing to mask, the shape kept."""
    return input_ids.clone(), torch.full_like(input_ids, IGNORE_INDEX)


def _seed_from_torch() -> int:
    """A 63-bit seed from torch's default CPU generator, so ``torch.manual_seed`` reproduces a run."""
    return int(torch.empty((), dtype=torch.int64).random_())


def mask_tokens(input_ids: torch.Tensor, *, mask_token_id: int, vocab_size: int,
                special_token_ids: Iterable[int] | torch.Tensor = (), mlm_probability: float = 0.15,
                mask_ratio: float = 0.8, random_ratio: float = 0.1, word_starts: torch.Tensor | None = None,
                seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's dynamic masking of one batch (the rules are in this module's docstring).

    input_ids: int64 (batch, seqlen) on the CPU (a CUDA tensor is an error: masking belongs in the data
    loader). special_token_ids: ids never selected nor drawn as replacements ([CLS], [SEP], [PAD], ...);
    ``mask_token_id`` is always treated as special. word_starts: optional bool (batch, seqlen), True at
    the first piece of each word (see :func:`word_starts`); turns on whole-word masking. seed: any int
    makes the result reproducible; None draws a seed from torch's default CPU generator.

    Returns new tensors ``(masked_input_ids, labels)``, both int64 (batch, seqlen); ``input_ids`` is not
    modified. Runs on torch's intra-op threads (``torch.set_num_threads``); same seed, same result.
    An empty batch (batch = 0 or seqlen = 0) gives two empty tensors of that shape (no draws are made).
    """
    specials, seed = _check_masking_args(input_ids, mask_token_id, vocab_size, special_token_ids,
                                         mlm_probability, mask_ratio, random_ratio, word_starts, seed)
    if input_ids.numel() == 0:
        return _empty_result(input_ids)
    if seed is None:
        seed = _seed_from_torch()
    return _extension.load().mask_tokens(
        input_ids, torch.tensor(specials, dtype=torch.int64), mask_token_id, vocab_size, float(mlm_probability),
        float(mask_ratio), float(random_ratio), word_starts, seed % 2**64,
    )


def word_starts(input_ids: torch.Tensor, is_continuation: torch.Tensor) -> torch.Tensor:
    """bool (batch, seqlen): True where ``input_ids`` is not a WordPiece continuation ("##") piece.

    input_ids: int64 (batch, seqlen) CPU; is_continuation: bool (vocab_size,) from
    :func:`continuation_table`. Special tokens count as starts (masking skips them anyway).
    """
    _check_ids("input_ids", input_ids)
    check_tensor("is_continuation", is_continuation)
    if is_continuation.dtype != torch.bool:
        raise DtypeError(f"is_continuation must be bool, got {is_continuation.dtype}")
    if is_continuation.dim() != 1 or is_continuation.device.type != "cpu":
        raise ValueError(
            f"is_continuation must be a 1-D CPU tensor (one entry per vocabulary id), got shape "
            f"{tuple(is_continuation.shape)} on {is_continuation.device}"
        )
    return _extension.load().word_starts(input_ids, is_continuation)


def read_vocab(path: str | os.PathLike) -> list[str]:
    """The tokens of a WordPiece ``vocab.txt`` (one per line), in id order."""
    with open(path, encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle]


def continuation_table(vocab: str | os.PathLike | Sequence[str] | Mapping[str, int]) -> torch.Tensor:
    """bool (vocab_size,): True for WordPiece continuation pieces (tokens starting with "##").

    vocab: a ``vocab.txt`` path, the tokens in id order, or a token → id mapping.
    """
    if isinstance(vocab, (str, os.PathLike)):
        vocab = read_vocab(vocab)
    if isinstance(vocab, Mapping):
        table = torch.zeros(max(vocab.values(), default=-1) + 1, dtype=torch.bool)
        for token, index in vocab.items():
            table[index] = token.startswith("##")
        return table
    if not isinstance(vocab, Sequence):
        raise TypeError(f"vocab must be a path, a sequence of tokens or a token -> id mapping, got {type(vocab).__name__}")
    return torch.tensor([token.startswith("##") for token in vocab], dtype=torch.bool)


# ---- pure-Python reference (slow; tests only) --------------------------------------------------------

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def masking_draws_reference(seed: int, batch: int, seqlen: int) -> torch.Tensor:
    """int64 (batch, seqlen, 3): the 32-bit selection, 80/10/10 and random-id draws at each position."""
    seed %= 2**64
    draws = torch.empty((batch, seqlen, 3), dtype=torch.int64)
    for b in range(batch):
        key = _mix64((_mix64(seed) + _GOLDEN * (b + 1)) & _MASK64)
        for t in range(seqlen):
            token = _mix64((key + _GOLDEN * (2 * t + 1)) & _MASK64)
            pick = _mix64((key + _GOLDEN * (2 * t + 2)) & _MASK64)
            draws[b, t, 0] = token >> 32
            draws[b, t, 1] = token & 0xFFFFFFFF
            draws[b, t, 2] = pick >> 32
    return draws


def _threshold(p: float) -> int:
    return math.floor(p * 4294967296.0)


def mask_tokens_reference(input_ids: torch.Tensor, *, mask_token_id: int, vocab_size: int,
                          special_token_ids: Iterable[int] | torch.Tensor = (), mlm_probability: float = 0.15,
                          mask_ratio: float = 0.8, random_ratio: float = 0.1,
                          word_starts: torch.Tensor | None = None, seed: int | None = None,
                          draws: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-Python :func:`mask_tokens`, one token at a time. Same arguments, same output for a seed.

    draws: optional int64 (batch, seqlen, 3) of 32-bit draws to use instead of the seed's (see
    :func:`masking_draws_reference`), to test the rules on chosen draws.
    """
    specials, seed = _check_masking_args(input_ids, mask_token_id, vocab_size, special_token_ids,
                                         mlm_probability, mask_ratio, random_ratio, word_starts, seed)
    if input_ids.numel() == 0:
        return _empty_result(input_ids)
    batch, seqlen = input_ids.shape
    if draws is None:
        draws = masking_draws_reference(_seed_from_torch() if seed is None else seed, batch, seqlen)
    elif draws.shape != (batch, seqlen, 3):
        raise ValueError(f"draws must have shape {(batch, seqlen, 3)}, got {tuple(draws.shape)}")
    special = set(specials) | {mask_token_id}
    replacements = [i for i in range(vocab_size) if i not in special]
    select_below = _threshold(mlm_probability)
    mask_below = _threshold(mask_ratio)
    random_below = mask_below + _threshold(random_ratio)

    ids = input_ids.tolist()
    starts = word_starts.tolist() if word_starts is not None else None
    draw_list = draws.tolist()
    masked = [row[:] for row in ids]
    labels = [[IGNORE_INDEX] * seqlen for _ in range(batch)]
    for b in range(batch):
        word_selected = None  # None: not inside a word
        for t in range(seqlen):
            token = ids[b][t]
            if not 0 <= token < vocab_size:
                raise ValueError(f"input_ids[{b}, {t}] = {token} is outside the vocabulary [0, {vocab_size})")
            if token in special:
                word_selected = None
                continue
            select_draw, action_draw, pick_draw = draw_list[b][t]
            if starts is None or starts[b][t] or word_selected is None:
                word_selected = select_draw < select_below
            if not word_selected:
                continue
            labels[b][t] = token
            if action_draw < mask_below:
                masked[b][t] = mask_token_id
            elif action_draw < random_below:
                masked[b][t] = replacements[(pick_draw * len(replacements)) >> 32]
    return torch.tensor(masked, dtype=torch.int64), torch.tensor(labels, dtype=torch.int64)
