"""The WordPiece tokenizer: train one with Hugging Face ``tokenizers``, or load ``vocab.txt`` /
``tokenizer.json``; save files that ``transformers.BertTokenizerFast.from_pretrained(dir)`` loads.

Special-token ids. BERT's released vocabularies put ``[PAD]`` at 0, ``[UNK]`` ``[CLS]`` ``[SEP]``
``[MASK]`` at 100..103 (``[unused*]`` in between); a loaded vocabulary keeps its own ids. A vocabulary
trained here puts the five special tokens first, in the order ``[PAD] [UNK] [CLS] [SEP] [MASK]``, so
their ids are 0, 1, 2, 3, 4, followed by the alphabet, the "##" single characters and then the learned
word pieces (the same corpus and settings always give the same vocabulary: see :func:`train_wordpiece`).
Code should read the ids from :attr:`WordPieceTokenizer.special_ids`, never assume either layout.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import tokenizers
from tokenizers import BertWordPieceTokenizer, processors

from fastbert._atomic import atomic_write_text

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CONTINUING_PREFIX = "##"  # WordPiece's mark of a piece inside a word
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_VOCAB_SIZE = 30522  # BERT's
DEFAULT_MODEL_MAX_LENGTH = 512


def vocab_sha256(tokens: Sequence[str]) -> str:
    """The hash a prepared folder records of its vocabulary: of the tokens in id order, one per line
    (``vocab.txt`` without its final newline)."""
    return hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class SpecialTokenIds:
    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        """(pad, unk, cls, sep, mask)"""
        return (self.pad, self.unk, self.cls, self.sep, self.mask)


@dataclass
class WordPieceTokenizer:
    """A WordPiece ``tokenizers.Tokenizer`` plus whether it lower-cases (which HF's config records)."""

    tokenizer: tokenizers.Tokenizer
    lowercase: bool

    def __post_init__(self):
        # Shards hold raw sentences: [CLS]/[SEP] are added when pairs are built, and nothing is cut.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        _ = self.special_ids  # raises ValueError unless the five special tokens exist

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> SpecialTokenIds:
        ids = {token: self.tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
        missing = [token for token, index in ids.items() if index is None]
        if missing:
            raise ValueError(f"the vocabulary lacks the special token(s) {', '.join(missing)}; a BERT vocabulary "
                             f"needs all of {', '.join(SPECIAL_TOKENS)}")
        return SpecialTokenIds(*(ids[token] for token in SPECIAL_TOKENS))

    def encode_batch(self, sentences: Sequence[str]) -> list[list[int]]:
        """Token ids of each sentence, without special tokens; parallel (Rayon threads) inside tokenizers.

        Text is text: a literal ``[MASK]``, ``[CLS]``, ... in a sentence is tokenized as the characters it
        is made of (as BERT's own data pipeline does), never as the special token's id. The tokenizer's
        saved files keep transformers' behaviour (special tokens matched in text), as fill-mask needs."""
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)  # fast: no offsets
        matched = self.tokenizer.encode_special_tokens
        self.tokenizer.encode_special_tokens = True
        try:
            return [encoding.ids for encoding in encode(list(sentences), add_special_tokens=False)]
        finally:
            self.tokenizer.encode_special_tokens = matched

    def vocab_tokens(self) -> list[str]:
        """The vocabulary in id order (ids must be 0..V-1 without gaps, as ``vocab.txt`` needs)."""
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        tokens = [""] * len(vocab)
        for token, index in vocab.items():
            if not 0 <= index < len(vocab) or tokens[index]:
                raise ValueError(f"the vocabulary's ids are not 0..{len(vocab) - 1} without gaps "
                                 f"(token {token!r} has id {index}); it cannot be written as vocab.txt")
            tokens[index] = token
        return tokens

    def vocab_sha256(self) -> str:
        return vocab_sha256(self.vocab_tokens())

    def save(self, out_dir: str | os.PathLike, *, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> list[Path]:
        """Write ``vocab.txt``, ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

        The ``tokenizer.json`` carries BERT's template post-processor (see :func:`bert_post_processor`),
        so whoever encodes with it (``tokenizers``, transformers, `fastbert finetune`) gets [CLS]/[SEP]."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tokens = self.vocab_tokens()
        atomic_write_text(out_dir / "vocab.txt", "".join(f"{token}\n" for token in tokens))
        atomic_write_text(out_dir / "tokenizer.json", with_bert_post_processor(self.tokenizer).to_str(pretty=True))
        special_map = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                       "cls_token": "[CLS]", "mask_token": "[MASK]"}
        config = {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": self.lowercase,
            "strip_accents": None,
            "tokenize_chinese_chars": True,
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": True,
            **special_map,
        }
        atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        atomic_write_text(out_dir / "special_tokens_map.json", json.dumps(special_map, indent=2) + "\n")
        return [out_dir / name for name in TOKENIZER_FILES]


def train_wordpiece(sentences: Iterable[str] | Callable[[], Iterable[str]], *, vocab_size: int = DEFAULT_VOCAB_SIZE,
                    lowercase: bool = True, min_frequency: int = 2, limit_alphabet: int = 1000) -> WordPieceTokenizer:
    """Learn a WordPiece vocabulary of at most ``vocab_size`` tokens (fewer on a small corpus) from
    ``sentences``. Special tokens take ids 0..4 (see the module docstring).

    The result depends only on the sentences and the arguments (and the ``tokenizers`` version): two
    runs give the same vocabulary in the same order, whatever the process or thread count.

    sentences: read twice (a character pass, then training), so give a list, or a zero-argument
    callable returning a fresh iterable each time (streamed; what ``fastbert prepare`` does). A
    one-shot iterator is read into a list first.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 1}, got {vocab_size}")
    if callable(sentences):
        read = sentences
    else:
        if iter(sentences) is sentences:
            sentences = list(sentences)
        read = functools.partial(iter, sentences)
    trainer = BertWordPieceTokenizer(lowercase=lowercase)
    read = _without_overlong_words(read, trainer._tokenizer)
    alphabet, continuing = _alphabet(trainer._tokenizer, read(), limit_alphabet)
    # Deterministic training around the trainer's hash-map orders (huggingface/tokenizers issue 1794):
    # it gives "##c" pieces ids in the (per-process random) order it meets words, breaks count ties
    # between merges by id, and cuts the alphabet at `limit_alphabet` with ties in hash order. Here the
    # alphabet is chosen beforehand (by count, then code point) and the "##c" pieces are handed in as
    # extra special tokens in code-point order, so every id, hence every merge, is fixed.
    continuing_pieces = [CONTINUING_PREFIX + c for c in continuing]
    trainer.train_from_iterator(read(), vocab_size=vocab_size, min_frequency=min_frequency,
                                limit_alphabet=len(alphabet), initial_alphabet=alphabet,
                                special_tokens=[*SPECIAL_TOKENS, *continuing_pieces], show_progress=False,
                                wordpieces_prefix=CONTINUING_PREFIX)
    return WordPieceTokenizer(_canonical_tokenizer(trainer._tokenizer, alphabet, continuing_pieces), lowercase)


def _without_overlong_words(read: Callable[[], Iterable[str]], tokenizer: tokenizers.Tokenizer
                            ) -> Callable[[], Iterator[str]]:
    """``read`` with the words longer than WordPiece's ``max_input_chars_per_word`` (100) taken out of the
    sentences: they encode as ``[UNK]`` whatever the vocabulary, and the trainer's time grows with the
    square of a word's length (one 2 MB "word" took minutes). Only a sentence holding a run of that many
    non-space characters is rebuilt (normalized, split into words as the trainer splits it, the long
    words dropped): every other sentence, and so the vocabulary of an ordinary corpus, is unchanged."""
    limit = getattr(tokenizer.model, "max_input_chars_per_word", 100)
    suspicious = re.compile(r"\S{%d,}" % (limit + 1))
    normalizer, pre_tokenizer = tokenizer.normalizer, tokenizer.pre_tokenizer

    def bounded() -> Iterator[str]:
        for sentence in read():
            if len(sentence) > limit and suspicious.search(sentence):
                words = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(sentence))
                sentence = " ".join(word for word, _ in words if len(word) <= limit)
            yield sentence

    return bounded


