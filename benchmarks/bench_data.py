"""Data path: WordPiece training, tokenizing into shards, and BERT pair generation (per process and
through DataLoader workers). All of it runs on the CPU whatever ``--device`` says; ``--device cuda``
measures the real sizes (the built-in corpus, BERT's 30,522-token vocabulary, seq 128 and 512).

Reported as tokens/s (``tokens_per_s``: words for vocabulary training, tokens otherwise), to compare
with the training step's tokens/s: data loading must stay well ahead of it (a bert-base step at seq
128 on an H200 at the 55% MFU goal consumes roughly 6,000 sequences, ~770 k tokens, per second).
"""
from __future__ import annotations

import functools
import itertools
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .common import Row, Timing, _timing, cpu_conditions, script_main, time_fn

_WORDS = ("the of and to in is that for it as with was on be by this are from at or an which have not "
          "model data token sentence training layer attention vector value returns function object").split()


def _generated_corpus(path: Path, documents: int, seed: int = 0) -> Path:
    """BERT-format text of random English-like sentences (the quick CPU case)."""
    rng = np.random.default_rng(seed)
    blocks = []
    for _ in range(documents):
        sentences = []
        for _ in range(int(rng.integers(4, 30))):
            words = [_WORDS[i] for i in rng.integers(0, len(_WORDS), int(rng.integers(5, 25)))]
            sentences.append(" ".join(words).capitalize() + ".")
        blocks.append("\n".join(sentences))
    path.write_text("\n\n".join(blocks) + "\n")
    return path


def _time_once(fn) -> Timing:
    """One timed call (for work that writes files and is too slow to repeat many times)."""
    import time

    start = time.perf_counter()
    fn()
    ms = (time.perf_counter() - start) * 1e3
    return Timing(ms, ms, ms)


def _get_items(dataset, count):
    return [dataset[i] for i in range(count)]


def _drain(loader, batches, loaded_tokens):
    """Load ``batches`` batches; appends the tokens they hold to ``loaded_tokens``."""
    loaded_tokens.append(sum(len(example["input_ids"]) for batch in itertools.islice(iter(loader), batches)
                             for example in batch))


def _builtin_times(tmp: Path, copies: int) -> Path:
    """The built-in corpus (real prose) ``copies`` times over: ~20 MB at 8, the size the goals are set at."""
    from fastbert.data.builtin import builtin_corpus_path

    text = builtin_corpus_path().read_text(encoding="utf-8")
    path = tmp / f"builtin_x{copies}.txt"
    path.write_text((text.rstrip("\n") + "\n\n") * copies, encoding="utf-8")
    return path


def _prepare_rows(tmp: Path, corpus, tokenizer_dir: Path, quick: bool) -> list[Row]:
    """Preparing a corpus with a given vocabulary at 1 and 2 worker processes, beside the ceiling: the
    tokenizer alone (all its threads) on the already split sentences. Interleaved, 3 rounds."""
    from fastbert.data import load_wordpiece, prepare_corpus

    wordpiece = load_wordpiece(tokenizer_dir)
    sentences = [s for document in corpus.documents() for s in document]
    megabytes = sum(path.stat().st_size for _, path in corpus._files) / 1e6
    runs = itertools.count()
    cases = {"workers1": lambda: prepare_corpus(corpus, tmp / f"w{next(runs)}", tokenizer=tokenizer_dir, workers=1),
             "workers2": lambda: prepare_corpus(corpus, tmp / f"w{next(runs)}", tokenizer=tokenizer_dir, workers=2),
             "encode": lambda: wordpiece.encode_batch(sentences)}
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(1 if quick else 3):
        for name, fn in cases.items():
            samples[name].append(_time_once(fn).median)
    tokens = sum(map(len, wordpiece.encode_batch(sentences)))
    shape = f"{megabytes:.1f} MB, {tokens} tok"
    return [Row.measured("data_prepare", "tokenizers" if name == "encode" else "fastbert", name, "-", shape,
                         _timing(values), tokens_per_s=tokens / (np.median(values) * 1e-3))
            for name, values in samples.items()]


