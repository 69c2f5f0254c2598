"""Put fastbert's fused layers into a transformers BERT, in place, without touching its weights.

Three ways, each changing more of the model:

* ``attn_implementation="fastbert"`` — after :func:`register_attention` (transformers >= 5, which has
  attention and mask registries), ``transformers.BertModel.from_pretrained(path,
  attn_implementation="fastbert")`` runs only the attention core, softmax(q kᵀ) v, through
  :func:`fastbert.ops.attention`, fed a (batch, seq) key-padding mask instead of a 4-D mask. The q/k/v
  projections, LayerNorms and GELU stay transformers' and the batch stays padded.
* :func:`patch_hf` — swaps every layer's self-attention, self-output, intermediate and output modules
  for fastbert's (one fused q/k/v GEMM + fused attention, dropout+residual+LayerNorm, bias+GELU).
  The new modules hold the very same ``nn.Linear``/``nn.LayerNorm`` children, so parameter names,
  tensors and the state_dict do not change. The padding mask reaches the attention as a key-padding
  mask; when a fused varlen kernel will run (the triton backend), the encoder drops the padding once
  before the first layer and restores it once after the last (padding positions then hold zeros).
* :func:`patch_hf_classes` — every transformers ``BertModel`` built afterwards (``from_pretrained`` and
  all the ``BertFor*`` heads included) is patched as by :func:`patch_hf`.

Nothing here imports transformers until one of these functions is called.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import torch
from torch import nn

from fastbert import modeling, ops
from fastbert.ops.attention import varlen_preferred

ATTENTION_NAME = "fastbert"

# Keyword arguments of transformers' attention modules that change what attention computes. The fused
# modules compute plain bidirectional self-attention, so any of these being set is an error, not ignored.
_UNSUPPORTED_CALL_ARGUMENTS = ("head_mask", "encoder_hidden_states", "encoder_attention_mask", "past_key_value",
                               "past_key_values", "cache", "cu_seq_lens_q", "cu_seq_lens_k")


def _modeling_bert():
    try:
        from transformers.models.bert import modeling_bert
    except ImportError as err:
        raise ImportError("fastbert.hf needs transformers (pip install 'transformers>=4.40')") from err
    return modeling_bert


def _is_hf(module: nn.Module, cls: type) -> bool:
    """A transformers BERT module of this kind (its eager or sdpa variant), not a user subclass."""
    return isinstance(module, cls) and type(module).__module__ == cls.__module__


# ---------------------------------------------------------------------------------------------------
# The fused modules: fastbert's own modules, built around a transformers module's children
# ---------------------------------------------------------------------------------------------------
def _adopt_children(module: nn.Module, hf_module: nn.Module, names: tuple[str, ...]) -> None:
    """Make ``hf_module``'s children (and so its parameters, by name) ``module``'s own. No copies.
    The new module also takes over train/eval mode: a patched eval model must not start dropping out."""
    for name in names:
        setattr(module, name, getattr(hf_module, name))
    module.train(hf_module.training)


class FusedBertSelfAttention(modeling.BertSelfAttention):
    """fastbert's self-attention on a transformers ``BertSelfAttention``'s query/key/value/dropout.

    Takes transformers' call (``hidden_states, attention_mask, ...``) and returns ``(context, None)``
    as transformers' attention does. ``attention_mask`` is the :class:`EncoderLayout` that the patched
    encoder passes down (or None / a 2-D key-padding mask when a layer is called on its own).
    """

    def __init__(self, hf_module: nn.Module):
        nn.Module.__init__(self)  # not BertSelfAttention.__init__: that would allocate new parameters
        _adopt_children(self, hf_module, ("query", "key", "value", "dropout"))
        self.num_attention_heads = hf_module.num_attention_heads
        self.attention_head_size = hf_module.attention_head_size
        self.all_head_size = hf_module.all_head_size

    def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None, *args: Any,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
        # transformers 4.x passes (head_mask, encoder_hidden_states, encoder_attention_mask,
        # past_key_value, output_attentions) positionally; none may be set.
        if any(a is not None and a is not False for a in args) or kwargs.get("output_attentions"):
            raise ValueError("a layer patched by fastbert.patch_hf computes plain self-attention: head_mask, "
                             "cross-attention, a cache and output_attentions are not supported")
        for name in _UNSUPPORTED_CALL_ARGUMENTS:
            if kwargs.get(name) is not None:
                raise ValueError(f"a layer patched by fastbert.patch_hf does not support {name}")
        layout = _layout_from_mask(attention_mask)
        if layout.unpadded:
            # The patched encoder carries unpadded tokens as (1, total_tokens, hidden).
            context = super().forward(hidden_states[0], layout).unsqueeze(0)
        else:
            context = super().forward(hidden_states, layout)
        return context, None


class FusedBertSelfOutput(modeling.BertSelfOutput):
    """fastbert's ``LayerNorm(dropout(dense(x)) + residual)`` on a transformers BertSelfOutput's children."""

    def __init__(self, hf_module: nn.Module):
        nn.Module.__init__(self)
        _adopt_children(self, hf_module, ("dense", "LayerNorm", "dropout"))


class FusedBertOutput(modeling.BertOutput):
    """fastbert's ``LayerNorm(dropout(dense(x)) + residual)`` on a transformers BertOutput's children."""

    def __init__(self, hf_module: nn.Module):
        nn.Module.__init__(self)
        _adopt_children(self, hf_module, ("dense", "LayerNorm", "dropout"))


class FusedBertIntermediate(modeling.BertIntermediate):
    """fastbert's ``bias_gelu(x Wᵀ, b)`` on a transformers BertIntermediate's ``dense`` (exact-erf GELU only)."""

    def __init__(self, hf_module: nn.Module):
        nn.Module.__init__(self)
        _adopt_children(self, hf_module, ("dense",))
        self.hidden_act = "gelu"
        self.intermediate_act_fn = hf_module.intermediate_act_fn


# ---------------------------------------------------------------------------------------------------
# The padding mask: captured from BertModel's call, turned into a layout once per encoder call
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class EncoderLayout(modeling.AttentionInputs):
    """What the patched encoder hands each layer in place of transformers' 4-D mask: the key-padding
    mask (padded) or cu_seqlens (unpadded), plus what is needed to pad the encoder's output again."""

    indices: torch.Tensor | None = None
    batch: int = 0
    seqlen: int = 0


