"""MLM masking throughput: fastbert's C++ ``mask_tokens`` (1 thread and all threads, with and without
whole-word masking) and ``MLMCollator`` vs Hugging Face's ``DataCollatorForLanguageModeling`` (and its
whole-word option), on the same batch in one run.

Masking runs on the CPU in the data loader, so this benchmark measures the CPU even with
``--device cuda`` (where it uses the real sizes, as on the CPU without ``--quick``). The batch is
BERT-shaped, ``[CLS] A [SEP] B [SEP]`` filling every row, ids drawn from a 30522-token WordPiece-like
vocabulary (a fifth of it "##" pieces). GB/s counts 24 bytes per token (read the ids, write the masked
ids and the labels); the summary prints tokens/s and speed-ups over HF's collator.

    python -m benchmarks.bench_masking --device cpu --dtype fp32 [--quick]
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from typing import Callable, Iterator

import torch

from .common import Row, script_main, time_fn
from fastbert import masking
from fastbert.data import MLMCollator

VOCAB_SIZE = 30522
PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103
BYTES_PER_TOKEN = 24
OP = "masking"


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
        ours = MLMCollator.from_vocab(vocab_path, max_len=seqlen)
        ours_whole = MLMCollator.from_vocab(vocab_path, max_len=seqlen, whole_word_mask=True)
        hf_plain, hf_whole = hf_collators(vocab_path)

    if hf_plain is None:
        results.append(Row.unsupported(OP, "hf_collator", "mlm", "int64", shape,
                                       "transformers is not installed"))
    special = torch.isin(ids, torch.tensor([PAD, CLS, SEP]))
    offsets = offsets_for(ids, starts)
    for count in thread_counts:
        # Whole collator calls (pad a list of examples, then mask), as a DataLoader worker runs them.
        measure(provider_name("fastbert_collator", count), "mlm", lambda: ours(examples), count)
        measure(provider_name("fastbert_collator", count), "wwm", lambda: ours_whole(examples), count)
        if hf_plain is None:
            continue
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
    return results


def tokens_per_second(row: Row) -> float:
    rows_count, seqlen = (int(n) for n in row.shape.split("x"))
    return rows_count * seqlen / (row.ms_median * 1e-3)


def summary(rows: list[Row]) -> str:
    """M tokens/s per row, and the speed-up over HF's fastest collator call (1 thread or all) and over
    HF's fastest masking-only call in the same mode."""
    measured = [r for r in rows if not r.note]

    def best(prefix: str, mode: str) -> float | None:
        speeds = [tokens_per_second(r) for r in measured if r.provider.startswith(prefix) and r.mode == mode]
        return max(speeds, default=None)

    lines = [f"{'provider':<16} {'mode':<5} {'M tokens/s':>11} {'x hf_collator':>14} {'x hf_mask':>10}"]
    for r in measured:
        speed = tokens_per_second(r)
        vs_collator, vs_mask = best("hf_collator", "mlm"), best("hf_mask", r.mode)
        lines.append(f"{r.provider:<16} {r.mode:<5} {speed / 1e6:11.1f} "
                     f"{speed / vs_collator if vs_collator else float('nan'):14.1f} "
                     f"{speed / vs_mask if vs_mask else float('nan'):10.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    script_main(run, __doc__, default_device="cpu", default_dtype="fp32", summary=summary)
