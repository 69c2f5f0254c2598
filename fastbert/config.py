"""BertConfig: Hugging Face ``config.json`` field names, offline presets, validation."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastbert.activations import ACTIVATIONS

# Google's published BERT sizes (the BERT README and the "Well-Read Students" small models).
_PRESETS: dict[str, dict[str, Any]] = {
    "bert-base-uncased": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large-uncased": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "bert-base-cased": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                            vocab_size=28996),
    "bert-tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "bert-mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "bert-small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048),
    "bert-medium": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048),
}
# Hub spellings of the same checkpoints, so configs copied from HF code work offline too.
_ALIASES = {
    "google-bert/bert-base-uncased": "bert-base-uncased",
    "google-bert/bert-large-uncased": "bert-large-uncased",
    "google-bert/bert-base-cased": "bert-base-cased",
    "google/bert_uncased_L-2_H-128_A-2": "bert-tiny",
    "google/bert_uncased_L-4_H-256_A-4": "bert-mini",
    "google/bert_uncased_L-4_H-512_A-8": "bert-small",
    "google/bert_uncased_L-8_H-512_A-8": "bert-medium",
    "prajjwal1/bert-tiny": "bert-tiny",
    "prajjwal1/bert-mini": "bert-mini",
    "prajjwal1/bert-small": "bert-small",
    "prajjwal1/bert-medium": "bert-medium",
}

# Keys transformers writes that carry no information for this model; dropped on load.
_IGNORED_KEYS = {"model_type", "transformers_version", "_name_or_path"}


# The largest size of each field fastbert builds a model with: far beyond any released BERT (XLM-R's
# vocabulary is 250 002, BERT-large's intermediate 4 096), so that a damaged config.json (a size of
# 10**12) is refused by name before anything is allocated.
SIZE_LIMITS = {
    "vocab_size": 1 << 22, "hidden_size": 1 << 15, "num_hidden_layers": 1 << 10, "num_attention_heads": 1 << 10,
    "intermediate_size": 1 << 17, "max_position_embeddings": 1 << 20, "type_vocab_size": 1 << 16,
    "num_labels": 1 << 20,
}


@dataclass
class BertConfig:
    """A BERT architecture. Field names are those of HF ``config.json``; unknown keys are kept in
    ``extra`` and written back by :meth:`to_dict`, so a config survives a round trip."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    classifier_dropout: float | None = None
    num_labels: int = 2
    problem_type: str | None = None
    tie_word_embeddings: bool = True
    architectures: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        for name, largest in SIZE_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BertConfig.{name} must be a positive integer, got {value!r}")
            if value > largest:  # before any allocation: a typo'd 10**12 is a message, not an allocator trace
                raise ValueError(f"BertConfig.{name} is {value}, more than fastbert builds ({largest}); "
                                 "is the config.json damaged?")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"BertConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"BertConfig.{name} must be in [0, 1), got {value!r}")
        if self.classifier_dropout is not None and not 0.0 <= self.classifier_dropout < 1.0:
            raise ValueError(f"BertConfig.classifier_dropout must be in [0, 1) or None, got {self.classifier_dropout!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"BertConfig.hidden_act {self.hidden_act!r} is not supported; use one of {tuple(ACTIVATIONS)}")
        if self.position_embedding_type != "absolute":
            raise ValueError(
                f"BertConfig.position_embedding_type {self.position_embedding_type!r} is not supported; "
                "fastbert implements BERT's 'absolute' position embeddings only"
            )
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"BertConfig.pad_token_id ({self.pad_token_id}) must be in [0, vocab_size={self.vocab_size})")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"BertConfig.layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if not self.initializer_range > 0:
            raise ValueError(f"BertConfig.initializer_range must be positive, got {self.initializer_range!r}")
        if self.problem_type not in (None, "regression", "single_label_classification", "multi_label_classification"):
            raise ValueError(f"BertConfig.problem_type {self.problem_type!r} is not one of HF's problem types")

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def presets(cls) -> list[str]:
        return list(_PRESETS)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BertConfig":
        data = dict(data)
        model_type = data.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"config has model_type {model_type!r}; fastbert loads BERT configs ('bert') only")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known and k not in _IGNORED_KEYS}
        extra.update(data.get("extra", {}))
        if "num_labels" not in kwargs and isinstance(extra.get("id2label"), dict):
            kwargs["num_labels"] = len(extra["id2label"])
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "BertConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"no config file at {path}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **overrides: Any) -> "BertConfig":
        """A preset name (``bert-base-uncased``, ``bert-tiny``, ...; offline), a directory holding
        ``config.json``, or a path to a config JSON file. Keyword arguments override fields."""
        key = str(name_or_path)
        path = Path(key)
        if path.is_dir():
            config = cls.from_json_file(path / "config.json")
        elif path.is_file():
            config = cls.from_json_file(path)
        elif _ALIASES.get(key, key) in _PRESETS:
            config = cls(**_PRESETS[_ALIASES.get(key, key)])
        else:
            raise ValueError(
                f"{key!r} is neither a directory with config.json, a config file, nor a preset; "
                f"presets: {', '.join(_PRESETS)}"
            )
        return config.replace(**overrides) if overrides else config

    def replace(self, **changes: Any) -> "BertConfig":
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"BertConfig has no field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    # ---- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` content transformers reads (``model_type: bert``)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        data.update(self.extra)
        if data.get("architectures") is None:
            data.pop("architectures")
        if data.get("problem_type") is None:
            data.pop("problem_type")
        # transformers derives num_labels from id2label; keep the two consistent.
        id2label = data.get("id2label")
        if not isinstance(id2label, dict) or len(id2label) != self.num_labels:
            data["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            data["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        data.pop("num_labels")
        data["model_type"] = "bert"
        return dict(sorted(data.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` into ``directory`` (atomically) and return its path."""
        from fastbert._atomic import atomic_write_text

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(directory / "config.json", self.to_json_string())
