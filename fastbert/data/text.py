"""Plain-text helpers shared by the corpus readers and the built-in corpus: decoding that counts bad
bytes, a rule-based sentence splitter, and the line rules of BERT's text format.

BERT's format: one sentence per line, a blank line between documents. Plain text works too: a line
holding a whole paragraph is split into sentences. Lines are never joined (a hard-wrapped paragraph
gives one "sentence" per line: the tokens are the same, only the sentence boundaries are off).
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator

# Words that end in a period without ending the sentence ("e.g. Foo", "Dr. Smith").
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs e.g i.e cf fig figs no nos vol approx inc ltd co corp dept est "
    "jan feb mar apr jun jul aug sep sept oct nov dec al resp ref refs sec ch eq eqs p pp".split()
)
# A candidate boundary: terminal punctuation, optional closing quotes/brackets, then whitespace.
_BOUNDARY = re.compile(r"[.!?]+[\"'”’)\]]*\s+")
# What a new sentence may start with: a capital, a digit, an opening quote/bracket, a backquote.
_SENTENCE_START = re.compile(r"[\"'“‘(\[`*]*[A-Z0-9]")
_WORD_BEFORE = re.compile(r"(\S+)$")
_WHITESPACE = re.compile(r"\s+")


def decode_counting(raw: bytes, encoding: str = "utf-8") -> tuple[str, int]:
    """Decode ``raw``, replacing each undecodable byte sequence with U+FFFD; return (text, replaced).

    The same result as ``raw.decode(encoding, "replace")``, plus the number of replacements (a
    corpus reader reports it instead of crashing on one bad byte in a large file).
    """
    try:
        return raw.decode(encoding), 0
    except UnicodeDecodeError:
        pass
    pieces: list[str] = []
    replaced = 0
    start = 0
    while start < len(raw):
        try:
            pieces.append(raw[start:].decode(encoding))
            break
        except UnicodeDecodeError as err:
            pieces.append(raw[start:start + err.start].decode(encoding))
            pieces.append("\ufffd")
            replaced += 1
            start += err.end
    return "".join(pieces), replaced


def normalize_whitespace(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def split_sentences(text: str) -> list[str]:
    """Split a paragraph into sentences with simple rules (no model, no downloads).

    A boundary is ``.``/``!``/``?`` (plus closing quotes or brackets) followed by whitespace and a
    capital letter, digit or opening quote, unless the word before the period is a known
    abbreviation or a single capital letter (an initial, as in "J. Smith"). Whitespace inside a sentence is collapsed.
    """
    text = normalize_whitespace(text)
    if not text:
        return []
    sentences = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        end = match.end()
        if end >= len(text) or not _SENTENCE_START.match(text, end):
            continue
        candidate = text[start:match.start()]
        word = _WORD_BEFORE.search(candidate)
        if match.group().startswith(".") and word is not None:
            stem = word.group(1).lstrip("\"'“‘([")
            if stem.lower() in _ABBREVIATIONS or (len(stem) == 1 and stem.isupper()):
                continue
        sentences.append(text[start:end].strip())
        start = end
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def sentences_of_lines(lines: Iterable[str]) -> list[str]:
    """The sentences of one document given as lines (each a sentence or a paragraph)."""
    sentences: list[str] = []
    for line in lines:
        sentences.extend(split_sentences(line))
    return sentences


def raw_documents_of_lines(lines: Iterable[str]) -> Iterator[list[str]]:
    """Documents as their non-blank lines, not yet split into sentences: a blank line ends a document
    (BERT's format). The split (:func:`sentences_of_lines`) is the costly part, left to the consumer
    so that it can run in worker processes."""
    current: list[str] = []
    for line in lines:
        if line.strip():
            current.append(line)
        elif current:
            yield current
            current = []
    if current:
        yield current


def documents_of_lines(lines: Iterable[str]) -> Iterator[list[str]]:
    """Documents (lists of sentences) from lines in BERT's format: a blank line ends a document."""
    for raw in raw_documents_of_lines(lines):
        sentences = sentences_of_lines(raw)
        if sentences:
            yield sentences
