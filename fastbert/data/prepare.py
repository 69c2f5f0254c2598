"""`fastbert prepare`: corpus → WordPiece vocabulary → token shards + index + metadata.json.

The output folder holds the tokenizer files (loadable by ``transformers.BertTokenizerFast``), the
shards (:mod:`fastbert.data.shards`) and ``metadata.json``, which is written last and atomically: a
folder without it is not a prepared folder, so an interrupted run is never taken for a finished one.
Re-running with the same inputs and settings finds the same fingerprint in ``metadata.json`` and
returns at once. Memory stays about one shard: documents are streamed, tokenized in batches and
written shard by shard.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import tokenizers

from fastbert._atomic import atomic_write_text
from fastbert._folder_lock import LOCK_NAME, FolderLock
from fastbert._hashing import file_sha256
from fastbert.data.corpus import Corpus, SourceLike
from fastbert.data.text import split_sentences
from fastbert.data.parallel_tokenize import tokenized_documents
from fastbert.data.shards import SHARD_PATTERN, ShardInfo, ShardWriter, TokenStore, shard_file, token_dtype_for
from fastbert.data.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    TOKENIZER_FILES,
    WordPieceTokenizer,
    load_wordpiece,
    train_wordpiece,
    vocab_sha256,
)

FORMAT_NAME = "fastbert-prepared"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
# Present while a run is writing; gone once metadata.json is in place.
IN_PROGRESS_FILE = ".prepare-in-progress"
DEFAULT_SHARD_TOKENS = 1 << 25  # 32 M tokens: 64 MB of uint16 per shard
DEFAULT_BATCH_LINES = 1024  # lines per chunk handed to a worker: small enough to balance 2+ workers on 20 MB


@dataclass(frozen=True)
class PreparedData:
    """A prepared data folder: what the dataset and the trainer need to know about it."""

    data_dir: Path
    vocab_size: int
    pad_id: int
    unk_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    special_token_ids: tuple[int, ...]  # (pad, unk, cls, sep, mask)
    num_documents: int
    num_sentences: int
    num_tokens: int
    tokenizer_files: tuple[Path, ...]  # vocab.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json
    token_dtype: str
    lowercase: bool
    vocab_sha256: str
    replaced_bytes: int  # undecodable input bytes replaced with U+FFFD
    fingerprint: str
    shards: tuple[ShardInfo, ...]
    reused: bool = False  # True when prepare_corpus found this folder already done

    def token_store(self) -> TokenStore:
        return TokenStore(self.data_dir, self.shards)

    def load_tokenizer(self) -> WordPieceTokenizer:
        return load_wordpiece(self.data_dir / "tokenizer.json")


def prepare_corpus(corpus: Corpus | SourceLike | Sequence[SourceLike], out_dir: str | os.PathLike, *,
                   tokenizer: str | os.PathLike | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE,
                   lowercase: bool | None = None, min_frequency: int = 2,
                   shard_tokens: int = DEFAULT_SHARD_TOKENS, batch_lines: int = DEFAULT_BATCH_LINES,
                   workers: int | None = None, vocab_sample: int | None = None, overwrite: bool = False,
                   cache_dir: SourceLike | None = None, progress: bool = False) -> PreparedData:
    """Tokenize ``corpus`` into ``out_dir`` and return what was written (or what was already there).

    corpus: a :class:`Corpus`, or sources for one (paths, folders, ``"builtin"``).
    tokenizer: ``vocab.txt``, ``tokenizer.json`` or a folder with one; None trains a WordPiece
        vocabulary of at most ``vocab_size`` tokens on the corpus (special ids 0..4).
    lowercase: None = True when training or for a bare ``vocab.txt``, else the tokenizer's own setting.
    shard_tokens: a shard is written once it holds this many tokens (at a document boundary).
    batch_lines: lines of raw documents per chunk handed to a worker (whole documents).
    workers: processes that split the documents into sentences and tokenize them (one thread each),
        while this one reads the corpus and writes the shards; None = the cores this process may use.
        The output is the same bytes whatever the number. Training a vocabulary uses as many threads
        (``RAYON_NUM_THREADS``, honoured when set before the first tokenizer call of the process, as
        the CLI does).
    vocab_sample: train the vocabulary on this many lines of the corpus (a uniform sample, the same one
        every time), not all of it, as BERT did; None = all. The corpus is then read twice, not three times.
    overwrite: replace a folder prepared from other inputs or settings (otherwise a ValueError).
    """
    if not isinstance(corpus, Corpus):
        corpus = Corpus(corpus, cache_dir=cache_dir)
    _check_positive("shard_tokens", shard_tokens)
    _check_positive("batch_lines", batch_lines)
    _check_positive("min_frequency", min_frequency)
    if workers is not None:
        _check_positive("workers", workers)
        os.environ["RAYON_NUM_THREADS"] = str(workers)
    else:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if vocab_sample is not None:
        _check_positive("vocab_sample", vocab_sample)
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output path {out_dir} exists and is not a folder")

    recipe = {
        "format_version": FORMAT_VERSION,
        "corpus": corpus.fingerprint(),
        "tokenizer": _tokenizer_recipe(tokenizer, vocab_size, lowercase, min_frequency, vocab_sample),
        "shard_tokens": shard_tokens,
    }
    fingerprint = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    out_dir.mkdir(parents=True, exist_ok=True)
    with FolderLock(out_dir):  # one prepare per folder: a second one stops here, naming the first
        done = _finished_run(out_dir, fingerprint, overwrite)
        if done is not None:
            return done
        _clear_previous_run(out_dir)
        (out_dir / IN_PROGRESS_FILE).write_text(fingerprint + "\n", encoding="utf-8")

        if tokenizer is None:
            passes = iter(("characters", "vocabulary"))

            def sentences() -> Iterator[str]:  # train_wordpiece reads the corpus twice, streamed each time
                documents = corpus.documents()
                if progress:
                    documents = _progress_bar(documents, next(passes, "vocabulary"))
                return (sentence for document in documents for sentence in document)

            if vocab_sample is not None:
                documents = corpus.raw_documents()
                if progress:
                    documents = _progress_bar(documents, "vocabulary sample")
                sentences = sample_sentences(documents, vocab_sample)
            wordpiece = train_wordpiece(sentences, vocab_size=vocab_size, lowercase=True if lowercase is None else lowercase,
                                        min_frequency=min_frequency)
        else:
            wordpiece = load_wordpiece(tokenizer, lowercase=lowercase)
        tokenizer_files = wordpiece.save(out_dir)

        dtype = token_dtype_for(wordpiece.vocab_size)
        writer = ShardWriter(out_dir, dtype, shard_tokens)
        documents = corpus.raw_documents()
        if progress:
            documents = _progress_bar(documents, "tokenize")
        for tokens, sentence_lengths in tokenized_documents(documents, wordpiece, workers=workers,
                                                            chunk_lines=batch_lines):
            writer.add_flat_document(tokens, sentence_lengths)
        shards = writer.close()
        if not shards:
            raise ValueError(f"no document of {corpus.describe()} has any token after tokenization")

        special = wordpiece.special_ids
        metadata = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "inputs": corpus.sources,
            "tokenizer_source": "trained" if tokenizer is None else str(Path(tokenizer).expanduser().resolve()),
            "vocab_size": wordpiece.vocab_size,
            "vocab_sha256": wordpiece.vocab_sha256(),
            "lowercase": wordpiece.lowercase,
            "special_tokens": {"pad": special.pad, "unk": special.unk, "cls": special.cls, "sep": special.sep,
                               "mask": special.mask},
            "token_dtype": dtype.name,
            "num_documents": sum(shard.num_documents for shard in shards),
            "num_sentences": sum(shard.num_sentences for shard in shards),
            "num_tokens": sum(shard.num_tokens for shard in shards),
            "replaced_bytes": corpus.replaced_bytes,
            "shard_tokens": shard_tokens,
            "shards": [shard.to_json() for shard in shards],
            "tokenizer_files": [path.name for path in tokenizer_files],
            # No time stamp: the same inputs, settings and versions give the same bytes (the versions are here).
            "python": sys.version.split()[0],
            "tokenizers": tokenizers.__version__,
        }
        # Last, and atomically: from this moment the folder is a finished prepared folder.
        atomic_write_text(out_dir / METADATA_FILE, json.dumps(metadata, indent=2) + "\n")
        (out_dir / IN_PROGRESS_FILE).unlink(missing_ok=True)
        return load_prepared(out_dir)


def load_prepared(data_dir: str | os.PathLike) -> PreparedData:
    """Open a folder written by :func:`prepare_corpus`; a clear error when it is not one (or unfinished)."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.exists():
        raise FileNotFoundError(f"prepared data folder not found: {data_dir}")
    if not data_dir.is_dir():
        raise ValueError(f"{data_dir} is not a folder; expected the output folder of `fastbert prepare`")
    metadata_path = data_dir / METADATA_FILE
    if not metadata_path.is_file():
        if (data_dir / IN_PROGRESS_FILE).exists():
            raise ValueError(f"{data_dir} holds an unfinished `fastbert prepare` run (interrupted?); run it again")
        raise ValueError(f"{data_dir} is not a prepared data folder (no {METADATA_FILE}); "
                         "create one with `fastbert prepare --corpus ... --out DIR`")
    try:
        metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{metadata_path} is not valid JSON ({err}); prepare the data again") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise ValueError(f"{metadata_path} was not written by `fastbert prepare`")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{data_dir} uses prepared-data format {metadata.get('format_version')}, this fastbert "
                         f"reads format {FORMAT_VERSION}; prepare the data again")
    try:
        shards = tuple(ShardInfo.from_json(entry) for entry in metadata["shards"])
        special = metadata["special_tokens"]
        ids = tuple(int(special[name]) for name in ("pad", "unk", "cls", "sep", "mask"))
        tokenizer_files = tuple(data_dir / name for name in metadata["tokenizer_files"])
        prepared = PreparedData(
            data_dir=data_dir, vocab_size=int(metadata["vocab_size"]), pad_id=ids[0], unk_id=ids[1],
            cls_id=ids[2], sep_id=ids[3], mask_id=ids[4], special_token_ids=ids,
            num_documents=int(metadata["num_documents"]), num_sentences=int(metadata["num_sentences"]),
            num_tokens=int(metadata["num_tokens"]), tokenizer_files=tokenizer_files,
            token_dtype=str(metadata["token_dtype"]), lowercase=bool(metadata["lowercase"]),
            vocab_sha256=str(metadata["vocab_sha256"]), replaced_bytes=int(metadata.get("replaced_bytes", 0)),
            fingerprint=str(metadata["fingerprint"]), shards=shards)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{metadata_path} is incomplete or malformed ({type(err).__name__}: {err}); "
                         "prepare the data again") from None
    missing = [path.name for path in tokenizer_files if not path.is_file()]
    missing += [shard_file(data_dir, shard.index, kind).name for shard in shards
                for kind in ("tokens", "sentences", "documents") if not shard_file(data_dir, shard.index, kind).is_file()]
    if missing:
        raise ValueError(f"{data_dir} is missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; "
                         "prepare the data again")
    _verify_contents(prepared, metadata_path)
    return prepared


