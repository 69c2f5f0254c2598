"""The WordPiece tokenizer: train one with Hugging Face ``tokenizers``, or load ``vocab.txt`` /
``tokenizer.json``; save files that ``transformers.BertTokenizerFast.from_pretrained(dir)`` loads.

Special-token ids. BERT's released vocabularies put ``[PAD]`` at 0, ``[UNK]`` ``[CLS]`` ``[SEP]``
``[MASK]`` at 100..103 (``[unused*]`` in between); a loaded vocabulary keeps its own ids. A vocabulary
trained here puts the five special tokens first, in the order ``[PAD] [UNK] [CLS] [SEP] [MASK]``, so
their ids are 0, 1, 2, 3, 4, followed by the alphabet and then the learned word pieces. Code should
read the ids from :attr:`WordPieceTokenizer.special_ids`, never assume either layout.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import tokenizers
from tokenizers import BertWordPieceTokenizer, processors

from fastbert._atomic import atomic_write_text

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_VOCAB_SIZE = 30522  # BERT's
DEFAULT_MODEL_MAX_LENGTH = 512


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
        """Token ids of each sentence, without special tokens; parallel (Rayon threads) inside tokenizers."""
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)  # fast: no offsets
        return [encoding.ids for encoding in encode(list(sentences), add_special_tokens=False)]

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
        return hashlib.sha256("\n".join(self.vocab_tokens()).encode("utf-8")).hexdigest()

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


def train_wordpiece(sentences: Iterable[str], *, vocab_size: int = DEFAULT_VOCAB_SIZE, lowercase: bool = True,
                    min_frequency: int = 2, limit_alphabet: int = 1000) -> WordPieceTokenizer:
    """Learn a WordPiece vocabulary of at most ``vocab_size`` tokens (fewer on a small corpus) from
    ``sentences``, streamed. Special tokens take ids 0..4 (see the module docstring)."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 1}, got {vocab_size}")
    trainer = BertWordPieceTokenizer(lowercase=lowercase)
    trainer.train_from_iterator(iter(sentences), vocab_size=vocab_size, min_frequency=min_frequency,
                                limit_alphabet=limit_alphabet, special_tokens=list(SPECIAL_TOKENS),
                                show_progress=False)
    return WordPieceTokenizer(tokenizers.Tokenizer.from_str(trainer.to_str()), lowercase)


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


def copy_tokenizer_files(paths: Iterable[str | os.PathLike], out_dir: str | os.PathLike) -> list[Path]:
    """Copy tokenizer files into ``out_dir``; a ``tokenizer.json`` without a post-processor (as
    `fastbert prepare` wrote before it added one) gets BERT's, so the copy adds [CLS]/[SEP]."""
    out_dir = Path(out_dir)
    written = []
    for path in map(Path, paths):
        target = out_dir / path.name
        if path.name == "tokenizer.json":
            try:
                tokenizer = tokenizers.Tokenizer.from_file(str(path))
            except Exception as err:  # tokenizers raises a bare Exception on a malformed file
                raise ValueError(f"{path} is not a valid tokenizer.json: {err}") from None
            if tokenizer.post_processor is None:
                try:
                    tokenizer = with_bert_post_processor(tokenizer)
                except ValueError as err:
                    raise ValueError(f"{path}: {err}") from None
                atomic_write_text(target, tokenizer.to_str(pretty=True))
                written.append(target)
                continue
        shutil.copyfile(path, target)
        written.append(target)
    return written
