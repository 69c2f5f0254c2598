"""patch_hf: swap the fused modules into a transformers model in place, and is_patched.

Each of patch_hf's options is a :class:`_Part` of :data:`PARTS`: which slots of every layer it fills
(a :class:`fastbert.hf.families.Slot` and the fused class for it), what must hold of the whole model and
of each module for the fused module to compute exactly what transformers does, and whether the part is
all-or-nothing. One loop, :func:`_patch_part`, walks the layers for every part.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

from torch import nn

from fastbert.hf.attn_implementation import register_attention
from fastbert.hf.encoder import FusedBertEncoder
from fastbert.hf.families import (
    AddNormChildren,
    Family,
    IntermediateChildren,
    family_of,
    find_base,
    is_hf,
    require_transformers_5,
)
from fastbert.hf.fused import FusedBertIntermediate, FusedBertOutput, FusedBertSelfAttention, FusedBertSelfOutput
from fastbert.hf.heads import reads_per_token, wrap_head_forward
from fastbert.hf.mlm_loss import has_fused_decoder, install_fused_decoder


def _no_blockers(base: nn.Module, family: Family) -> list[str]:
    return []


def _no_misfit(module: nn.Module, children: Any, config: Any) -> str | None:
    return None


def _attention_blockers(base: nn.Module, family: Family) -> list[str]:
    """Why the fused attention cannot replace this model's attention, whatever its layers hold."""
    config = base.config
    reasons = []
    if getattr(config, "is_decoder", False):
        reasons.append("the model is a decoder (causal self-attention)")
    if getattr(config, "add_cross_attention", False):
        reasons.append("the model has cross-attention layers")
    position_type = getattr(config, "position_embedding_type", "absolute")
    if position_type not in (None, "absolute"):
        reasons.append(f"position_embedding_type={position_type!r} (relative positions inside attention)")
    encoder = base.encoder
    if not isinstance(encoder, FusedBertEncoder) and not is_hf(encoder, family.cls("Encoder")):
        reasons.append(f"the encoder is a {type(encoder).__name__}, not transformers' {family.prefix}Encoder")
    return reasons


def _attention_misfit(module: nn.Module, children: Any, config: Any) -> str | None:
    if getattr(module, "position_embedding_type", "absolute") not in (None, "absolute") or getattr(
            module, "is_decoder", False):
        return "uses relative positions or is a decoder's"
    return None


def _add_norm_misfit(module: nn.Module, children: AddNormChildren, config: Any) -> str | None:
    norm, dense = getattr(module, children.layer_norm, None), getattr(module, children.dense, None)
    if not (isinstance(norm, nn.LayerNorm) and norm.weight is not None and norm.bias is not None
            and tuple(norm.normalized_shape) == (config.hidden_size,) and isinstance(dense, nn.Linear)):
        return (f"has no nn.Linear {children.dense!r} followed by an nn.LayerNorm {children.layer_norm!r} with weight "
                f"and bias over hidden_size={config.hidden_size}")
    return None


def _gelu_blockers(base: nn.Module, family: Family) -> list[str]:
    act = base.config.hidden_act
    if isinstance(act, str) and act == "gelu":
        return []
    return [f"hidden_act={act!r} is not the exact erf GELU that fastbert.ops.bias_gelu computes"]


def _intermediate_misfit(module: nn.Module, children: IntermediateChildren, config: Any) -> str | None:
    if getattr(getattr(module, children.dense, None), "bias", None) is None:
        return f"has no nn.Linear {children.dense!r} with a bias"
    return None


@dataclasses.dataclass(frozen=True)
class _Part:
    """One of patch_hf's options (also is_patched's key): the fused class for each slot it fills, and when
    it may. ``blockers`` gives reasons that hold for the whole model; ``misfit`` a reason one module (of
    transformers' class for the slot) cannot be fused. ``whole_model``: fill every layer or none."""

    option: str
    what: str  # the subject of the warning when it cannot be applied everywhere
    slots: tuple[tuple[str, type], ...]  # (Family slot attribute, fused class)
    whole_model: bool
    blockers: Callable[[nn.Module, Family], list[str]] = _no_blockers
    misfit: Callable[[nn.Module, Any, Any], str | None] = _no_misfit