def _verify_contents(prepared: PreparedData, metadata_path: Path) -> None:
    """The folder holds what metadata.json says (cheap: the shards' array headers, one pass over
    vocab.txt): counts that add up, each shard array of its recorded length, the vocabulary's hash."""
    shards = prepared.shards
    for name in ("num_documents", "num_sentences", "num_tokens"):
        if sum(getattr(shard, name) for shard in shards) != getattr(prepared, name):
            raise ValueError(f"{metadata_path}: {name} ({getattr(prepared, name)}) is not the sum over its shards; "
                             "the file was edited or damaged: prepare the data again")
    for shard in shards:
        lengths = {"tokens": shard.num_tokens, "sentences": shard.num_sentences + 1,
                   "documents": shard.num_documents + 1}
        for kind, length in lengths.items():
            path = shard_file(prepared.data_dir, shard.index, kind)
            try:
                shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
            except (ValueError, OSError, EOFError) as err:
                raise ValueError(f"{path} is truncated or damaged ({err}); prepare the data again") from None
            if shape != (length,):
                raise ValueError(f"{path} holds {shape[0] if shape else 0} entries, metadata.json says {length}; "
                                 "prepare the data again")
    vocab = prepared.data_dir / "vocab.txt"
    if vocab.is_file():
        tokens = vocab.read_text(encoding="utf-8", errors="replace").removesuffix("\n").split("\n")
        if vocab_sha256(tokens) != prepared.vocab_sha256:
            raise ValueError(f"{vocab} is not the vocabulary these shards were written with (its hash differs from "
                             "metadata.json's); restore it or prepare the data again")


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _tokenizer_recipe(tokenizer, vocab_size: int, lowercase: bool | None, min_frequency: int,
                      vocab_sample: int | None) -> dict:
    if tokenizer is None:
        _check_positive("vocab_size", vocab_size)
        recipe = {"train": True, "vocab_size": vocab_size, "lowercase": True if lowercase is None else lowercase,
                  "min_frequency": min_frequency}
        if vocab_sample is not None:  # absent otherwise: folders prepared before it keep their fingerprint
            recipe["vocab_sample"] = vocab_sample
        return recipe
    path = Path(tokenizer).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"tokenizer not found: {tokenizer}")
    files = sorted(p for p in path.iterdir() if p.name in TOKENIZER_FILES) if path.is_dir() else [path]
    return {"files": {p.name: file_sha256(p) for p in files}, "lowercase": lowercase}


