"""The pre-training data path as the trainer uses it: the prepared corpus, BERT pairs, MLM masking
seeded by the samples' indices, the DataLoader and the batches' move to the device.

Every batch is a pure function of (seed, the sample indices): a resumed run, with any number of
DataLoader workers, sees the batches and masks a straight run sees.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from fastbert.pretrain import distributed
from fastbert.pretrain.config import PretrainConfig

# What the model's forward takes from a collated batch (the collator adds bookkeeping beside them).
MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels", "next_sentence_label", "position_ids",
              "indices", "cu_seqlens", "max_seqlen", "masked_positions")


def load_data(config: PretrainConfig, out: Path, info: distributed.DistInfo):
    """The prepared data: ``--data`` as it is, or ``--corpus`` prepared (or reused) in ``OUT/data``.

    Continued pre-training (``--model`` a checkpoint folder) reads the text with the model's own
    tokenizer: its embeddings belong to that vocabulary, so a ``--tokenizer`` or ``--data`` with
    another one is refused, and none is trained."""
    from fastbert.data.corpus import BUILTIN
    from fastbert.data.prepare import load_prepared, prepare_corpus

    model_vocab = _model_vocabulary(config)
    if config.data:
        data = load_prepared(config.data)
        if model_vocab is not None and data.vocab_sha256 != model_vocab:
            raise ValueError(f"--data {config.data} was tokenized with another vocabulary than --model {config.model}'s "
                             "own: its ids would stand for other words in the model's embeddings. Prepare the corpus "
                             f"with the model's tokenizer (fastbert prepare --tokenizer {config.model}) or pass --corpus")
        return data
    data_dir = out / "data"
    tokenizer = config.tokenizer if config.tokenizer is not None or model_vocab is None else config.model
    if info.is_main:  # rank 0 prepares (or reuses); the others wait and load
        prepare_corpus(config.corpus or [BUILTIN], data_dir, tokenizer=tokenizer, vocab_size=config.vocab_size)
    distributed.barrier(info)
    return load_prepared(data_dir)


def _model_vocabulary(config: PretrainConfig) -> str | None:
    """The vocabulary (its sha256) of a ``--model`` checkpoint folder; None for a preset (a fresh model).
    A folder without a tokenizer needs ``--tokenizer`` (trusted to be the model's); one whose vocabulary
    differs from ``--tokenizer``'s is refused."""
    from fastbert.data.tokenizer import load_wordpiece

    folder = Path(config.model)
    if not folder.is_dir():
        return None
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        if config.tokenizer is None and config.data is None:
            raise ValueError(f"--model {folder} holds no tokenizer (tokenizer.json or vocab.txt): pass --tokenizer with "
                             "the vocabulary its embeddings were trained on (a new one would give every id another "
                             "meaning)")
        return None
    vocabulary = load_wordpiece(folder).vocab_sha256()
    if config.tokenizer is not None and load_wordpiece(config.tokenizer).vocab_sha256() != vocabulary:
        raise ValueError(f"--tokenizer {config.tokenizer} has another vocabulary than --model {folder}'s own: the "
                         "model's embeddings belong to its vocabulary. Leave --tokenizer out to use the model's")
    return vocabulary


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items() if k in MODEL_KEYS and v is not None}


def _collator(config: PretrainConfig, data, device: torch.device, seq_len: int):
    from fastbert import masking
    from fastbert.data import MLMCollator

    # [UNK] is masked like any other token, as in BERT; the other special tokens never are.
    special = tuple(i for i in data.special_token_ids if i != data.unk_id)
    is_continuation = None
    if config.whole_word_mask:
        is_continuation = masking.continuation_table(masking.read_vocab(Path(data.data_dir) / "vocab.txt"))
    return MLMCollator(vocab_size=data.vocab_size, mask_token_id=data.mask_id, pad_token_id=data.pad_id,
                       special_token_ids=special, is_continuation=is_continuation, max_len=seq_len,
                       pad_to_multiple_of=8, mlm_probability=config.mlm_probability,
                       whole_word_mask=config.whole_word_mask, packing=config.packing,
                       # On a GPU the model then runs unpadded on metadata made in the workers: no device sync.
                       return_unpad_metadata=config.packing or device.type == "cuda")