def _alphabet(tokenizer: tokenizers.Tokenizer, sentences: Iterable[str], limit: int,
              chunk: int = 4096) -> tuple[list[str], list[str]]:
    """(the alphabet the trainer would keep: the ``limit`` most frequent characters of the normalized,
    pre-tokenized words, ties by code point, in code-point order; the alphabet characters that occur
    inside a word, after its first character, in code-point order)."""
    counts: collections.Counter[str] = collections.Counter()
    inside: set[str] = set()
    normalizer, pre_tokenizer = tokenizer.normalizer, tokenizer.pre_tokenizer
    for block in _chunks(sentences, chunk):
        # Both steps act per character or split at whitespace, so one joined call per chunk gives the
        # same words as one call per sentence, at a fraction of the Python overhead.
        words = [word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(" ".join(block)))]
        counts.update("".join(words))
        inside.update("".join(word[1:] for word in words))
    kept = sorted(counts, key=lambda c: (-counts[c], ord(c)))[:limit]
    return sorted(kept, key=ord), sorted(inside.intersection(kept), key=ord)


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while block := list(itertools.islice(iterator, size)):
        yield block


def _canonical_tokenizer(trained: tokenizers.Tokenizer, alphabet: list[str],
                         continuing_pieces: list[str]) -> tokenizers.Tokenizer:
    """The trained tokenizer with ids ordered specials, alphabet, "##c" pieces, learned pieces (in merge
    order), and only the five BERT special tokens left as added tokens."""
    spec = json.loads(trained.to_str())
    by_id = sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])
    tokens = [token for token, _ in by_id]
    head = len(SPECIAL_TOKENS) + len(continuing_pieces)
    if tokens[:head] != [*SPECIAL_TOKENS, *continuing_pieces] or sorted(tokens[head:head + len(alphabet)]) != \
            sorted(alphabet):
        raise RuntimeError(f"tokenizers {tokenizers.__version__} laid out its trained vocabulary in an unexpected "
                           "order; fastbert cannot make it deterministic")
    tokens = [*SPECIAL_TOKENS, *tokens[head:head + len(alphabet)], *continuing_pieces, *tokens[head + len(alphabet):]]
    ids = {token: index for index, token in enumerate(tokens)}
    spec["model"]["vocab"] = ids
    added = [entry for entry in spec["added_tokens"] if entry["content"] in SPECIAL_TOKENS]
    for entry in added:
        entry["id"] = ids[entry["content"]]
    spec["added_tokens"] = added
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


