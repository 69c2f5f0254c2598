"""Head-class wrappers: on a patched model, each call of a transformers head tells the fused encoder
whether the head reads padding positions (question answering, per-token labels that are not -100 at
padding), so that the encoder keeps the padding for exactly those calls; and, on an MLM head patched
with ``fused_mlm_loss=True``, a call with labels computes its loss by the fused decoder
(:mod:`fastbert.hf.mlm_loss`).

The wrapper is installed once on the head *class* (unpatched models of the class run the original
``forward``), because a class-level ``forward`` is reached however the model is called; see
:mod:`fastbert.hf` for why not hooks or instance-bound functions.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from fastbert.hf.encoder import KEEP_PADDING, FusedBertEncoder
from fastbert.hf.families import Family
from fastbert.hf.mlm_loss import NEEDS_NEXT_SENTENCE_LABEL, fused_loss_forward, has_fused_decoder
from fastbert.masking import IGNORE_INDEX

# Heads whose outputs or losses read every position (question answering) or per-token labels, so that a
# call with unknown labels must keep the padding. Sequence-level heads read only position 0.
PER_TOKEN_HEADS = ("ForMaskedLM", "ForTokenClassification", "ForPreTraining", "ForQuestionAnswering",
                   "ForCausalLM", "LMHeadModel")


def reads_per_token(cls: type) -> bool:
    return cls.__name__.endswith(PER_TOKEN_HEADS)


def _labels_at_padding(labels: Any, mask: Any) -> bool:
    """Per-token labels (same shape as the mask) that a loss reads at padding positions."""
    if not (isinstance(labels, torch.Tensor) and isinstance(mask, torch.Tensor)) or labels.shape != mask.shape:
        return False
    return bool(((labels != IGNORE_INDEX) & (mask.to(labels.device) == 0)).any())


def wrap_head_forward(cls: type, family: Family) -> bool:
    """Wrap a transformers head class's ``forward`` (once) so that, on a patched model, each call tells the
    fused encoder whether it must keep the padding, and an MLM head with a fused decoder computes its loss
    there. Unpatched models of the class run the original. False where that is impossible (a ``forward``
    without ``**kwargs`` to pass the flag through)."""
    original = cls.forward
    if getattr(original, "_fastbert_original", None) is not None:
        return True
    params = inspect.signature(original).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return False
    names = list(params)[1:]  # without self
    reads_all = cls.__name__.endswith("ForQuestionAnswering")
    needs_next_sentence_label = cls.__name__ in NEEDS_NEXT_SENTENCE_LABEL

    def positional(args: tuple, name: str) -> int | None:
        """Where ``name`` sits in ``args``, if it was passed by position."""
        index = names.index(name) if name in names else len(args)
        return index if index < len(args) else None

    def argument(args: tuple, kwargs: dict, name: str) -> Any:
        if name in kwargs:
            return kwargs[name]
        index = positional(args, name)
        return None if index is None else args[index]

    def without(args: tuple, kwargs: dict, name: str) -> tuple[tuple, dict]:
        """The call's arguments with ``name`` set to None (wherever it was passed)."""
        if name in kwargs:
            return args, {**kwargs, name: None}
        index = positional(args, name)
        return (args if index is None else args[:index] + (None,) + args[index + 1:]), kwargs

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        base = getattr(self, family.base_attr, None)
        if isinstance(getattr(base, "encoder", None), FusedBertEncoder) and KEEP_PADDING not in kwargs:
            keep = reads_all or _labels_at_padding(argument(args, kwargs, "labels"),
                                                   argument(args, kwargs, "attention_mask"))
            kwargs = {KEEP_PADDING: keep, **kwargs}
        labels = argument(args, kwargs, "labels")
        next_sentence_label = argument(args, kwargs, "next_sentence_label") if needs_next_sentence_label else None
        if labels is None or (needs_next_sentence_label and next_sentence_label is None) or not has_fused_decoder(self):
            return original(self, *args, **kwargs)
        args, kwargs = without(args, kwargs, "labels")
        if needs_next_sentence_label:
            args, kwargs = without(args, kwargs, "next_sentence_label")
        return fused_loss_forward(self, original, labels, next_sentence_label, args, kwargs)

    forward._fastbert_original = original
    cls.forward = forward
    return True
