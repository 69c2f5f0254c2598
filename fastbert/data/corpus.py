"""Corpus readers: documents (lists of sentences) from text files, JSON lines, `datasets` folders and
the built-in corpus, streamed so that a corpus larger than memory can be read.

A source is one of:

* ``"builtin"``: the built-in English corpus (:mod:`fastbert.data.builtin`);
* a text file (any name; ``.gz`` is decompressed): BERT's format, one sentence per line and a blank
  line between documents; a line holding a paragraph is split into sentences;
* a ``.jsonl`` file (``.jsonl.gz`` too): one JSON object per line, its ``text`` field one document;
* a folder saved by ``datasets.Dataset.save_to_disk`` (needs the optional ``datasets`` package):
  each row's ``text`` column is one document (the ``train`` split of a ``DatasetDict``);
* any other folder: the text and ``.jsonl`` files inside it, sorted by path, skipping hidden files and
  folders and the folders fastbert writes (prepared data, pre-training runs, saved models), so that an
  output folder inside the corpus folder is never read as corpus.

Undecodable bytes are replaced with U+FFFD and counted (:attr:`Corpus.replaced_bytes`), never an
error. A missing source is a :class:`FileNotFoundError` naming it; a truncated or corrupted ``.gz`` file
and a corpus without any document are a :class:`ValueError` naming the file or the inputs.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import IO, Iterable, Iterator, Sequence

from fastbert.data.text import decode_counting, raw_documents_of_lines, sentences_of_lines

BUILTIN = "builtin"
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
_TEXT_SUFFIXES = (".txt", ".txt.gz", ".text", ".raw")
_DATASETS_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")

SourceLike = str | os.PathLike


class Corpus:
    """One or more sources read in order as a single stream of documents.

    ``documents()`` may be iterated more than once (the tokenizer trainer reads the corpus, then the
    shard writer reads it again); ``replaced_bytes`` counts the undecodable bytes seen by the last
    complete pass.
    """

    def __init__(self, sources: SourceLike | Sequence[SourceLike], *, cache_dir: SourceLike | None = None):
        if isinstance(sources, (str, os.PathLike)):
            sources = [sources]
        sources = list(sources)
        if not sources:
            raise ValueError("no corpus given: pass one or more files, folders, or 'builtin'")
        self.sources: list[str] = [str(source) for source in sources]
        self.cache_dir = cache_dir
        self.replaced_bytes = 0
        self._files = [_resolve(source, cache_dir) for source in self.sources]

    def __repr__(self) -> str:
        return f"Corpus({self.sources!r})"

    def describe(self) -> str:
        return ", ".join(self.sources)

    def documents(self) -> Iterator[list[str]]:
        """Every document of every source, in order, as its sentences. Raises ValueError if there are none."""
        for raw in self.raw_documents():
            sentences = sentences_of_lines(raw)
            if sentences:
                yield sentences

    def raw_documents(self) -> Iterator[list[str]]:
        """Every document of every source, in order, as lines (each a sentence or a paragraph, at least
        one not blank) that :func:`~fastbert.data.text.sentences_of_lines` splits into the sentences of
        :meth:`documents`. Raises ValueError if there are none."""
        replaced = [0]
        found = False
        for kind, path in self._files:
            for document in _READERS[kind](path, replaced):
                found = True
                yield document
        self.replaced_bytes = replaced[0]
        if not found:
            raise ValueError(f"the corpus has no documents (no non-empty text) in: {self.describe()}")

    def fingerprint(self) -> str:
        """A hash of what the corpus is read from: each file's path, size and modification time (and
        the built-in corpus's content), so a re-run on unchanged inputs is recognised without reading them."""
        digest = hashlib.sha256()
        for kind, path in self._files:
            for file in _files_of(kind, path):
                stat = file.stat()
                digest.update(f"{kind}\0{file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
                if kind == BUILTIN:
                    digest.update(hashlib.sha256(file.read_bytes()).digest())
        return digest.hexdigest()


def read_documents(sources: SourceLike | Sequence[SourceLike], *, cache_dir: SourceLike | None = None
                   ) -> Iterator[list[str]]:
    """Documents (lists of sentences) of ``sources``: a shortcut for ``Corpus(sources).documents()``."""
    return Corpus(sources, cache_dir=cache_dir).documents()


def _resolve(source: str, cache_dir: SourceLike | None) -> tuple[str, Path]:
    """(reader kind, path) of one source; FileNotFoundError when it does not exist."""
    if source == BUILTIN:
        from fastbert.data.builtin import builtin_corpus_path

        return BUILTIN, builtin_corpus_path(cache_dir)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"corpus source not found: {source}")
    if path.is_dir():
        if any((path / marker).is_file() for marker in _DATASETS_MARKERS):
            return "datasets", path
        if not _folder_files(path):
            raise ValueError(f"corpus folder {source} holds no text (.txt) or .jsonl files")
        return "folder", path
    name = path.name.lower()
    return ("jsonl" if name.endswith(_JSONL_SUFFIXES) else "text"), path


