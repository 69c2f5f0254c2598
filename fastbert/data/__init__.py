"""The data path: corpus → WordPiece vocabulary → token shards → BERT sentence pairs → MLM batches.

Import-light on purpose: numpy, torch and ``tokenizers`` only (no transformers, no ``datasets``, no
triton). ``prepare_corpus`` writes a prepared folder, ``load_prepared`` opens one, ``BertPairDataset``
builds pre-training pairs from it, ``PretrainSampler`` orders them for each rank, and ``MLMCollator``
pads or packs them and masks them (C++).
"""
from fastbert.data.builtin import builtin_corpus_path
from fastbert.data.collator import MLMCollator
from fastbert.data.corpus import BUILTIN, Corpus, read_documents
from fastbert.data.packing import PackingPlan, plan_packing, plan_packing_reference
from fastbert.data.pairs import BertPairDataset, PretrainSampler
from fastbert.data.prepare import PreparedData, load_prepared, prepare_corpus
from fastbert.data.shards import TokenStore
from fastbert.data.text import split_sentences
from fastbert.data.tokenizer import (
    SPECIAL_TOKENS,
    SpecialTokenIds,
    WordPieceTokenizer,
    load_wordpiece,
    train_wordpiece,
)

__all__ = [
    "BUILTIN",
    "BertPairDataset",
    "Corpus",
    "MLMCollator",
    "PackingPlan",
    "PreparedData",
    "PretrainSampler",
    "SPECIAL_TOKENS",
    "SpecialTokenIds",
    "TokenStore",
    "WordPieceTokenizer",
    "builtin_corpus_path",
    "load_prepared",
    "load_wordpiece",
    "plan_packing",
    "plan_packing_reference",
    "prepare_corpus",
    "read_documents",
    "split_sentences",
    "train_wordpiece",
]
