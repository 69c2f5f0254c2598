"""``patch_hf(model, fused_mlm_loss=True)``: transformers' MLM heads compute their loss by
:func:`fastbert.ops.mlm_loss` on the labelled positions only, never materialising the (batch x seq,
vocab) logits or their gradient.

The head's decoder ``nn.Linear`` (hidden -> vocabulary) becomes a :class:`FusedMlmDecoder` holding the
very same ``weight`` and ``bias`` Parameters (names, tying and state_dict unchanged). It computes exactly
``F.linear`` unless the head's class-level ``forward`` wrapper (:mod:`fastbert.hf.heads`) has handed it
this call's labels: then it computes the loss, leaves it in the hand-off and returns None, and the
wrapper, having called transformers' ``forward`` with ``labels=None``, returns transformers' output with
that loss (plus the next-sentence loss for ``BertForPreTraining``) and ``logits=None``.

The hand-off is a :class:`contextvars.ContextVar`, set and reset around the one call: it belongs to the
calling thread, so threads and ``nn.DataParallel`` replicas sharing a model never see each other's labels,
and the decoder checks that the hand-off is addressed to it.
"""
from __future__ import annotations

import contextvars
import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastbert.hf.families import locate_path
from fastbert.masking import IGNORE_INDEX

# Where each transformers MLM head keeps its decoder Linear, and whether its loss also needs a
# next-sentence label (transformers' BertForPreTraining computes a loss only when given both labels).
DECODER_PATHS = {
    "BertForMaskedLM": "cls.predictions.decoder",
    "BertForPreTraining": "cls.predictions.decoder",
    "RobertaForMaskedLM": "lm_head.decoder",
    "XLMRobertaForMaskedLM": "lm_head.decoder",
    "CamembertForMaskedLM": "lm_head.decoder",
    "ElectraForMaskedLM": "generator_lm_head",
}
NEEDS_NEXT_SENTENCE_LABEL = ("BertForPreTraining",)


@dataclasses.dataclass
class _HandOff:
    decoder: nn.Module
    labels: torch.Tensor
    loss: torch.Tensor | None = None


_PENDING: contextvars.ContextVar[_HandOff | None] = contextvars.ContextVar("fastbert_mlm_hand_off", default=None)


class FusedMlmDecoder(nn.Linear):
    """An MLM head's decoder ``nn.Linear`` that, when handed the call's labels, computes the masked-LM loss
    with :func:`fastbert.ops.mlm_loss` on the labelled rows instead of the logits (and returns None).
    Otherwise (no labels: inference, or a head calling it outside the wrapper) it is ``F.linear`` exactly."""

    def __init__(self, decoder: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = decoder.in_features, decoder.out_features
        self.weight = decoder.weight  # the same Parameters: tied embeddings and state_dict unchanged
        self.register_parameter("bias", decoder.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        hand_off = _PENDING.get()
        if hand_off is None or hand_off.decoder is not self:
            return F.linear(hidden, self.weight, self.bias)
        from fastbert.ops import mlm_loss

        labels = hand_off.labels.to(hidden.device)
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} (batch, sequence), got "
                             f"{tuple(labels.shape)}")
        rows = labels != IGNORE_INDEX
        hand_off.loss, _ = mlm_loss(hidden[rows], self.weight, self.bias, labels[rows])
        return None


def decoder_of(head: nn.Module) -> tuple[nn.Module | None, str, nn.Module | None]:
    """(owner, attribute, module) of a head's MLM decoder; (None, "", None) for a head without one."""
    path = DECODER_PATHS.get(type(head).__name__)
    return (None, "", None) if path is None else locate_path(head, path)


def install_fused_decoder(model: nn.Module) -> str | None:
    """Put a :class:`FusedMlmDecoder` in place of the decoder of ``model`` (one of transformers' MLM heads);
    the reason why not, or None."""
    name = type(model).__name__
    if name not in DECODER_PATHS or not type(model).__module__.startswith("transformers."):
        return f"{name} is not one of transformers' " + ", ".join(DECODER_PATHS)
    owner, attribute, decoder = decoder_of(model)
    if isinstance(decoder, FusedMlmDecoder):
        return None
    if type(decoder) is not nn.Linear:
        return f"{name}.{DECODER_PATHS[name]} is a {type(decoder).__name__}, not the nn.Linear transformers builds"
    setattr(owner, attribute, FusedMlmDecoder(decoder))
    return None


def has_fused_decoder(head: nn.Module) -> bool:
    return isinstance(decoder_of(head)[2], FusedMlmDecoder)


def fused_loss_forward(head: nn.Module, original, labels: torch.Tensor, next_sentence_label: Any,
                       args: tuple, kwargs: dict):
    """Call transformers' ``forward`` (``args``/``kwargs`` with the labels already set to None) while the
    head's fused decoder computes the MLM loss from ``labels``; returns transformers' output with that loss,
    as a tuple where transformers would return one."""
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:  # as transformers' can_return_tuple resolves it
        return_dict = getattr(head.config, "return_dict", True)
    hand_off = _HandOff(decoder_of(head)[2], labels)
    token = _PENDING.set(hand_off)
    try:
        output = original(head, *args, return_dict=True, **kwargs)
    finally:
        _PENDING.reset(token)
    if hand_off.loss is None:
        raise RuntimeError(f"fastbert.patch_hf(fused_mlm_loss=True): {type(head).__name__}'s forward never "
                           "called its decoder, so no loss was computed")
    loss = hand_off.loss
    if next_sentence_label is not None:  # transformers' next-sentence loss, on its own logits
        scores = output.seq_relationship_logits
        loss = loss + F.cross_entropy(scores.view(-1, 2), next_sentence_label.to(scores.device).view(-1))
    output = dataclasses.replace(output, loss=loss)
    return output if return_dict else output.to_tuple()
