"""The built-in corpus: English text from the Python standard library's own documentation, offline.

Sources, in this order (the order is fixed, so the corpus is the same on every build with the same
Python): the ``pydoc_data.topics`` help topics (one document per topic, sorted by name), then every
standard-library source file (sorted by path, tests and site-packages left out), one document per
module: its module, class and function docstrings in source order, then its comment blocks. Files
are parsed with :mod:`ast` and never imported (``antigravity`` opens a browser, ``this`` prints).
Paragraphs that are code (doctest sessions, indented blocks, grammar rules) or not prose are
dropped, and each paragraph is kept only the first time it appears in the whole corpus.

The result is written once, in BERT's text format (one sentence per line, a blank line between
documents), to ``<cache_dir>/builtin-py<version>-v<N>.txt``; :func:`builtin_corpus_path` builds it on
first use and returns the cached file after that.
"""
from __future__ import annotations

import ast
import hashlib
import io
import os
import re
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

from fastbert._atomic import atomic_write
from fastbert.data.text import decode_counting, normalize_whitespace, split_sentences

# Bump when the extraction rules change: the cache file name carries it, so an old file is not reused.
BUILDER_VERSION = 1

# Folders of the standard library that hold tests, vendored packages or generated data, not docs.
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
                           "ensurepip", "turtledemo", "lib-dynload"})
_HEADING_UNDERLINE = re.compile(r"^\s*([*=\-~^#+\"'`]){3,}\s*$")
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|\$ |::=|[{}\[\]()]\s*$)")
_LETTER_OR_SPACE = re.compile(r"[A-Za-z ]")
_HAS_LETTER = re.compile(r"[A-Za-z]")
# Comment lines that are markers, not prose (pragmas, encodings, shebangs, editor settings).
_COMMENT_MARKER = re.compile(r"^(!|-\*-|\s*(type|noqa|pragma|pylint|fmt|vim?|XXX|TODO|FIXME)\b)", re.IGNORECASE)
_MIN_WORDS = 4


def default_cache_dir() -> Path:
    """``$FASTBERT_CACHE``, else ``$XDG_CACHE_HOME/fastbert``, else ``~/.cache/fastbert``."""
    if os.environ.get("FASTBERT_CACHE"):
        return Path(os.environ["FASTBERT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastbert"


def builtin_corpus_file_name() -> str:
    version = ".".join(str(part) for part in sys.version_info[:3])
    return f"builtin-py{version}-v{BUILDER_VERSION}.txt"


def builtin_corpus_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The built-in corpus file (BERT's text format), built on first use in ``cache_dir``."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / builtin_corpus_file_name()
    if not path.is_file():
        documents = list(builtin_documents())
        if not documents:
            raise ValueError("the built-in corpus is empty: this Python has neither pydoc_data nor "
                             f"standard-library sources under {_stdlib_dir()}")
        text = "\n\n".join("\n".join(sentences) for sentences in documents) + "\n"
        # Written beside the target and renamed: an interrupted build never leaves a partial corpus.
        atomic_write(path, lambda tmp: tmp.write_bytes(text.encode("utf-8")))
    return path


def builtin_documents() -> Iterator[list[str]]:
    """The documents of the built-in corpus (lists of sentences), in their fixed order, deduplicated."""
    seen: set[bytes] = set()
    for paragraphs in _raw_documents():
        sentences: list[str] = []
        for paragraph in paragraphs:
            text = normalize_whitespace(paragraph)
            key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if key in seen:
                continue
            seen.add(key)
            # A list's "1." or "2." split off by the sentence rules is not a sentence.
            sentences.extend(sentence for sentence in split_sentences(text) if _HAS_LETTER.search(sentence))
        if sentences:
            yield sentences


def _raw_documents() -> Iterator[list[str]]:
    """One list of prose paragraphs per topic, then per module."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions ship pydoc_data separately
        topics = {}
    for name in sorted(topics):
        yield prose_paragraphs(topics[name])
    for path in stdlib_source_files():
        yield module_paragraphs(path)


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files(root: Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files, sorted by path relative to ``root``; tests left out."""
    root = root if root is not None else _stdlib_dir()
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        folders = relative.parts[:-1]
        if any(part in _SKIPPED_DIRS or part.startswith("test") for part in folders):
            continue
        if relative.name.startswith("test_"):
            continue
        files.append((relative.as_posix(), path))
    return [path for _, path in sorted(files)]


def module_paragraphs(path: Path) -> list[str]:
    """Prose paragraphs of one source file: docstrings in source order, then comment blocks."""
    try:
        source = path.read_bytes()
        tree = ast.parse(source, filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return []  # an unreadable or non-Python-3 file (e.g. a lib2to3 fixture) adds nothing
    # One walk over the tree finds the docstrings and the lines inside multi-line strings (those
    # are not comments even when they start with "#").
    docstrings: list[tuple[int, str]] = []
    string_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=True)
            if docstring:
                docstrings.append((getattr(node, "lineno", 0), docstring))
        elif isinstance(node, ast.Constant) and node.end_lineno != node.lineno and \
                isinstance(node.value, (str, bytes)):
            string_lines.update(range(node.lineno, node.end_lineno + 1))
    paragraphs: list[str] = []
    for _, docstring in sorted(docstrings, key=lambda item: item[0]):
        paragraphs.extend(prose_paragraphs(docstring))
    paragraphs.extend(_comment_paragraphs(source, string_lines))
    return paragraphs


def _comment_paragraphs(source: bytes, string_lines: set[int]) -> list[str]:
    """Blocks of whole-line ``#`` comments (a code line or a blank line ends a block)."""
    text, _ = decode_counting(source)
    blocks: list[list[str]] = []
    current: list[str] = []
    for number, line in enumerate(io.StringIO(text), start=1):
        stripped = line.strip()
        if number in string_lines or not stripped.startswith("#"):
            if current:
                blocks.append(current)
                current = []
            continue
        body = stripped.lstrip("#").strip()
        if not body or _COMMENT_MARKER.match(body) or _HEADING_UNDERLINE.match(body):
            if current:
                blocks.append(current)
                current = []
            continue
        current.append(body)
    if current:
        blocks.append(current)
    return [paragraph for block in blocks for paragraph in prose_paragraphs("\n".join(block))]


def prose_paragraphs(text: str) -> list[str]:
    """The paragraphs of ``text`` (blank-line separated) that read as English prose.

    Dropped: indented blocks (code, grammar rules, quoted output), doctest sessions, heading
    underlines, and paragraphs with fewer than four words or mostly non-letters.
    """
    kept = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.split("\n") if line.strip() and not _HEADING_UNDERLINE.match(line)]
        if not lines or lines[0][:1].isspace():
            continue
        if any(_CODE_LINE.match(line) for line in lines):
            continue
        # A paragraph stops at its first indented line: what follows is a code or list block.
        prose_lines = []
        for line in lines:
            if line[:1].isspace() and prose_lines and prose_lines[-1].rstrip().endswith(":"):
                break
            prose_lines.append(line)
        paragraph = normalize_whitespace(" ".join(prose_lines))
        if len(paragraph.split()) < _MIN_WORDS:
            continue
        if len(_LETTER_OR_SPACE.findall(paragraph)) < 0.8 * len(paragraph):
            continue
        kept.append(paragraph)
    return kept