def _folder_files(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder):  # symlinked folders are not followed: no loops
        root_path = Path(root)
        dirs[:] = [name for name in dirs if not name.startswith(".") and not _is_fastbert_output(root_path / name)]
        files += [root_path / name for name in names if not name.startswith(".")
                  and name.lower().endswith(_TEXT_SUFFIXES + _JSONL_SUFFIXES) and (root_path / name).is_file()]
    return sorted(files, key=lambda path: path.relative_to(folder).as_posix())


def _is_fastbert_output(folder: Path) -> bool:
    """A folder written by fastbert — prepared data (finished or in progress), a pre-training run, a saved
    model with its tokenizer — whose vocab.txt and metrics.jsonl are not corpus."""
    from fastbert.data.prepare import FORMAT_NAME, IN_PROGRESS_FILE, METADATA_FILE
    from fastbert.pretrain.checkpoint import RUN_CONFIG

    if (folder / IN_PROGRESS_FILE).exists() or (folder / RUN_CONFIG).is_file():
        return True
    if (folder / "config.json").is_file() and (folder / "vocab.txt").is_file():
        return True  # a saved model and tokenizer (pre-training's final/, fine-tuning's output)
    try:
        metadata = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(metadata, dict) and metadata.get("format") == FORMAT_NAME


def _files_of(kind: str, path: Path) -> list[Path]:
    if kind == "folder":
        return _folder_files(path)
    if kind == "datasets":
        return sorted((file for file in path.rglob("*") if file.is_file()),
                      key=lambda file: file.relative_to(path).as_posix())
    return [path]


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


_BLOCK_BYTES = 1 << 20


def _decoded_lines(path: Path, replaced: list[int]) -> Iterator[str]:
    """The file's lines (split at b"\\n", trailing "\\r" dropped), decoded as UTF-8 with undecodable
    bytes replaced and counted. Read in blocks of whole lines, each decoded in one call: the reader
    runs beside the prepare workers, so its cost per line is what it can give them."""
    try:
        with _open_binary(path) as handle:
            tail = b""
            while block := handle.read(_BLOCK_BYTES):
                block = tail + block
                cut = block.rfind(b"\n") + 1
                block, tail = block[:cut], block[cut:]
                yield from _decoded_block(block, replaced)
            yield from _decoded_block(tail, replaced)  # a last line without a newline
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:  # what gzip raises for a damaged file
        raise ValueError(f"{path}: truncated or corrupted gzip file ({err})") from None


def _decoded_block(block: bytes, replaced: list[int]) -> Iterator[str]:
    if not block:
        return
    try:
        lines = block.decode("utf-8").split("\n")
    except UnicodeDecodeError:  # line by line, each bad sequence replaced and counted
        lines = []
        for raw in block.split(b"\n"):
            text, bad = decode_counting(raw)
            replaced[0] += bad
            lines.append(text)
    if block.endswith(b"\n"):
        lines.pop()  # the empty piece after the last newline
    for line in lines:
        yield line.rstrip("\r\n")


# Each reader yields raw documents: their lines, at least one of them not blank.
def _read_text(path: Path, replaced: list[int]) -> Iterator[list[str]]:
    yield from raw_documents_of_lines(_decoded_lines(path, replaced))


def _read_jsonl(path: Path, replaced: list[int]) -> Iterator[list[str]]:
    for number, line in enumerate(_decoded_lines(path, replaced), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or "text" not in record:
            raise ValueError(f"{path}:{number}: a .jsonl corpus needs a JSON object with a 'text' field per line")
        text = record["text"]
        if not isinstance(text, str):
            raise ValueError(f"{path}:{number}: the 'text' field must be a string, got {type(text).__name__}")
        if text.strip():
            yield text.split("\n")


def _read_folder(path: Path, replaced: list[int]) -> Iterator[list[str]]:
    for file in _folder_files(path):
        reader = _read_jsonl if file.name.lower().endswith(_JSONL_SUFFIXES) else _read_text
        yield from reader(file, replaced)


def _read_datasets(path: Path, replaced: list[int]) -> Iterator[list[str]]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{path} is a Hugging Face `datasets` folder; reading it needs the optional "
                         "package: pip install datasets") from None
    dataset = datasets.load_from_disk(str(path))
    if hasattr(dataset, "column_names") and isinstance(dataset.column_names, dict):  # a DatasetDict
        if "train" not in dataset:
            raise ValueError(f"{path} is a DatasetDict without a 'train' split (splits: {sorted(dataset)})")
        dataset = dataset["train"]
    if "text" not in dataset.column_names:
        raise ValueError(f"{path}: the dataset needs a 'text' column (columns: {dataset.column_names})")
    for number, text in enumerate(_column(dataset, "text")):
        if not isinstance(text, str):
            raise ValueError(f"{path}: row {number}: 'text' must be a string, got {type(text).__name__}")
        if text.strip():
            yield text.split("\n")


def _column(dataset, name: str, batch_size: int = 1000) -> Iterable:
    """A column in row order, read in batches (a `datasets` table is memory-mapped Arrow)."""
    for start in range(0, len(dataset), batch_size):
        yield from dataset[start:start + batch_size][name]


def _read_builtin(path: Path, replaced: list[int]) -> Iterator[list[str]]:
    yield from _read_text(path, replaced)


_READERS = {
    BUILTIN: _read_builtin,
    "text": _read_text,
    "jsonl": _read_jsonl,
    "folder": _read_folder,
    "datasets": _read_datasets,
}