class _IndexedDataset(torch.utils.data.Dataset):
    """Yields (index, example) so the collate step can seed its masking from the sample indices."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return i, self.dataset[i]


class _SeededCollate:
    """MLM masking seeded by (run seed, the batch's sample indices): the masks of a batch do not depend
    on worker processes or on how many batches came before, so a resumed run sees the same ones."""

    def __init__(self, collator, seed: int):
        self.collator = collator
        self.seed = seed

    def __call__(self, items):
        indices = [i for i, _ in items]
        batch_seed = (self.seed * 1_000_003 + indices[0] * 7_919 + len(indices)) % (2**62)
        return self.collator([example for _, example in items], seed=batch_seed)


def train_batches(config: PretrainConfig, data, info: distributed.DistInfo, step: int,
                  random_next_prob: float) -> tuple[Any, Iterator]:
    """(the training pairs, an iterator over this rank's collated CPU batches from the sample after ``step``)
    of the phase that trains step ``step + 1``; each phase reads its own pairs from its own first sample.
    ``random_next_prob``: the objective's share of pairs whose segment B is another document's."""
    from fastbert.data.pairs import BertPairDataset, PretrainSampler

    phase = config.phase_at(step)
    train_set = BertPairDataset(data.data_dir, phase.seq_len, short_seq_prob=config.short_seq_prob,
                                random_next_prob=random_next_prob, seed=config.seed, split="train",
                                eval_fraction=config.eval_fraction)
    collate = _SeededCollate(_collator(config, data, info.device, phase.seq_len), config.seed)
    sampler = PretrainSampler(len(train_set), seed=config.seed, rank=info.rank, world_size=info.world_size,
                              start_index=(step - phase.start) * config.samples_per_step)
    workers = config.num_workers
    # Its own generator: creating the iterator must not draw from the global RNG (the dropout stream).
    generator = torch.Generator().manual_seed(config.seed * 1009 + info.rank)
    loader = torch.utils.data.DataLoader(
        _IndexedDataset(train_set), batch_size=config.batch_size, sampler=sampler, collate_fn=collate,
        generator=generator, num_workers=workers, pin_memory=info.device.type == "cuda",
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None, drop_last=True,
    )
    return train_set, iter(loader)


def eval_batches(config: PretrainConfig, data, device: torch.device, random_next_prob: float,
                 seq_len: int) -> list[dict]:
    """The held-out batches of ``seq_len``-token pairs, collated once (fixed masks, so evals along the run
    are comparable).

    ``eval_batches * batch_size`` pairs. When the held-out documents hold fewer, further passes over
    them draw new pairs (other starts, A/B cuts, random next sentences and masks), as BERT's
    ``dupe_factor`` does for its training data."""
    if not config.eval_batches:
        return []
    from fastbert.data.pairs import BertPairDataset

    wanted = config.eval_batches * config.batch_size
    pairs = []
    for repeat in range(wanted):  # bounded: every pass adds at least one pair
        eval_set = BertPairDataset(data.data_dir, seq_len, short_seq_prob=config.short_seq_prob,
                                   random_next_prob=random_next_prob, seed=config.seed + 7_919 * repeat, split="eval",
                                   eval_fraction=config.eval_fraction)
        pairs += [eval_set[i] for i in range(min(len(eval_set), wanted - len(pairs)))]
        if len(pairs) == wanted:
            break
    eval_collate = _SeededCollate(_collator(config, data, device, seq_len), config.seed + 1)
    return [eval_collate(list(enumerate(pairs[s:s + config.batch_size], start=s)))
            for s in range(0, len(pairs), config.batch_size)]
