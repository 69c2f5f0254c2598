"""patch_hf_classes: every supported transformers model built from now on is patched as by patch_hf,
by wrapping each model and head class's ``__init__`` (undone by unpatch_hf_classes)."""
from __future__ import annotations

import functools
import sys

from fastbert.hf.attn_implementation import register_attention
from fastbert.hf.families import FAMILIES, model_classes
from fastbert.hf.mlm_loss import DECODER_PATHS
from fastbert.hf.patch import patch_hf


def patch_hf_classes(attention: bool = True, layer_norm: bool = True, gelu: bool = True, *,
                     unpad: bool | None = None, fused_mlm_loss: bool = False) -> None:
    """Patch every transformers BERT, RoBERTa, XLM-RoBERTa, CamemBERT and ELECTRA model (bare or head)
    constructed from now on, as :func:`patch_hf` does.

    ``fused_mlm_loss=True`` applies to the MLM heads only (other models are patched without it, silently).
    Call it before ``from_pretrained`` (or before building a model). Calling it again replaces the options;
    :func:`unpatch_hf_classes` restores transformers' behaviour for models built afterwards.
    """
    register_attention()
    for family in FAMILIES:
        for cls in model_classes(family):
            original = cls.__dict__.get("__init__")
            if original is None:
                continue
            original = getattr(original, "_fastbert_original", original)
            options = dict(unpad=unpad, fused_mlm_loss=fused_mlm_loss and cls.__name__ in DECODER_PATHS)
            cls.__init__ = _patching_init(original, (attention, layer_norm, gelu), options)


def _patching_init(original, parts: tuple[bool, bool, bool], options: dict):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if type(self).__init__ is __init__:  # only the outermost constructor of the object patches it
            patch_hf(self, *parts, **options)

    __init__._fastbert_original = original
    return __init__


def unpatch_hf_classes() -> None:
    """Undo :func:`patch_hf_classes` (models already built stay patched)."""
    for family in FAMILIES:
        if family.module not in sys.modules:
            continue
        for cls in model_classes(family):
            original = getattr(cls.__dict__.get("__init__"), "_fastbert_original", None)
            if original is not None:
                cls.__init__ = original
