"""MLM masking throughput: fastbert's C++ ``mask_tokens`` (1 thread and all threads, with and without
whole-word masking) and ``MLMCollator`` vs Hugging Face's ``DataCollatorForLanguageModeling`` (and its
whole-word option).

Masking runs on the CPU in the data loader, so this benchmark measures the CPU even with
``--device cuda`` (where it uses the real sizes, as on the CPU without ``--quick``). The masking batch
is BERT-shaped, ``[CLS] A [SEP] B [SEP]`` filling every row, ids drawn from a 30522-token WordPiece-like
vocabulary (a fifth of it "##" pieces). GB/s counts 24 bytes per token (read the ids, write the masked
ids and the labels); the summary prints tokens/s and speed-ups over HF's collator.

The collators (end to end: examples in, padded masked batch out) are measured on one thread at both
32x128 and 256x512 whatever the flags, on what the dataset yields: dicts of ragged ``input_ids`` and
``token_type_ids`` (lengths uniform in [L/2, L]) as uint16 arrays, int32 arrays or lists of ints, and
an NSP label. Ours and HF's run alternately on the same examples (one call each per round), so a
busy machine slows both alike; the summary gives the medians and their ratio, wall-clock and
(more telling on a shared machine) thread CPU time.

    python -m benchmarks.bench_masking --device cpu --dtype fp32 [--quick]
"""
from __future__ import annotations

import contextlib
import functools
import os
import statistics
import tempfile
import time
import warnings
from typing import Callable, Iterator

import numpy as np
import torch

from .common import Row, Timing, script_main, time_fn
from fastbert import masking
from fastbert.data import MLMCollator

VOCAB_SIZE = 30522
PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103
BYTES_PER_TOKEN = 24
OP = "masking"
COLLATOR_SHAPES = ((32, 128), (256, 512))
EXAMPLE_FORMS = ("uint16", "int32", "list")


def provider_name(base: str, threads_used: int) -> str:
    """``fastbert`` / ``hf_collator`` ... on one thread (what a DataLoader worker gets); ``_<n>t`` beyond."""
    return base if threads_used == 1 else f"{base}_{threads_used}t"


def synthetic_vocab() -> list[str]:
    """BERT-uncased's layout ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103) with made-up
    pieces, every fifth a "##" continuation."""
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [f"##p{i}" if i % 5 == 0 else f"w{i}" for i in range(VOCAB_SIZE - len(tokens))]
    return tokens


def bert_batch(rows: int, seqlen: int, *, seed: int = 0) -> torch.Tensor:
    """Full rows of [CLS] A [SEP] B [SEP], random non-special ids."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(MASK + 1, VOCAB_SIZE, (rows, seqlen), generator=gen)
    split = torch.randint(seqlen // 4, 3 * seqlen // 4, (rows,), generator=gen)
    ids[:, 0] = CLS
    ids[torch.arange(rows), split] = SEP
    ids[:, -1] = SEP
    return ids


def offsets_for(ids: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Character offsets a fast tokenizer would give: a word's pieces touch, words are one space apart
    (what HF's whole-word masking reads word boundaries from)."""
    gap = starts.long()  # a new word starts one character after the previous piece ends
    ends = torch.cumsum(gap + 3, dim=1)  # every piece is 3 characters long
    return torch.stack([ends - 3, ends], dim=-1)


def dataset_examples(rows: int, seqlen: int, form: str, *, seed: int = 0) -> list[dict]:
    """What BertPairDataset yields: ragged [CLS] A [SEP] B [SEP] with segment ids and an NSP label;
    ids and segments as numpy arrays of ``form`` (uint16 / int32) or as lists of ints (``list``)."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(rows):
        length = int(rng.integers(seqlen // 2, seqlen + 1))
        split = int(rng.integers(1, length - 1))
        ids = rng.integers(MASK + 1, VOCAB_SIZE, length)
        ids[0], ids[split], ids[-1] = CLS, SEP, SEP
        types = np.zeros(length, dtype=np.int64)
        types[split + 1:] = 1
        if form == "list":
            ids, types = ids.tolist(), types.tolist()
        else:
            ids, types = ids.astype(form), types.astype(form)
        examples.append({"input_ids": ids, "token_type_ids": types, "next_sentence_label": int(rng.integers(0, 2))})
    return examples


def side_by_side(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, tuple[Timing, Timing]]:
    """Times the calls alternately, one timed call each per round (right after an untimed one), so
    that load on the machine falls on all of them alike. Returns per call (wall-clock, thread CPU time) as (median, p20,
    p80) ms: on a one-thread call the CPU time leaves out the time other processes held the core,
    which on a shared machine is most of a short call's wall-clock spread."""
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()
    for _ in range(rounds):
        for name, call in calls.items():
            call()  # each timed call follows one of its own, as in a loop: what ran before is not billed
            start, start_cpu = time.perf_counter(), time.thread_time()
            call()
            cpu[name].append((time.thread_time() - start_cpu) * 1e3)
            wall[name].append((time.perf_counter() - start) * 1e3)
    return {name: (_timing(wall[name]), _timing(cpu[name])) for name in calls}


