"""BERT's task heads with Hugging Face's names (``cls.predictions``, ``cls.seq_relationship``) and the
losses the top-level models compute on them: masked LM (on the masked positions only, by the fused
decoder + cross-entropy unless the logits are asked for), next sentence prediction, sequence
classification.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastbert import ops
from fastbert._model_inputs import check_labels, check_masked_positions
from fastbert._validation import check_tensor
from fastbert.activations import ACTIVATIONS
from fastbert.config import BertConfig
from fastbert.masking import IGNORE_INDEX


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.hidden_act = config.hidden_act
        self.transform_act_fn = ACTIVATIONS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.hidden_act == "gelu":
            hidden_states = ops.bias_gelu(F.linear(hidden_states, self.dense.weight), self.dense.bias)
        else:
            hidden_states = self.transform_act_fn(self.dense(hidden_states))
        return ops.dropout_add_layer_norm(hidden_states, None, self.LayerNorm.weight, self.LayerNorm.bias,
                                          self.LayerNorm.eps, 0.0)


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        # The decoder weight is tied to the word embeddings by the model; its bias is `self.bias`.
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, sequence_output: torch.Tensor) -> torch.Tensor:
        return self.predictions(sequence_output)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, sequence_output: torch.Tensor, pooled_output: torch.Tensor):
        return self.predictions(sequence_output), self.seq_relationship(pooled_output)


# ---------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------
class MaskedLMResult(NamedTuple):
    """What :func:`masked_lm` returns; every field but ``logits`` is None without labels."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None
    num_correct: torch.Tensor | None  # 0-d int64: masked targets that are the argmax of their logits
    num_targets: torch.Tensor | None  # 0-d int64: the masked targets (labels != -100)


def masked_lm(head: BertLMPredictionHead, sequence_output: torch.Tensor, labels: torch.Tensor | None,
              vocab_size: int, masked_positions: torch.Tensor | None = None, return_logits: bool = False
              ) -> MaskedLMResult:
    """MLM logits, loss and accuracy counts. With labels the head (the decoder is the largest GEMM of
    pre-training) runs only on the masked positions: the transform, then :func:`fastbert.ops.mlm_loss`
    with the decoder's weight and bias, which never holds the (num_masked, vocab) logits; ``logits`` is
    None unless ``return_logits``, which computes them as before (and the loss from them). Without
    labels: the (batch, seq, vocab) logits whatever ``return_logits`` says, and no loss.

    ``masked_positions``: the flat indices of ``labels != -100`` (row-major), as the collator computes
    them on the CPU. Given, the step needs no device→host sync; otherwise they are found here (a
    ``nonzero``, which syncs on CUDA)."""
    if not isinstance(return_logits, bool):
        raise TypeError(f"return_logits must be True or False, got {return_logits!r}")
    if labels is None:
        return MaskedLMResult(head(sequence_output), None, None, None)
    check_labels("labels", labels, tuple(sequence_output.shape[:2]), vocab_size, allow_ignore=True)
    flat_labels = labels.reshape(-1)
    if masked_positions is None:
        masked_positions = torch.nonzero(flat_labels != IGNORE_INDEX).flatten()
    else:
        check_masked_positions(masked_positions, flat_labels)
    targets = flat_labels.index_select(0, masked_positions)
    hidden = sequence_output.reshape(-1, sequence_output.shape[-1]).index_select(0, masked_positions)
    num_targets = masked_positions.new_full((), targets.numel(), dtype=torch.int64)
    if not return_logits:
        loss, num_correct = ops.mlm_loss(head.transform(hidden), head.decoder.weight, head.bias, targets)
        return MaskedLMResult(None, loss, num_correct, num_targets)
    logits = head(hidden)
    # Sum / count keeps a batch with no masked token at loss 0 instead of NaN (as mlm_loss does).
    loss = F.cross_entropy(logits.float(), targets, reduction="sum") / max(targets.numel(), 1)
    num_correct = (logits.detach().argmax(-1) == targets).sum()
    return MaskedLMResult(logits, loss, num_correct, num_targets)


def next_sentence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the (num_sequences, 2) NSP logits; labels 0 = B follows A, 1 = B is random."""
    check_labels("next_sentence_label", labels, (logits.shape[0],), 2, allow_ignore=False)
    return F.cross_entropy(logits.float(), labels)


def sequence_classification_loss(logits: torch.Tensor, labels: torch.Tensor, problem_type: str | None
                                 ) -> torch.Tensor:
    """Loss as transformers: one label → MSE regression; integer labels → cross-entropy; float
    (batch, num_labels) labels → multi-label BCE. ``problem_type`` (the config's) overrides the guess."""
    batch, num_labels = logits.shape
    problem = problem_type
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif not labels.dtype.is_floating_point:
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        check_tensor("labels", labels)
        if labels.numel() != batch * num_labels:
            raise ValueError(f"regression labels must hold {batch * num_labels} values, got shape "
                             f"{tuple(labels.shape)}")
        return F.mse_loss(logits.float().view(-1), labels.float().view(-1))
    if problem == "single_label_classification":
        check_labels("labels", labels, (batch,), num_labels, allow_ignore=True)
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
    check_tensor("labels", labels)
    if tuple(labels.shape) != (batch, num_labels):
        raise ValueError(f"multi-label labels must have shape {(batch, num_labels)}, got {tuple(labels.shape)}")
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