def load_wordpiece(path: str | os.PathLike, *, lowercase: bool | None = None) -> WordPieceTokenizer:
    """Load ``vocab.txt``, ``tokenizer.json``, or a folder holding one of them (``tokenizer.json`` first).

    ``lowercase``: None = the file's own setting (a ``tokenizer.json`` normalizer, a folder's
    ``tokenizer_config.json``), else lower-case for a bare ``vocab.txt``. An explicit value that
    contradicts a ``tokenizer.json`` is a ValueError (the ids would not match the vocabulary's).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    config_lowercase = None
    if path.is_dir():
        config_lowercase = _config_lowercase(path / "tokenizer_config.json")
        for name in ("tokenizer.json", "vocab.txt"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"no tokenizer.json or vocab.txt in {path}")
    if path.name.endswith(".json"):
        return _load_tokenizer_json(path, lowercase)
    wanted = lowercase if lowercase is not None else (config_lowercase if config_lowercase is not None else True)
    _check_vocab_txt(path)
    trainer = BertWordPieceTokenizer(str(path), lowercase=wanted)
    return WordPieceTokenizer(tokenizers.Tokenizer.from_str(trainer.to_str()), wanted)


def _config_lowercase(config_path: Path) -> bool | None:
    if not config_path.is_file():
        return None
    try:
        value = json.loads(config_path.read_text(encoding="utf-8")).get("do_lower_case")
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{config_path} is not a valid tokenizer config (JSON object)") from None
    return value if isinstance(value, bool) else None


def _check_vocab_txt(path: Path) -> None:
    tokens = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if not any(token.strip() for token in tokens):
        raise ValueError(f"{path} is empty: a vocab.txt holds one token per line")


def _load_tokenizer_json(path: Path, lowercase: bool | None) -> WordPieceTokenizer:
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on a malformed file
        raise ValueError(f"{path} is not a valid tokenizer.json: {err}") from None
    spec = json.loads(tokenizer.to_str())
    model_type = (spec.get("model") or {}).get("type")
    if model_type != "WordPiece":
        raise ValueError(f"{path} holds a {model_type} tokenizer; BERT pre-training needs a WordPiece one")
    normalizer = spec.get("normalizer") or {}
    file_lowercase = normalizer.get("lowercase") if normalizer.get("type") == "BertNormalizer" else None
    if lowercase is not None and file_lowercase is not None and lowercase != file_lowercase:
        raise ValueError(f"{path} is {'uncased' if file_lowercase else 'cased'} but "
                         f"{'lowercase' if lowercase else 'cased'} text was asked for; drop the "
                         "--lowercase/--cased option or use another tokenizer")
    resolved = file_lowercase if file_lowercase is not None else (lowercase if lowercase is not None else True)
    return WordPieceTokenizer(tokenizer, resolved)


def bert_post_processor(cls_id: int, sep_id: int) -> processors.TemplateProcessing:
    """BERT's input template: ``[CLS] A [SEP]``, and for a pair ``[CLS] A [SEP] B [SEP]`` with token type
    0 up to the first [SEP] and 1 after it (what ``BertTokenizerFast`` produces)."""
    return processors.TemplateProcessing(single="[CLS] $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
                                         special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])


def with_bert_post_processor(tokenizer: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """A copy of ``tokenizer`` that adds [CLS]/[SEP] as BERT does; ``tokenizer`` itself is not changed."""
    ids = {token: tokenizer.token_to_id(token) for token in ("[CLS]", "[SEP]")}
    missing = [token for token, index in ids.items() if index is None]
    if missing:
        raise ValueError(f"the vocabulary lacks {' and '.join(missing)}, which BERT puts around every input")
    copy = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    copy.post_processor = bert_post_processor(ids["[CLS]"], ids["[SEP]"])
    return copy


def read_bert_tokenizer(path: str | os.PathLike) -> tuple[tokenizers.Tokenizer, bool]:
    """Read a ``tokenizer.json``; one without a post-processor (as `fastbert prepare` wrote before it
    added one) gets BERT's [CLS]/[SEP] template. Returns ``(tokenizer, added_the_template)``; a malformed
    file or a vocabulary without [CLS]/[SEP] is a ValueError naming the file."""
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on a malformed file
        raise ValueError(f"{path} is not a valid tokenizer.json: {err}") from None
    if tokenizer.post_processor is not None:
        return tokenizer, False
    try:
        return with_bert_post_processor(tokenizer), True
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def copy_tokenizer_files(paths: Iterable[str | os.PathLike], out_dir: str | os.PathLike) -> list[Path]:
    """Copy tokenizer files into ``out_dir``; a ``tokenizer.json`` without a post-processor (as
    `fastbert prepare` wrote before it added one) gets BERT's, so the copy adds [CLS]/[SEP]."""
    out_dir = Path(out_dir)
    written = []
    for path in map(Path, paths):
        target = out_dir / path.name
        if path.name == "tokenizer.json":
            tokenizer, fixed = read_bert_tokenizer(path)
            if fixed:
                atomic_write_text(target, tokenizer.to_str(pretty=True))
                written.append(target)
                continue
        shutil.copyfile(path, target)
        written.append(target)
    return written
