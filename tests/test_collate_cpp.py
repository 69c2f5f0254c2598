"""MLMCollator's one-call C++ path (fastbert._C.collate_mlm) against its Python path: the same batch,
bit for bit, for every example form, padded and packed, plain and whole-word; unusual forms and bad
examples go to the Python path, which reads or explains them."""
from collections import UserDict

import numpy as np
import pytest
import torch

from fastbert import _extension
from fastbert.data import MLMCollator
from fastbert.masking import mask_tokens

VOCAB = 1000
PAD, CLS, SEP, MASK = 0, 1, 2, 3
CONTINUATION = torch.arange(VOCAB) % 3 == 0  # every third id a "##" piece
CONTINUATION[:4] = False


def collator(**options) -> MLMCollator:
    defaults = dict(vocab_size=VOCAB, mask_token_id=MASK, pad_token_id=PAD, special_token_ids=(CLS, SEP),
                    max_len=48, is_continuation=CONTINUATION, seed=0)
    defaults.update(options)
    return MLMCollator(**defaults)


def pairs(count, max_len, *, seed, labelled=True):
    """Ragged [CLS] A [SEP] B [SEP] as int64 arrays, with segment ids and NSP labels."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = int(rng.integers(5, max_len + 1))
        split = int(rng.integers(2, n - 2))
        ids = rng.integers(4, VOCAB, n)
        ids[0], ids[split], ids[-1] = CLS, SEP, SEP
        types = np.zeros(n, dtype=np.int64)
        types[split + 1:] = 1
        out.append((ids, types, int(rng.integers(0, 2)) if labelled else None))
    return out


FORMS = {
    "dict uint16": lambda ids, types, label: {"input_ids": ids.astype(np.uint16), "token_type_ids":
                                              types.astype(np.uint16), "next_sentence_label": label},
    "dict int32": lambda ids, types, label: {"input_ids": ids.astype(np.int32), "token_type_ids":
                                             types.astype(np.int32), "next_sentence_label": label},
    "dict lists": lambda ids, types, label: {"input_ids": ids.tolist(), "token_type_ids": types.tolist(),
                                             "next_sentence_label": label},
    "tuple int64": lambda ids, types, label: (ids, types, label),
    "tuple tensors": lambda ids, types, label: (torch.from_numpy(ids).int(), torch.from_numpy(types), label),
    "strided uint32": lambda ids, types, label: (np.repeat(ids.astype(np.uint32), 2)[::2], None, label),
    "bare list": lambda ids, types, label: ids.tolist(),
    "bare uint16": lambda ids, types, label: ids.astype(np.uint16),
}


def assert_same_batch(fast, slow):
    assert list(fast) == list(slow)
    for key, value in slow.items():
        if isinstance(value, torch.Tensor):
            assert fast[key].dtype == value.dtype and torch.equal(fast[key], value), key
        else:
            assert fast[key] == value, key


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("options", [dict(), dict(return_unpad_metadata=True, pad_to_multiple_of=None),
                                     dict(packing=True), dict(whole_word_mask=True, mlm_probability=0.4)],
                         ids=["padded", "metadata", "packed", "whole-word"])
def test_cpp_path_gives_the_python_paths_batch(form, options):
    parts = pairs(23, 48, seed=len(form))
    labelled = form.startswith(("dict", "tuple"))
    examples = [FORMS[form](ids, types, label if labelled else None) for ids, types, label in parts]
    ours = collator(**options)
    fast = _extension.load().collate_mlm(examples, ours.max_len, ours.pad_to_multiple_of, ours.packing,
                                         ours.return_unpad_metadata, PAD, ours._special_ids, MASK, VOCAB,
                                         ours.mlm_probability, 0.8, 0.1,
                                         CONTINUATION if ours.whole_word_mask else None, 1234)
    assert isinstance(fast, dict), f"the C++ path did not read example {fast}"
    slow = ours._collate_in_python(examples, 1234)
    assert_same_batch(fast, slow)
    assert ("next_sentence_label" in fast) == labelled
    assert (fast["labels"] != -100).sum() > 0
    assert collator(**options)(examples, seed=1234).keys() == fast.keys()


def test_masks_are_mask_tokens_on_the_padded_batch():
    examples = [{"input_ids": ids.astype(np.uint16)} for ids, _, _ in pairs(9, 40, seed=3)]
    batch = collator(pad_to_multiple_of=None)(examples, seed=77)
    original = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
    expected_ids, expected_labels = mask_tokens(original, mask_token_id=MASK, vocab_size=VOCAB,
                                                special_token_ids=(PAD, MASK, CLS, SEP), seed=77)
    assert torch.equal(batch["input_ids"], expected_ids) and torch.equal(batch["labels"], expected_labels)
    assert torch.equal(batch["masked_positions"], torch.nonzero(expected_labels.flatten() != -100).flatten())


class Labelled(UserDict):
    """A Mapping that is not a dict: read by the Python path."""


UNUSUAL = {
    "numpy label": lambda ids, types, label: {"input_ids": ids, "token_type_ids": types,
                                              "next_sentence_label": np.int64(label)},
    "mapping": lambda ids, types, label: Labelled(input_ids=ids, token_type_ids=types, next_sentence_label=label),
    "list of numpy ints": lambda ids, types, label: (list(ids), types, label),
    "big-endian": lambda ids, types, label: (ids.astype(">i4"), types, label),
    "int16 tensor": lambda ids, types, label: (torch.from_numpy(ids).short(), types, label),
}


@pytest.mark.parametrize("form", sorted(UNUSUAL))
def test_unusual_forms_take_the_python_path_with_the_same_masks(form):
    parts = pairs(12, 40, seed=5)
    examples = [FORMS["tuple int64"](*part) for part in parts]
    examples[4] = UNUSUAL[form](*parts[4])
    ours = collator()
    answer = _extension.load().collate_mlm(examples, ours.max_len, 8, False, False, PAD, ours._special_ids, MASK,
                                           VOCAB, 0.15, 0.8, 0.1, None, 9)
    if form != "int16 tensor":
        assert answer == 4, "the C++ path should hand this example to the Python path"
    assert_same_batch(ours(examples, seed=9), collator()([FORMS["tuple int64"](*part) for part in parts], seed=9))


def test_bad_examples_in_arrays_give_clear_errors():
    good = np.array([CLS, 11, SEP], dtype=np.uint16)
    with pytest.raises(ValueError, match=r"input_ids\[1, 1\] = 1200 is outside the vocabulary"):
        collator()([good, np.array([CLS, 1200, SEP], dtype=np.uint16)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        collator()([good, np.array([CLS, -3, SEP], dtype=np.int32)])
    with pytest.raises(ValueError, match="example 1 has 49 tokens"):
        collator()([good, np.full(49, 11, dtype=np.int32)])
    with pytest.raises(ValueError, match="example 0 has 0 tokens"):
        collator()([np.zeros(0, dtype=np.uint16)])
    with pytest.raises(TypeError, match="example 1: input_ids must hold integers"):
        collator()([good, np.array([True, False])])
    with pytest.raises(ValueError, match="example 0: token_type_ids has 2 entries"):
        collator()([{"input_ids": good, "token_type_ids": np.zeros(2, dtype=np.uint16)}])
    with pytest.raises(ValueError, match="every example or for none"):
        collator()([{"input_ids": good, "next_sentence_label": 1}, {"input_ids": good}])


def test_the_cpp_call_checks_its_arguments():
    collate = _extension.load().collate_mlm
    specials = torch.tensor([PAD, MASK], dtype=torch.int64)
    args = dict(max_len=8, pad_to_multiple_of=None, packing=False, return_unpad_metadata=False, pad_token_id=PAD,
                special_ids=specials, mask_token_id=MASK, vocab_size=VOCAB, mlm_probability=0.15, mask_ratio=0.8,
                random_ratio=0.1, is_continuation=None, seed=0)
    assert isinstance(collate([[CLS, 5, SEP]], **args), dict)
    with pytest.raises(TypeError, match="examples must be a list or tuple"):
        collate(iter([[CLS, 5, SEP]]), **args)
    with pytest.raises(ValueError, match="at least one example"):
        collate([], **args)
    for name, value, message in (("max_len", 0, "max_len must be >= 1"),
                                 ("pad_to_multiple_of", 0, "pad_to_multiple_of must be >= 1"),
                                 ("pad_token_id", VOCAB, "pad_token_id 1000 is outside"),
                                 ("mlm_probability", 2.0, "probabilities must be in"),
                                 ("special_ids", specials.int(), "special_ids must be a 1-D int64")):
        with pytest.raises((ValueError, RuntimeError), match=message):
            collate([[CLS, 5, SEP]], **{**args, name: value})
    with pytest.raises(ValueError, match="packing needs the unpad metadata"):
        collate([[CLS, 5, SEP]], **{**args, "packing": True})


def test_words_running_across_packed_sequences_are_masked_as_in_python():
    # No special tokens: a packed row holds sequences back to back, and a "##" piece at the start of one
    # continues the word that ends the one before it, in both paths alike.
    rng = np.random.default_rng(8)
    examples = [rng.integers(4, VOCAB, int(rng.integers(1, 20))).tolist() for _ in range(40)]
    ours = collator(packing=True, whole_word_mask=True, mlm_probability=0.5)
    assert_same_batch(ours(examples, seed=21), ours._collate_in_python(examples, 21))


def test_out_of_vocabulary_ids_are_named_with_whole_word_masking_too():
    with pytest.raises(ValueError, match=r"input_ids\[0, 2\] = 5000 is outside the vocabulary \[0, 1000\)"):
        collator(whole_word_mask=True)([np.array([CLS, 7, 5000, SEP], dtype=np.int32)])