def _timing(values: list[float]) -> Timing:
    q = statistics.quantiles(values, n=5) if len(values) >= 5 else [min(values)] * 4
    return Timing(statistics.median(values), q[0], q[3])


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def hf_collators(vocab_path: str):
    """(plain, whole-word) HF collators; None when transformers is missing or has no whole-word option."""
    try:
        from transformers import BertTokenizerFast, DataCollatorForLanguageModeling
    except ImportError:
        return None, None
    tokenizer = BertTokenizerFast(vocab_file=vocab_path, do_lower_case=True)
    plain = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF turns the 80/10/10 into 100% [MASK] for whole words, and says so
        try:
            whole = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, whole_word_mask=True)
        except TypeError:
            whole = None
    return plain, whole


def run(device: str, dtype: str, quick: bool) -> list[Row]:
    rows_count, seqlen = (32, 128) if device == "cpu" and quick else (256, 512)
    shape = f"{rows_count}x{seqlen}"
    tokens = rows_count * seqlen
    ids = bert_batch(rows_count, seqlen)
    vocab = synthetic_vocab()
    table = masking.continuation_table(vocab)
    starts = masking.word_starts(ids, table)
    options = dict(mask_token_id=MASK, vocab_size=VOCAB_SIZE, special_token_ids=(PAD, CLS, SEP))
    all_threads = torch.get_num_threads()
    results: list[Row] = []

    def measure(provider: str, mode: str, fn: Callable[[], object], count: int) -> None:
        with threads(count):
            timing = time_fn(fn, "cpu", quick=quick)
        results.append(Row.measured(OP, provider, mode, "int64", shape, timing,
                                    bytes_moved=BYTES_PER_TOKEN * tokens))

    thread_counts = sorted({1, all_threads})
    for count in thread_counts:
        measure(provider_name("fastbert", count), "mlm", lambda: masking.mask_tokens(ids, **options), count)
        # Whole words: the C++ also derives the word starts from the vocabulary's "##" table here.
        measure(provider_name("fastbert", count), "wwm",
                lambda: masking.mask_tokens(ids, word_starts=masking.word_starts(ids, table), **options), count)

    examples = [{"input_ids": row} for row in ids.tolist()]
    with tempfile.TemporaryDirectory() as tmp:
        vocab_path = os.path.join(tmp, "vocab.txt")
        with open(vocab_path, "w", encoding="utf-8") as handle:
            handle.write("\n".join(vocab) + "\n")
        hf_plain, hf_whole = hf_collators(vocab_path)
        ours = {seqlen: MLMCollator.from_vocab(vocab_path, max_len=seqlen) for _, seqlen in COLLATOR_SHAPES}
        ours_whole = {seqlen: MLMCollator.from_vocab(vocab_path, max_len=seqlen, whole_word_mask=True)
                      for _, seqlen in COLLATOR_SHAPES}

    if hf_plain is None:
        results.append(Row.unsupported(OP, "hf_collator", "mlm", "int64", shape,
                                       "transformers is not installed"))
    special = torch.isin(ids, torch.tensor([PAD, CLS, SEP]))
    offsets = offsets_for(ids, starts)
    for count in thread_counts:
        if hf_plain is None:
            continue
        # HF's collator on full rows (lists of ints), the baseline of mask_tokens above.
        measure(provider_name("hf_collator", count), "mlm", lambda: hf_plain(examples), count)
        # HF's masking alone, given the special-token mask: its best case, no per-row Python pass.
        measure(provider_name("hf_mask", count), "mlm",
                lambda: hf_plain.torch_mask_tokens(ids.clone(), special_tokens_mask=special), count)
        if hf_whole is None:
            results.append(Row.unsupported(OP, provider_name("hf_mask", count), "wwm", "int64", shape,
                                           "this transformers has no whole_word_mask option"))
        else:
            measure(provider_name("hf_mask", count), "wwm", lambda: hf_whole.torch_mask_tokens(
                ids.clone(), special_tokens_mask=special, offset_mapping=offsets), count)

    # The collators end to end, one thread (a DataLoader worker's), both shapes, side by side.
    with threads(1):
        for collator_rows, collator_len in COLLATOR_SHAPES:
            rounds = (5 if quick else 15) * (4 if collator_len <= 128 else 1)
            for form in EXAMPLE_FORMS:
                batch = dataset_examples(collator_rows, collator_len, form)
                calls = {"fastbert_collator": functools.partial(ours[collator_len], batch)}
                if form == "uint16":
                    calls["fastbert_collator wwm"] = functools.partial(ours_whole[collator_len], batch)
                if hf_plain is not None:
                    calls["hf_collator"] = functools.partial(hf_plain, batch)
                label = f"{collator_rows}x{collator_len} ragged {form}"
                for name, (wall, cpu) in side_by_side(calls, rounds).items():
                    provider, _, mode = name.partition(" ")
                    for suffix, timing in (("", wall), ("_cpu", cpu)):  # mode mlm: wall-clock; mlm_cpu: CPU time
                        results.append(Row.measured(OP, provider, (mode or "mlm") + suffix, "int64", label, timing,
                                                    bytes_moved=BYTES_PER_TOKEN * collator_rows * collator_len))
    return results