def summary(rows: list[Row]) -> str:
    """MB/s and tokens/s of preparing with a vocabulary at 1 and 2 workers and of the tokenizer alone,
    with the two ratios the goals are set on."""
    measured = {r.mode: r for r in rows if r.op == "data_prepare" and r.ms_median is not None}
    lines = []
    for mode, r in measured.items():
        megabytes = float(r.shape.split(" MB")[0])
        lines.append(f"prepare {mode:<9} {r.shape:<24} {megabytes / (r.ms_median * 1e-3):6.2f} MB/s "
                     f"{r.tokens_per_s:12,.0f} tokens/s")
    if {"workers1", "workers2", "encode"} <= set(measured):
        two = measured["workers2"].ms_median
        lines.append(f"2 workers vs 1: {measured['workers1'].ms_median / two:.2f}x (goal >= 1.8x); 2 workers vs the "
                     f"tokenizer alone: {measured['encode'].ms_median / two:.2f}x (goal >= 0.8x)")
    lines.append(f"measured on {cpu_conditions()}")
    return "\n".join(lines)


def run(device: str, dtype: str, quick: bool) -> list[Row]:
    from fastbert.data import BertPairDataset, Corpus, prepare_corpus, train_wordpiece

    real_sizes = device == "cuda" and not quick
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fastbert-bench-data-") as tmp:
        tmp = Path(tmp)
        source = "builtin" if device == "cuda" else str(_generated_corpus(tmp / "corpus.txt", 60 if quick else 400))
        corpus_name = "builtin" if source == "builtin" else "generated"
        vocab_size = 30522 if real_sizes else 2000
        corpus = Corpus(source)
        sentences = [s for document in corpus.documents() for s in document]
        corpus_tokens = sum(len(s.split()) for s in sentences)  # words: the trainer's unit of work

        timing = _time_once(lambda: train_wordpiece(sentences, vocab_size=vocab_size))
        rows.append(Row.measured("data_vocab", "tokenizers", "train", "-", f"{corpus_name} V={vocab_size}",
                                 timing, tokens_per_s=corpus_tokens / (timing.median * 1e-3)))

        data = prepare_corpus(corpus, tmp / "data", vocab_size=vocab_size)
        if quick:
            rows += _prepare_rows(tmp, corpus, tmp / "data", quick)
        else:  # real prose, with a vocabulary trained on it
            vocabulary = tmp / "data" if corpus_name == "builtin" else tmp / "builtin-vocab"
            if vocabulary != tmp / "data":
                prepare_corpus(Corpus("builtin"), vocabulary, vocab_size=8192)
            rows += _prepare_rows(tmp, Corpus(_builtin_times(tmp, 8)), vocabulary, quick)

        for seq_len in ((128,) if quick else (128, 512)):
            dataset = BertPairDataset(data, seq_len)
            count = min(len(dataset), 200 if quick else 2000)
            tokens = sum(len(dataset[i]["input_ids"]) for i in range(count))
            timing = time_fn(functools.partial(_get_items, dataset, count), "cpu", quick=quick)
            rows.append(Row.measured("data_pairs", "fastbert", "getitem", "-", f"seq{seq_len} x{count}", timing,
                                     tokens_per_s=tokens / (timing.median * 1e-3)))
            if quick:
                continue
            workers = min(4, os.cpu_count() or 1)
            loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True, num_workers=workers,
                                                 collate_fn=list, persistent_workers=True, prefetch_factor=4)
            batches = min(len(loader), 100)
            sum(1 for _ in itertools.islice(iter(loader), 2))  # start the workers before timing
            loaded_tokens = []
            timing = _time_once(functools.partial(_drain, loader, batches, loaded_tokens))
            rows.append(Row.measured("data_pairs", "dataloader", f"workers{workers}", "-",
                                     f"seq{seq_len} b64x{batches}", timing,
                                     tokens_per_s=loaded_tokens[0] / (timing.median * 1e-3)))
    return rows


if __name__ == "__main__":
    script_main(run, __doc__, default_dtype="fp32", summary=summary)
