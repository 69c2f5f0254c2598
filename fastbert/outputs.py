"""Model outputs with HF's field names that also index and unpack like tuples (``out[0]``, ``out[1]``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator

import torch


@dataclass
class ModelOutput:
    """Fields that are None are left out of the tuple view, as in transformers."""

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v for v in (getattr(self, f.name) for f in dataclasses.fields(self)) if v is not None)

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            if key not in {f.name for f in dataclasses.fields(self)}:
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.to_tuple())

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


@dataclass
class BaseModelOutputWithPooling(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None


@dataclass
class BertForPreTrainingOutput(ModelOutput):
    """``prediction_logits`` is (batch, seqlen, vocab) without labels. With labels the head runs on the
    masked positions only and the loss is fused (no logits): it is None, or with ``return_logits=True``
    (num_masked, vocab), rows in row-major order of ``labels != -100``. With labels, ``mlm_num_correct``
    and ``mlm_num_targets`` (0-d int64, on the device) count the masked targets the head gets right and
    all of them: the accuracy without the logits."""

    loss: torch.Tensor | None = None
    prediction_logits: torch.Tensor | None = None
    seq_relationship_logits: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    nsp_loss: torch.Tensor | None = None
    mlm_num_correct: torch.Tensor | None = None
    mlm_num_targets: torch.Tensor | None = None


@dataclass
class MaskedLMOutput(ModelOutput):
    """``logits`` as ``prediction_logits`` above: full without labels; with labels None, or the masked
    rows only with ``return_logits=True``. ``num_correct`` / ``num_targets`` as ``mlm_num_*`` above."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    num_correct: torch.Tensor | None = None
    num_targets: torch.Tensor | None = None


@dataclass
class SequenceClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