def _owned_by_prepare(path: Path) -> bool:
    """Files that a prepare run writes (so a rerun may delete them)."""
    name = path.name
    return (path.match(SHARD_PATTERN) or name in TOKENIZER_FILES
            or name in (METADATA_FILE, IN_PROGRESS_FILE, LOCK_NAME) or (name.startswith(".") and name.endswith(".tmp")))


def _finished_run(out_dir: Path, fingerprint: str, overwrite: bool) -> PreparedData | None:
    """The finished output of the same recipe, if ``out_dir`` holds it; refuse to replace another one."""
    if not (out_dir / METADATA_FILE).is_file():
        return None
    try:
        done = load_prepared(out_dir)
    except ValueError:
        return None  # damaged: prepared again
    if done.fingerprint == fingerprint:
        return dataclasses.replace(done, reused=True)
    if not overwrite:
        raise ValueError(f"{out_dir} already holds data prepared from other inputs or settings; choose another "
                         "output folder, or overwrite it (--overwrite / overwrite=True)")
    return None


def _clear_previous_run(out_dir: Path) -> None:
    """Delete what an earlier (unfinished, damaged or replaced) run left; never someone else's files."""
    if not out_dir.is_dir():
        return
    entries = list(out_dir.iterdir())
    foreign = sorted(path.name for path in entries if path.is_dir() or not _owned_by_prepare(path))
    if foreign:
        raise ValueError(f"output folder {out_dir} holds files that `fastbert prepare` did not write "
                         f"({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); use an empty or new folder")
    # metadata.json first: from then on the folder no longer looks finished.
    (out_dir / METADATA_FILE).unlink(missing_ok=True)
    for path in entries:
        if path.name != LOCK_NAME:  # held by this run: a new file would let a second run lock it too
            path.unlink(missing_ok=True)


def sample_sentences(raw_documents: Iterable[list[str]], lines: int, seed: int = 0) -> list[str]:
    """The sentences of ``lines`` lines drawn uniformly from the raw documents' lines (reservoir
    sampling, seeded: the same sample every time), in corpus order; all of them when there are fewer."""
    rng = np.random.default_rng(seed)
    reservoir: list[tuple[int, str]] = []
    draws = np.empty(0)
    number = 0
    for document in raw_documents:
        for line in document:
            if number < lines:
                reservoir.append((number, line))
            else:
                if not len(draws):
                    draws = rng.random(1 << 16)  # uniform numbers drawn in blocks: one per line past the first `lines`
                slot = int(draws[-1] * (number + 1))
                draws = draws[:-1]
                if slot < lines:
                    reservoir[slot] = (number, line)
            number += 1
    reservoir.sort()
    return [sentence for _, line in reservoir for sentence in split_sentences(line)]


def _progress_bar(documents: Iterable[list[str]], description: str) -> Iterable[list[str]]:
    try:
        from tqdm import tqdm
    except ImportError:
        return documents
    return tqdm(documents, desc=description, unit=" documents", file=sys.stderr, mininterval=1.0)