PARTS = (
    # All or nothing: the fused encoder hands every layer an EncoderLayout, which only the fused attention reads.
    _Part("attention", "attention", (("attention", FusedBertSelfAttention),), whole_model=True,
          blockers=_attention_blockers, misfit=_attention_misfit),
    _Part("layer_norm", "dropout+residual+LayerNorm",
          (("attention_output", FusedBertSelfOutput), ("output", FusedBertOutput)), whole_model=False,
          misfit=_add_norm_misfit),
    _Part("gelu", "bias+GELU", (("intermediate", FusedBertIntermediate),), whole_model=False,
          blockers=_gelu_blockers, misfit=_intermediate_misfit),
)


def _patch_part(part: _Part, base: nn.Module, family: Family) -> list[str]:
    """Put ``part``'s fused modules into every layer of ``base`` where they compute exactly what
    transformers does; returns the reasons where not (empty: the part now runs in every layer)."""
    blockers = part.blockers(base, family)
    reasons, fits = list(blockers), []
    for i, layer in enumerate(base.encoder.layer):
        for slot_name, fused in part.slots:
            slot = family.slot(slot_name)
            owner, name, module = slot.locate(layer)
            if isinstance(module, fused):
                continue
            cls = family.cls(slot.class_suffix)
            if module is None:
                why = f"is missing (transformers' {cls.__name__} belongs there)"
            elif not is_hf(module, cls):
                why = f"is a {type(module).__name__}, not transformers' {cls.__name__}"
            else:
                why = part.misfit(module, slot.children, base.config)
            if why:
                reasons.append(f"layer {i}'s {slot.path} {why}")
            else:
                fits.append((owner, name, fused, module, slot.children))
    if not blockers and not (part.whole_model and reasons):
        for owner, name, fused, module, children in fits:
            setattr(owner, name, fused(module, children))
    return reasons


def _warn(what: str, reasons: list[str]) -> None:
    # stacklevel 3: the warning names the line that called patch_hf
    warnings.warn(f"fastbert.patch_hf: {what} left as transformers' own: " + "; ".join(dict.fromkeys(reasons)),
                  stacklevel=3)