def _layout_from_mask(attention_mask: Any) -> modeling.AttentionInputs:
    if isinstance(attention_mask, modeling.AttentionInputs):
        return attention_mask
    if attention_mask is None:
        return modeling.AttentionInputs()
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        return modeling.AttentionInputs(key_padding_mask=attention_mask != 0)
    shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
    raise ValueError("a model patched by fastbert.patch_hf takes a 2-D (batch, seq_len) attention_mask "
                     f"(1 = real token, 0 = padding); its attention got {shape}")


class _MaskRelay:
    """Carries the 2-D mask from BertModel's call to its encoder's call (the one in between builds a
    4-D mask that the fused attention does not need). One forward at a time per model instance."""

    def __init__(self, unpad: bool | None, head_dim: int):
        self.unpad = unpad
        self.head_dim = head_dim
        self.pending: tuple[torch.Tensor | None, bool] | None = None


def _argument(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def _capture_mask(relay: _MaskRelay, bert: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of the patched BertModel: check the call, keep its 2-D attention_mask."""
    config = bert.config
    if kwargs.get("output_attentions", getattr(config, "output_attentions", False)):
        raise ValueError("output_attentions=True is not supported by a model patched by fastbert.patch_hf: the "
                         "fused attention never materialises the attention probabilities")
    if kwargs.get("head_mask") is not None:
        raise ValueError("head_mask is not supported by a model patched by fastbert.patch_hf")
    mask = _argument(args, kwargs, "attention_mask", 1)
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError("a model patched by fastbert.patch_hf takes a 2-D (batch, seq_len) attention_mask "
                         f"(1 = real token, 0 = padding), got {shape}")
    hidden_states_requested = bool(kwargs.get("output_hidden_states", getattr(config, "output_hidden_states", False)))
    relay.pending = (mask, hidden_states_requested)


def _clear_mask(relay: _MaskRelay, bert: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    relay.pending = None


def _enter_encoder(relay: _MaskRelay, encoder: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of the patched encoder: replace transformers' mask by an :class:`EncoderLayout`
    and, when a fused varlen kernel will run, drop the padding of the hidden states once."""
    args = list(args)
    hidden = args[0] if args else kwargs["hidden_states"]
    if relay.pending is not None:
        mask, hidden_states_requested = relay.pending
        relay.pending = None
    else:  # the encoder called on its own: its mask must already be the 2-D one
        mask, hidden_states_requested = _argument(tuple(args), kwargs, "attention_mask", 1), False
        mask = _layout_from_mask(mask).key_padding_mask
    if mask is not None:
        mask = (mask != 0).to(hidden.device)
        if mask.shape != hidden.shape[:2]:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but the batch is {tuple(hidden.shape[:2])}")
    unpad = relay.unpad if relay.unpad is not None else varlen_preferred(hidden, relay.head_dim)
    # Per-layer hidden states are returned padded, so a run that reports them stays padded throughout.
    if mask is not None and unpad and not hidden_states_requested:
        batch, seqlen = mask.shape
        tokens, indices, cu_seqlens, max_seqlen = ops.unpad_input(hidden, mask)
        layout = EncoderLayout(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, indices=indices, batch=batch,
                               seqlen=seqlen)
        hidden = tokens.unsqueeze(0)
    else:
        layout = EncoderLayout(key_padding_mask=mask)
    if args:
        args[0] = hidden
    else:
        kwargs["hidden_states"] = hidden
    if len(args) > 1:
        args[1] = layout
    else:
        kwargs["attention_mask"] = layout
    return tuple(args), kwargs


def _leave_encoder(encoder: nn.Module, args: tuple, kwargs: dict, output: Any):
    """Forward hook of the patched encoder: pad an unpadded last hidden state back to (batch, seq, hidden)."""
    layout = _argument(args, kwargs, "attention_mask", 1)
    if not (isinstance(layout, EncoderLayout) and layout.unpadded):
        return None
    padded = ops.pad_input(output[0][0], layout.indices, layout.batch, layout.seqlen)
    if isinstance(output, tuple):
        return (padded, *output[1:])
    output.last_hidden_state = padded
    return output


# ---------------------------------------------------------------------------------------------------
# patch_hf
# ---------------------------------------------------------------------------------------------------
def _find_bert(model: nn.Module, mb) -> nn.Module:
    if _is_hf(model, mb.BertModel):
        return model
    bert = getattr(model, "bert", None)
    if isinstance(bert, nn.Module) and _is_hf(bert, mb.BertModel):
        return bert
    raise TypeError(
        "fastbert.patch_hf takes a transformers BERT (BertModel, BertForPreTraining, BertForMaskedLM, "
        f"BertForSequenceClassification or another Bert* head), got {type(model).__name__}"
    )


def _attention_blockers(bert: nn.Module, mb) -> list[str]:
    """Why the fused attention cannot replace this model's attention (empty: it can)."""
    config = bert.config
    reasons = []
    if getattr(config, "is_decoder", False):
        reasons.append("the model is a decoder (causal self-attention)")
    if getattr(config, "add_cross_attention", False):
        reasons.append("the model has cross-attention layers")
    position_type = getattr(config, "position_embedding_type", "absolute")
    if position_type != "absolute":
        reasons.append(f"position_embedding_type={position_type!r} (relative positions inside attention)")
    if getattr(config, "output_attentions", False):
        reasons.append("config.output_attentions=True (the fused attention returns no attention probabilities)")
    for i, layer in enumerate(bert.encoder.layer):
        module = layer.attention.self
        if isinstance(module, FusedBertSelfAttention):
            continue
        if not _is_hf(module, mb.BertSelfAttention):
            reasons.append(f"layer {i}'s attention is a {type(module).__name__}, not transformers' BertSelfAttention")
        elif getattr(module, "position_embedding_type", "absolute") != "absolute" or getattr(module, "is_decoder", False):
            reasons.append(f"layer {i}'s attention uses relative positions or is a decoder's")
    return reasons


def _layer_norm_ok(module: nn.Module, hidden: int) -> bool:
    norm = getattr(module, "LayerNorm", None)
    return (isinstance(norm, nn.LayerNorm) and norm.weight is not None and norm.bias is not None
            and tuple(norm.normalized_shape) == (hidden,) and isinstance(getattr(module, "dense", None), nn.Linear))


def _warn(what: str, reasons: list[str]) -> None:
    warnings.warn(f"fastbert.patch_hf: {what} left as transformers' own: " + "; ".join(dict.fromkeys(reasons)),
                  stacklevel=3)


def patch_hf(model: nn.Module, attention: bool = True, layer_norm: bool = True, gelu: bool = True, *,
             unpad: bool | None = None) -> nn.Module:
    """Swap fastbert's fused layers into a transformers BERT in place; returns ``model``.

    model: a transformers ``BertModel`` or a ``BertFor*`` head around one (``model.bert``).
    attention: each layer's ``attention.self`` becomes a :class:`FusedBertSelfAttention` (one q/k/v
    GEMM, :func:`fastbert.ops.attention` with a key-padding mask, or ``attention_varlen`` unpadded).
    layer_norm: ``attention.output`` and ``output`` compute ``dropout_add_layer_norm``.
    gelu: ``intermediate`` computes ``bias_gelu`` (only where ``hidden_act == "gelu"``, the exact erf form).
    unpad: as :attr:`fastbert.BertModel.unpad` — None runs the encoder unpadded exactly when a fused
    varlen kernel will take it; True/False force it.

    The fused modules keep the original ``nn.Linear``/``nn.LayerNorm``/``nn.Dropout`` children: same
    parameter names, same tensors (no copies), same state_dict, so optimizers, checkpoints and
    ``save_pretrained`` are unaffected. A part that cannot be fused exactly (decoder or cross-attention
    use, relative position embeddings, ``output_attentions``, another activation) is left in place with
    a warning. At call time the patched model needs a 2-D attention_mask (or none) and rejects
    ``output_attentions=True`` and ``head_mask``. Patching twice is harmless.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastbert.patch_hf takes a torch.nn.Module, got {type(model).__name__}")
    if unpad is not None and not isinstance(unpad, bool):
        raise TypeError(f"unpad must be None, True or False, got {unpad!r}")
    mb = _modeling_bert()
    register_attention()
    bert = _find_bert(model, mb)
    hidden = bert.config.hidden_size

    if attention:
        blockers = _attention_blockers(bert, mb)
        if blockers:
            _warn("attention", blockers)
        else:
            for layer in bert.encoder.layer:
                if not isinstance(layer.attention.self, FusedBertSelfAttention):
                    layer.attention.self = FusedBertSelfAttention(layer.attention.self)
            _install_mask_hooks(bert, unpad)

    if layer_norm:
        skipped = []
        for i, layer in enumerate(bert.encoder.layer):
            for owner, name, cls, fused in ((layer.attention, "output", mb.BertSelfOutput, FusedBertSelfOutput),
                                            (layer, "output", mb.BertOutput, FusedBertOutput)):
                module = getattr(owner, name)
                if isinstance(module, fused):
                    continue
                if _is_hf(module, cls) and _layer_norm_ok(module, hidden):
                    setattr(owner, name, fused(module))
                else:
                    skipped.append(f"layer {i} has a {type(module).__name__} where BERT's {cls.__name__} belongs")
        if skipped:
            _warn("some LayerNorms were", skipped)

    if gelu:
        act = bert.config.hidden_act
        if not (isinstance(act, str) and act == "gelu"):
            _warn("the intermediate activation",
                  [f"hidden_act={act!r} is not the exact erf GELU that fastbert.ops.bias_gelu computes"])
        else:
            skipped = []
            for i, layer in enumerate(bert.encoder.layer):
                module = layer.intermediate
                if isinstance(module, FusedBertIntermediate):
                    continue
                if _is_hf(module, mb.BertIntermediate) and getattr(module.dense, "bias", None) is not None:
                    layer.intermediate = FusedBertIntermediate(module)
                else:
                    skipped.append(f"layer {i} has a {type(module).__name__} where BERT's BertIntermediate belongs")
            if skipped:
                _warn("some GELUs were", skipped)
    return model


def _install_mask_hooks(bert: nn.Module, unpad: bool | None) -> None:
    relay = getattr(bert, "_fastbert_mask_relay", None)
    if relay is not None:  # already patched: only the unpad choice may change
        relay.unpad = unpad
        return
    relay = _MaskRelay(unpad, bert.config.hidden_size // bert.config.num_attention_heads)
    # Not a submodule or parameter: the state_dict and module tree stay exactly transformers'.
    object.__setattr__(bert, "_fastbert_mask_relay", relay)
    bert.register_forward_pre_hook(functools.partial(_capture_mask, relay), with_kwargs=True)
    bert.register_forward_hook(functools.partial(_clear_mask, relay), with_kwargs=True, always_call=True)
    bert.encoder.register_forward_pre_hook(functools.partial(_enter_encoder, relay), with_kwargs=True)
    bert.encoder.register_forward_hook(_leave_encoder, with_kwargs=True)


def is_patched(model: nn.Module) -> dict[str, bool]:
    """Which fused layers ``model`` (a transformers BERT) runs: ``{"attention", "layer_norm", "gelu"}`` → bool
    (True only when every layer has it)."""
    bert = _find_bert(model, _modeling_bert())
    layers = list(bert.encoder.layer)
    return {
        "attention": all(isinstance(l.attention.self, FusedBertSelfAttention) for l in layers),
        "layer_norm": all(isinstance(l.attention.output, FusedBertSelfOutput) and isinstance(l.output, FusedBertOutput)
                          for l in layers),
        "gelu": all(isinstance(l.intermediate, FusedBertIntermediate) for l in layers),
    }


# ---------------------------------------------------------------------------------------------------
# patch_hf_classes
# ---------------------------------------------------------------------------------------------------
def patch_hf_classes(attention: bool = True, layer_norm: bool = True, gelu: bool = True, *,
                     unpad: bool | None = None) -> None:
    """Patch every transformers ``BertModel`` constructed from now on, as :func:`patch_hf` does.

    Call it before ``from_pretrained`` (or before building a model); the heads (``BertFor*``) build their
    ``bert`` through ``BertModel`` and so are patched too. Calling it again replaces the options;
    :func:`unpatch_hf_classes` restores transformers' behaviour for models built afterwards.
    """
    mb = _modeling_bert()
    register_attention()
    original = getattr(mb.BertModel.__init__, "_fastbert_original", mb.BertModel.__init__)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        patch_hf(self, attention, layer_norm, gelu, unpad=unpad)

    __init__._fastbert_original = original
    mb.BertModel.__init__ = __init__


def unpatch_hf_classes() -> None:
    """Undo :func:`patch_hf_classes` (models already built stay patched)."""
    mb = _modeling_bert()
    original = getattr(mb.BertModel.__init__, "_fastbert_original", None)
    if original is not None:
        mb.BertModel.__init__ = original


# ---------------------------------------------------------------------------------------------------
# attn_implementation="fastbert"
# ---------------------------------------------------------------------------------------------------
def fastbert_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, scaling: float | None = None,
                               dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface on :func:`fastbert.ops.attention`.

    query, key, value: (batch, heads, seq, head_dim); attention_mask: the (batch, seq) bool key-padding
    mask made by :func:`fastbert_padding_mask`, or None. Returns ((batch, seq, heads, head_dim), None).
    """
    if getattr(module, "is_causal", False):
        raise ValueError('attn_implementation="fastbert" computes bidirectional (encoder) attention only; '
                         "this module is causal")
    if key.shape != query.shape or value.shape != query.shape:
        raise ValueError('attn_implementation="fastbert" supports self-attention without a cache only: '
                         f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError('attn_implementation="fastbert" takes a 2-D (batch, seq_len) attention_mask, got shape '
                         f"{tuple(attention_mask.shape)}")
    out = ops.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask,
                        dropout_p=dropout, softmax_scale=scaling)
    return out, None


def fastbert_padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                          mask_function=None, attention_mask: torch.Tensor | None = None,
                          **kwargs: Any) -> torch.Tensor | None:
    """transformers' mask-function interface for ``"fastbert"``: the 2-D padding mask as is (no 4-D mask)."""
    from transformers.masking_utils import bidirectional_mask_function

    if mask_function is not bidirectional_mask_function:
        raise ValueError('attn_implementation="fastbert" supports plain bidirectional (encoder) attention only, '
                         "not causal, sliding-window or custom masks")
    if attention_mask is None:
        return None
    if q_offset or kv_offset or attention_mask.shape != (batch_size, kv_length) or q_length != kv_length:
        raise ValueError('attn_implementation="fastbert" supports self-attention over the whole input only; got a '
                         f"mask of shape {tuple(attention_mask.shape)} for {q_length} queries and {kv_length} keys")
    return attention_mask


def register_attention() -> bool:
    """Register ``"fastbert"`` with transformers so that ``attn_implementation="fastbert"`` works.

    Returns False (and registers nothing) on a transformers without the attention-mask registry (< 5),
    where only :func:`patch_hf` is available.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(ATTENTION_NAME, fastbert_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, fastbert_padding_mask)
    return True
