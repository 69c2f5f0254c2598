"""fastbert: fast BERT pre-training and drop-in fused BERT layers.

Importing fastbert imports torch only: no triton, no CUDA query, no build. Kernels and the C++
extension load lazily the first time an op needs them.
"""
from fastbert import backend, masking, ops
from fastbert.config import BertConfig
from fastbert.hf import patch_hf, patch_hf_classes
from fastbert.modeling import (
    BertForMaskedLM,
    BertForPreTraining,
    BertForSequenceClassification,
    BertModel,
    BertPreTrainedModel,
)
from fastbert.outputs import (
    BaseModelOutputWithPooling,
    BertForPreTrainingOutput,
    MaskedLMOutput,
    SequenceClassifierOutput,
)

__version__ = "0.1.0"

__all__ = [
    "BaseModelOutputWithPooling",
    "BertConfig",
    "BertForMaskedLM",
    "BertForPreTraining",
    "BertForPreTrainingOutput",
    "BertForSequenceClassification",
    "BertModel",
    "BertPreTrainedModel",
    "MaskedLMOutput",
    "SequenceClassifierOutput",
    "backend",
    "masking",
    "ops",
    "patch_hf",
    "patch_hf_classes",
]