def tokens_per_second(row: Row) -> float:
    rows_count, seqlen = (int(n) for n in row.shape.split()[0].split("x"))  # batch slots, padding included
    return rows_count * seqlen / (row.ms_median * 1e-3)


def summary(rows: list[Row]) -> str:
    """M tokens/s per row, and the speed-up over HF's fastest collator call (1 thread or all) and over
    HF's fastest masking-only call in the same mode, on full rows; then the collators side by side."""
    measured = [r for r in rows if not r.note]
    full_rows = [r for r in measured if "ragged" not in r.shape]

    def best(prefix: str, mode: str) -> float | None:
        speeds = [tokens_per_second(r) for r in full_rows if r.provider.startswith(prefix) and r.mode == mode]
        return max(speeds, default=None)

    lines = [f"{'provider':<16} {'mode':<5} {'M tokens/s':>11} {'x hf_collator':>14} {'x hf_mask':>10}"]
    for r in full_rows:
        speed = tokens_per_second(r)
        vs_collator, vs_mask = best("hf_collator", "mlm"), best("hf_mask", r.mode)
        lines.append(f"{r.provider:<16} {r.mode:<5} {speed / 1e6:11.1f} "
                     f"{speed / vs_collator if vs_collator else float('nan'):14.1f} "
                     f"{speed / vs_mask if vs_mask else float('nan'):10.1f}")
    ragged = [r for r in measured if "ragged" in r.shape]
    if ragged:
        lines += ["", "collators end to end, 1 thread, side by side: median ms per batch, wall-clock (thread CPU time)",
                  f"{'batch':<24} {'fastbert':>16} {'hf':>18} {'x hf':>12} {'fastbert wwm':>16}"]
        for label in dict.fromkeys(r.shape for r in ragged):
            ms = {(r.provider, r.mode): r.ms_median for r in ragged if r.shape == label}

            def pair(provider: str, mode: str, digits: int, ms: dict = ms) -> str:
                wall, cpu = ms.get((provider, mode)), ms.get((provider, mode + "_cpu"))
                return "-" if wall is None else f"{wall:.{digits}f} ({cpu:.{digits}f})"

            ours, hf = ms.get(("fastbert_collator", "mlm")), ms.get(("hf_collator", "mlm"))
            ratio = "-" if not (ours and hf) else \
                f"{hf / ours:.1f} ({ms[('hf_collator', 'mlm_cpu')] / ms[('fastbert_collator', 'mlm_cpu')]:.1f})"
            lines.append(f"{label:<24} {pair('fastbert_collator', 'mlm', 3):>16} {pair('hf_collator', 'mlm', 2):>18} "
                         f"{ratio:>12} {pair('fastbert_collator', 'wwm', 3):>16}")
    return "\n".join(lines)


if __name__ == "__main__":
    script_main(run, __doc__, default_device="cpu", default_dtype="fp32", summary=summary)