def patch_hf(model: nn.Module, attention: bool = True, layer_norm: bool = True, gelu: bool = True, *,
             unpad: bool | None = None, fused_mlm_loss: bool = False) -> nn.Module:
    """Swap fastbert's fused layers into a transformers BERT-family model in place; returns ``model``.

    model: a transformers BERT, RoBERTa, XLM-RoBERTa, CamemBERT or ELECTRA model, bare (``BertModel``)
    or a head around one (``model.bert`` / ``.roberta`` / ``.electra``).
    attention: the encoder becomes a :class:`FusedBertEncoder` and each layer's ``attention.self`` a
    :class:`FusedBertSelfAttention` (one q/k/v GEMM, :func:`fastbert.ops.attention` with a key-padding
    mask, or ``attention_varlen`` unpadded).
    layer_norm: ``attention.output`` and ``output`` compute ``dropout_add_layer_norm``.
    gelu: ``intermediate`` computes ``bias_gelu`` (only where ``hidden_act == "gelu"``, the exact erf form).
    unpad: None runs the encoder unpadded exactly when a fused varlen kernel will take it (the triton
    backend on a GPU); True/False force it. Even then a call runs padded where dropping the padding
    would change what transformers' heads read (see :mod:`fastbert.hf`).
    fused_mlm_loss: opt-in, for ``BertForMaskedLM``, ``BertForPreTraining``, ``RobertaForMaskedLM``,
    ``XLMRobertaForMaskedLM``, ``CamembertForMaskedLM`` and ``ElectraForMaskedLM``: a call with labels
    (``BertForPreTraining``: labels and ``next_sentence_label``) computes the masked-LM loss by
    :func:`fastbert.ops.mlm_loss` on the labelled positions only, without the (batch x seq, vocab) logits,
    and returns ``logits=None`` (``prediction_logits=None``); same loss and gradients as transformers, except
    that a batch with no labelled position gives a loss of 0 where transformers gives NaN. Calls without
    labels return transformers' logits exactly. See :mod:`fastbert.hf.mlm_loss`.

    The fused modules keep the original ``nn.Linear``/``nn.LayerNorm``/``nn.Dropout`` children: same
    parameter names, same tensors (no copies), same state_dict, so optimizers, checkpoints and
    ``save_pretrained`` are unaffected. A transformers head class gets a class-level ``forward`` wrapper
    (unpatched models of that class run the original unchanged). A part that cannot be fused exactly
    (decoder or cross-attention use, relative position embeddings, another activation) is left in
    place with a warning. A call with ``output_attentions=True`` runs padded with transformers' own
    attention function in every layer (with a warning) and returns transformers' attention maps. At call
    time the patched model rejects ``head_mask`` and 4-D masks that are not padding masks. Patching twice
    is harmless (the second call may change ``unpad``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastbert.patch_hf takes a torch.nn.Module, got {type(model).__name__}")
    if unpad is not None and not isinstance(unpad, bool):
        raise TypeError(f"unpad must be None, True or False, got {unpad!r}")
    if not isinstance(fused_mlm_loss, bool):
        raise TypeError(f"fused_mlm_loss must be True or False, got {fused_mlm_loss!r}")
    require_transformers_5()
    family, base = find_base(model)
    register_attention()
    # A head whose calls cannot say whether they read padding keeps it, when it reads per-token positions.
    head = model if model is not base and family_of(model) is family else None
    keeps_padding = (head is not None and reads_per_token(type(head))
                     and not (attention and wrap_head_forward(type(head), family)))
    if fused_mlm_loss:
        why = install_fused_decoder(model)
        if why is None and not wrap_head_forward(type(model), family):
            why = f"{type(model).__name__}.forward takes no **kwargs"
        if why:
            _warn("the masked-LM loss", [why])

    requested = {"attention": attention, "layer_norm": layer_norm, "gelu": gelu}
    complete = {}
    for part in PARTS:
        if requested[part.option]:
            reasons = _patch_part(part, base, family)
            if reasons:
                _warn(part.what, reasons)
            complete[part.option] = not reasons
    if complete.get("attention"):
        _install_encoder(base, unpad, keeps_padding)
    return model


def _install_encoder(base: nn.Module, unpad: bool | None, keeps_padding: bool) -> None:
    """The fused encoder in place of transformers' (or, patched before, with these settings)."""
    if isinstance(base.encoder, FusedBertEncoder):
        base.encoder.unpad = unpad
        base.encoder.keeps_padding = keeps_padding
    else:
        config = base.config
        base.encoder = FusedBertEncoder(base.encoder, unpad, config.hidden_size // config.num_attention_heads,
                                        keeps_padding)


def is_patched(model: nn.Module) -> dict[str, bool]:
    """Which fused layers ``model`` (a supported transformers model) runs: ``{"attention", "layer_norm", "gelu"}``
    → bool (True only when every layer has it), and ``"fused_mlm_loss"`` → whether its MLM head's decoder is
    fastbert's."""
    family, base = find_base(model)
    layers = list(base.encoder.layer)
    state = {part.option: all(isinstance(family.slot(slot).locate(layer)[2], fused)
                              for layer in layers for slot, fused in part.slots)
             for part in PARTS}
    state["attention"] = state["attention"] and isinstance(base.encoder, FusedBertEncoder)
    state["fused_mlm_loss"] = model is not base and has_fused_decoder(model)
    return state
