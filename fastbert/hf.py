"""Put fastbert's fused layers into a transformers BERT-family model, in place, without touching its weights.

Supported: BERT, RoBERTa, XLM-RoBERTa, CamemBERT and ELECTRA (their encoders share BERT's layer structure in
transformers), each as the bare ``*Model`` or a ``*For*`` head around one. Three ways, each changing more:

* ``attn_implementation="fastbert"`` — after :func:`register_attention` (transformers >= 5, which has
  attention and mask registries), ``from_pretrained(path, attn_implementation="fastbert")`` runs only the
  attention core, softmax(q kᵀ) v, through :func:`fastbert.ops.attention`, fed a (batch, seq) key-padding
  mask. Everything else stays transformers' and the batch stays padded.
* :func:`patch_hf` — swaps the encoder and, in every layer, the self-attention, self-output, intermediate
  and output modules for fastbert's (one fused q/k/v GEMM + fused attention, dropout+residual+LayerNorm,
  bias+GELU). The new modules hold the very same ``nn.Linear``/``nn.LayerNorm`` children, so parameter
  names, tensors and the state_dict do not change.
* :func:`patch_hf_classes` — every supported model built afterwards is patched as by :func:`patch_hf`.

Why modules and not hooks or instance-bound ``forward`` functions: whatever reaches the fused encoder
arrives as an argument of its ``forward`` — transformers' own mask (2-D, the 4-D additive float mask of
eager, the 4-D bool mask of sdpa, or None), turned back into a key-padding mask there. Module hooks do not
run for ``model.forward(...)`` (sentence-transformers calls it) and per-model state carried between hooks
races between threads and ``nn.DataParallel`` replicas; a ``forward`` bound on an instance is bypassed by
``type(model).forward(model, ...)`` and still points at the original after DataParallel replicates the
module. Replaced submodules and a class-level head wrapper hold no per-call state and are reached however
the model is called (``torch.compile``, DDP, DataParallel, threads, gradient checkpointing included).

Numbers: the encoder drops the padding (runs unpadded, varlen attention) only when that changes nothing
a caller reads — padding positions of ``last_hidden_state`` then hold zeros, while transformers computes
values there that no real token depends on. It runs padded, with transformers' numbers at every position,
when position 0 is padding (the pooler and the first-token classifiers read it), when hidden states are
requested, for question answering (its softmax spans the padding), and when per-token labels at padding
positions are not -100. The head wrappers installed on the head classes tell the encoder the last two.

Nothing here imports transformers until one of these functions is called.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import warnings
from typing import Any

import torch
from torch import nn

from fastbert import modeling, ops
from fastbert.masking import IGNORE_INDEX
from fastbert.ops.flash_attention import varlen_preferred

ATTENTION_NAME = "fastbert"

# Keyword arguments of transformers' attention modules that change what attention computes. The fused
# modules compute plain bidirectional self-attention, so any of these being set is an error, not ignored.
_UNSUPPORTED_CALL_ARGUMENTS = ("head_mask", "encoder_hidden_states", "encoder_attention_mask", "past_key_value",
                               "past_key_values", "cache", "cu_seq_lens_q", "cu_seq_lens_k")

# The keyword argument by which a head wrapper tells the fused encoder to keep the padding for one call.
_KEEP_PADDING = "fastbert_keep_padding"


@dataclasses.dataclass(frozen=True)
class _Family:
    """One transformers model family with BERT's encoder: where its classes live and what they are called."""

    name: str
    module: str     # transformers' modeling module
    prefix: str     # class-name prefix: <prefix>Model, <prefix>SelfAttention, ...
    base_attr: str  # the attribute by which the heads hold the bare model

    def modeling_module(self):
        if self.module not in sys.modules:
            try:
                __import__(self.module)
            except ImportError as err:
                raise ImportError("fastbert.hf needs transformers (pip install 'transformers>=5')") from err
        return sys.modules[self.module]

    def cls(self, suffix: str) -> type:
        return getattr(self.modeling_module(), self.prefix + suffix)


FAMILIES = (
    _Family("BERT", "transformers.models.bert.modeling_bert", "Bert", "bert"),
    _Family("RoBERTa", "transformers.models.roberta.modeling_roberta", "Roberta", "roberta"),
    _Family("XLM-RoBERTa", "transformers.models.xlm_roberta.modeling_xlm_roberta", "XLMRoberta", "roberta"),
    _Family("CamemBERT", "transformers.models.camembert.modeling_camembert", "Camembert", "roberta"),
    _Family("ELECTRA", "transformers.models.electra.modeling_electra", "Electra", "electra"),
)
_SUPPORTED = "BERT, RoBERTa, XLM-RoBERTa, CamemBERT and ELECTRA"

# Heads whose outputs or losses read every position (question answering) or per-token labels, so that a
# call with unknown labels must keep the padding. Sequence-level heads read only position 0.
_PER_TOKEN_HEADS = ("ForMaskedLM", "ForTokenClassification", "ForPreTraining", "ForQuestionAnswering",
                    "ForCausalLM", "LMHeadModel")


def _is_hf(module: nn.Module, cls: type) -> bool:
    """A transformers module of this kind, not a user subclass."""
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
    """fastbert's self-attention on a transformers ``*SelfAttention``'s query/key/value/dropout.

    Takes transformers' call (``hidden_states, attention_mask, ...``) and returns ``(context, None)``
    as transformers' attention does. ``attention_mask`` is the :class:`EncoderLayout` that the fused
    encoder passes down, or — a layer called on its own — any mask transformers builds (see
    :func:`key_padding_mask`).
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
        if isinstance(attention_mask, modeling.AttentionInputs):
            layout = attention_mask
        else:
            layout = modeling.AttentionInputs(key_padding_mask=key_padding_mask(attention_mask, *hidden_states.shape[:2]))
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
# Masks: whatever transformers built, back to a (batch, seq) key-padding mask
# ---------------------------------------------------------------------------------------------------
def _shape_of(mask: Any) -> Any:
    return tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__


def key_padding_mask(attention_mask: Any, batch: int, seqlen: int) -> torch.Tensor | None:
    """The (batch, seqlen) bool key-padding mask (True = real token) behind any mask transformers builds
    for bidirectional self-attention: None, a 2-D (batch, seq) 1/0 or bool mask, the 4-D additive float
    mask of eager attention (0 = attend, very negative = masked) or the 4-D bool mask of sdpa, each
    (batch or 1, 1, seq or 1, seq). A 4-D mask whose query rows differ (causal, sliding-window or custom
    masks) is not a padding mask and is refused."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() not in (2, 4):
        raise ValueError("a model patched by fastbert.patch_hf takes a 2-D (batch, seq_len) attention_mask (1 = real "
                         "token, 0 = padding) or the 4-D mask transformers builds from one; its attention got "
                         f"{_shape_of(attention_mask)}")
    if attention_mask.dim() == 2:
        if tuple(attention_mask.shape) != (batch, seqlen):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but the batch is {(batch, seqlen)}")
        return attention_mask != 0
    b, h, q, k = attention_mask.shape
    if b not in (1, batch) or h != 1 or q not in (1, seqlen) or k != seqlen:
        raise ValueError(f"a 4-D attention_mask must be (batch or 1, 1, seq_len or 1, seq_len) = ({batch}, 1, {seqlen}, "
                         f"{seqlen}) for this batch, got {tuple(attention_mask.shape)}")
    # The value checks need the mask's contents on the host: a graph break under torch.compile, where the
    # mask is transformers' own (create_bidirectional_mask) and is trusted instead.
    checking = not torch.compiler.is_compiling()
    if attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:
        allowed = attention_mask == 0
        # an additive mask that is not 0 / "minus infinity" biases attention rather than masking it
        if checking and not bool((allowed | (attention_mask <= -1e4)).all()):
            raise ValueError("a 4-D float attention_mask must be additive padding (0 = attend, <= -1e4 = masked); "
                             "other attention biases are not supported by a model patched by fastbert.patch_hf")
    if checking and q > 1 and not bool((allowed == allowed[:, :, :1]).all()):
        raise ValueError("this 4-D attention_mask differs between query positions (a causal or custom mask); a model "
                         "patched by fastbert.patch_hf computes bidirectional attention over a padding mask only")
    return allowed[:, 0, 0].expand(batch, seqlen)


# ---------------------------------------------------------------------------------------------------
# The fused encoder: the layer stack between one unpad and one pad
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class EncoderLayout(modeling.AttentionInputs):
    """What the fused encoder hands each layer in place of transformers' 4-D mask: the key-padding mask
    (padded) or cu_seqlens (unpadded), plus what is needed to pad the encoder's output again."""

    indices: torch.Tensor | None = None
    batch: int = 0
    seqlen: int = 0


def _requested(kwargs: dict, config: Any, name: str) -> bool:
    value = kwargs.get(name)
    if value is None:
        value = getattr(config, name, False)
    return value is not None and value is not False and value != []


class FusedBertEncoder(nn.Module):
    """A transformers ``*Encoder`` on its own ``layer`` list: turns the mask it gets into an
    :class:`EncoderLayout`, and drops the padding once before the first layer and restores it once after
    the last when that is exact (see the module docstring). Takes and returns what transformers'
    encoder does.

    unpad: None runs unpadded exactly when a fused varlen kernel will take it; True/False force it.
    keeps_padding: the default for calls that do not say (``fastbert_keep_padding``): True under a head
    that reads padding positions (question answering, per-token labels) but whose ``forward`` could not
    be wrapped to say so per call.
    """

    def __init__(self, hf_encoder: nn.Module, unpad: bool | None, head_dim: int, keeps_padding: bool):
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        nn.Module.__init__(self)
        self.layer = hf_encoder.layer
        self.config = hf_encoder.config
        self.gradient_checkpointing = getattr(hf_encoder, "gradient_checkpointing", False)
        self.unpad = unpad
        self.head_dim = head_dim
        self.keeps_padding = keeps_padding
        self._output_class = BaseModelOutputWithPastAndCrossAttentions
        self.train(hf_encoder.training)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None, encoder_hidden_states: Any = None,
                encoder_attention_mask: Any = None, cache: Any = None, use_cache: bool | None = None,
                **kwargs: Any):
        keep_padding = kwargs.pop(_KEEP_PADDING, None)
        if encoder_hidden_states is not None or encoder_attention_mask is not None or cache is not None or use_cache:
            raise ValueError("a model patched by fastbert.patch_hf is an encoder: cross-attention and caches "
                             "are not supported")
        if _requested(kwargs, self.config, "output_attentions"):
            raise ValueError("output_attentions=True is not supported by a model patched by fastbert.patch_hf: the "
                             "fused attention never materialises the attention probabilities")
        for name in _UNSUPPORTED_CALL_ARGUMENTS:
            if kwargs.get(name) is not None:
                raise ValueError(f"a model patched by fastbert.patch_hf does not support {name}")
        batch, seqlen = hidden_states.shape[:2]
        mask = key_padding_mask(attention_mask, batch, seqlen)
        if mask is not None:
            mask = mask.to(hidden_states.device)
        if keep_padding is None:
            keep_padding = self.keeps_padding
        unpad = self.unpad if self.unpad is not None else varlen_preferred(hidden_states, self.head_dim)
        # Per-layer hidden states are recorded padded (transformers hooks the layers' outputs). Under
        # torch.compile the batch stays padded: unpadding needs the lengths on the host (a graph break).
        if (mask is not None and unpad and not keep_padding and not torch.compiler.is_compiling()
                and not _requested(kwargs, self.config, "output_hidden_states")):
            first_real, all_real = torch.stack((mask[:, 0].all(), mask.all())).tolist()
            # Position 0 is read by the pooler and the first-token classifiers: padding there must hold
            # transformers' values. Without padding there is nothing to drop.
            if first_real and not all_real:
                return self._run_unpadded(hidden_states, mask, kwargs)
        layout = EncoderLayout(key_padding_mask=mask)
        return self._output_class(last_hidden_state=self._run_layers(hidden_states, layout, kwargs))

    def _run_unpadded(self, hidden_states: torch.Tensor, mask: torch.Tensor, kwargs: dict):
        batch, seqlen = mask.shape
        tokens, indices, cu_seqlens, max_seqlen = ops.unpad_input(hidden_states, mask)
        layout = EncoderLayout(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, indices=indices, batch=batch,
                               seqlen=seqlen)
        # Layers carry the unpadded tokens as (1, total_tokens, hidden); position_ids are already used.
        kwargs.pop("position_ids", None)
        tokens = self._run_layers(tokens.unsqueeze(0), layout, kwargs)
        return self._output_class(last_hidden_state=ops.pad_input(tokens[0], indices, batch, seqlen))

    def _run_layers(self, hidden_states: torch.Tensor, layout: EncoderLayout, kwargs: dict) -> torch.Tensor:
        for layer in self.layer:
            # positional as transformers passes them, so gradient checkpointing sees the same call
            hidden_states = layer(hidden_states, layout, None, **kwargs)
        return hidden_states


# ---------------------------------------------------------------------------------------------------
# Head wrappers: tell the encoder, per call, whether the head reads padding positions
# ---------------------------------------------------------------------------------------------------
def _labels_at_padding(labels: Any, mask: Any) -> bool:
    """Per-token labels (same shape as the mask) that a loss reads at padding positions."""
    if not (isinstance(labels, torch.Tensor) and isinstance(mask, torch.Tensor)) or labels.shape != mask.shape:
        return False
    return bool(((labels != IGNORE_INDEX) & (mask.to(labels.device) == 0)).any())


def _wrap_head_forward(cls: type, family: _Family) -> bool:
    """Wrap a transformers head class's ``forward`` (once) so that, on a patched model, each call tells the
    fused encoder whether it must keep the padding. Unpatched models of the class run the original.
    False where that is impossible (a ``forward`` without ``**kwargs`` to pass the flag through)."""
    original = cls.forward
    if getattr(original, "_fastbert_original", None) is not None:
        return True
    params = inspect.signature(original).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return False
    names = list(params)[1:]  # without self
    reads_all = cls.__name__.endswith("ForQuestionAnswering")

    def argument(args: tuple, kwargs: dict, name: str) -> Any:
        if name in kwargs:
            return kwargs[name]
        index = names.index(name) if name in names else len(args)
        return args[index] if index < len(args) else None

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        base = getattr(self, family.base_attr, None)
        if not isinstance(getattr(base, "encoder", None), FusedBertEncoder) or _KEEP_PADDING in kwargs:
            return original(self, *args, **kwargs)
        keep = reads_all or _labels_at_padding(argument(args, kwargs, "labels"), argument(args, kwargs, "attention_mask"))
        return original(self, *args, **{_KEEP_PADDING: keep}, **kwargs)

    forward._fastbert_original = original
    cls.forward = forward
    return True


# ---------------------------------------------------------------------------------------------------
# patch_hf
# ---------------------------------------------------------------------------------------------------
def _family_of(model: nn.Module) -> _Family | None:
    module = type(model).__module__
    return next((f for f in FAMILIES if f.module == module), None)


def _require_transformers_5() -> None:
    """The fused encoder takes transformers 5's encoder call (masks built by masking_utils, ``**kwargs``
    passed down to the layers); transformers 4's differs, so patching it is refused up front."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        raise ImportError(f"fastbert.patch_hf needs transformers >= 5, found {transformers.__version__} "
                          "(pip install 'transformers>=5')")


def _find_base(model: nn.Module) -> tuple[_Family, nn.Module]:
    """(family, bare model) of a supported transformers model or head; TypeError naming what is supported."""
    family = _family_of(model)
    if family is not None:
        base_cls = family.cls("Model")
        if _is_hf(model, base_cls):
            return family, model
        base = getattr(model, family.base_attr, None)
        if isinstance(base, nn.Module) and _is_hf(base, base_cls):
            return family, base
    for family in FAMILIES:  # a user's head around a transformers bare model
        if family.module in sys.modules:
            base = getattr(model, family.base_attr, None)
            if isinstance(base, nn.Module) and _is_hf(base, family.cls("Model")):
                return family, base
    raise TypeError(
        f"fastbert.patch_hf supports transformers {_SUPPORTED} models: the bare model (BertModel, RobertaModel, "
        "XLMRobertaModel, CamembertModel, ElectraModel) or a head around one (BertForMaskedLM, "
        f"RobertaForSequenceClassification, ElectraForPreTraining, ...); got {type(model).__name__}"
    )


def _attention_blockers(base: nn.Module, family: _Family) -> list[str]:
    """Why the fused attention cannot replace this model's attention (empty: it can)."""
    config = base.config
    reasons = []
    if getattr(config, "is_decoder", False):
        reasons.append("the model is a decoder (causal self-attention)")
    if getattr(config, "add_cross_attention", False):
        reasons.append("the model has cross-attention layers")
    position_type = getattr(config, "position_embedding_type", "absolute")
    if position_type not in (None, "absolute"):
        reasons.append(f"position_embedding_type={position_type!r} (relative positions inside attention)")
    if getattr(config, "output_attentions", False):
        reasons.append("config.output_attentions=True (the fused attention returns no attention probabilities)")
    encoder = base.encoder
    if not isinstance(encoder, FusedBertEncoder) and not _is_hf(encoder, family.cls("Encoder")):
        reasons.append(f"the encoder is a {type(encoder).__name__}, not transformers' {family.prefix}Encoder")
    for i, layer in enumerate(encoder.layer):
        module = layer.attention.self
        if isinstance(module, FusedBertSelfAttention):
            continue
        if not _is_hf(module, family.cls("SelfAttention")):
            reasons.append(f"layer {i}'s attention is a {type(module).__name__}, not transformers' "
                           f"{family.prefix}SelfAttention")
        elif getattr(module, "position_embedding_type", "absolute") not in (None, "absolute") or getattr(
                module, "is_decoder", False):
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
    would change what transformers' heads read (see the module docstring).

    The fused modules keep the original ``nn.Linear``/``nn.LayerNorm``/``nn.Dropout`` children: same
    parameter names, same tensors (no copies), same state_dict, so optimizers, checkpoints and
    ``save_pretrained`` are unaffected. A transformers head class gets a class-level ``forward`` wrapper
    (unpatched models of that class run the original unchanged). A part that cannot be fused exactly
    (decoder or cross-attention use, relative position embeddings, ``output_attentions``, another
    activation) is left in place with a warning. At call time the patched model rejects
    ``output_attentions=True``, ``head_mask`` and 4-D masks that are not padding masks. Patching twice
    is harmless (the second call may change ``unpad``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastbert.patch_hf takes a torch.nn.Module, got {type(model).__name__}")
    if unpad is not None and not isinstance(unpad, bool):
        raise TypeError(f"unpad must be None, True or False, got {unpad!r}")
    _require_transformers_5()
    family, base = _find_base(model)
    register_attention()
    config = base.config
    hidden = config.hidden_size
    # A head whose calls cannot say whether they read padding keeps it, when it reads per-token positions.
    head = model if model is not base and _family_of(model) is family else None
    keeps_padding = (head is not None and type(head).__name__.endswith(_PER_TOKEN_HEADS)
                     and not (attention and _wrap_head_forward(type(head), family)))

    if attention:
        blockers = _attention_blockers(base, family)
        if blockers:
            _warn("attention", blockers)
        else:
            for layer in base.encoder.layer:
                if not isinstance(layer.attention.self, FusedBertSelfAttention):
                    layer.attention.self = FusedBertSelfAttention(layer.attention.self)
            if isinstance(base.encoder, FusedBertEncoder):
                base.encoder.unpad = unpad
                base.encoder.keeps_padding = keeps_padding
            else:
                base.encoder = FusedBertEncoder(base.encoder, unpad, hidden // config.num_attention_heads,
                                                keeps_padding)

    if layer_norm:
        skipped = []
        for i, layer in enumerate(base.encoder.layer):
            for owner, name, cls, fused in ((layer.attention, "output", family.cls("SelfOutput"), FusedBertSelfOutput),
                                            (layer, "output", family.cls("Output"), FusedBertOutput)):
                module = getattr(owner, name)
                if isinstance(module, fused):
                    continue
                if _is_hf(module, cls) and _layer_norm_ok(module, hidden):
                    setattr(owner, name, fused(module))
                else:
                    skipped.append(f"layer {i} has a {type(module).__name__} where {cls.__name__} belongs")
        if skipped:
            _warn("some LayerNorms were", skipped)

    if gelu:
        act = config.hidden_act
        if not (isinstance(act, str) and act == "gelu"):
            _warn("the intermediate activation",
                  [f"hidden_act={act!r} is not the exact erf GELU that fastbert.ops.bias_gelu computes"])
        else:
            skipped = []
            intermediate_cls = family.cls("Intermediate")
            for i, layer in enumerate(base.encoder.layer):
                module = layer.intermediate
                if isinstance(module, FusedBertIntermediate):
                    continue
                if _is_hf(module, intermediate_cls) and getattr(module.dense, "bias", None) is not None:
                    layer.intermediate = FusedBertIntermediate(module)
                else:
                    skipped.append(f"layer {i} has a {type(module).__name__} where {intermediate_cls.__name__} belongs")
            if skipped:
                _warn("some GELUs were", skipped)
    return model


def is_patched(model: nn.Module) -> dict[str, bool]:
    """Which fused layers ``model`` (a supported transformers model) runs: ``{"attention", "layer_norm", "gelu"}``
    → bool (True only when every layer has it)."""
    _, base = _find_base(model)
    layers = list(base.encoder.layer)
    return {
        "attention": isinstance(base.encoder, FusedBertEncoder)
        and all(isinstance(l.attention.self, FusedBertSelfAttention) for l in layers),
        "layer_norm": all(isinstance(l.attention.output, FusedBertSelfOutput) and isinstance(l.output, FusedBertOutput)
                          for l in layers),
        "gelu": all(isinstance(l.intermediate, FusedBertIntermediate) for l in layers),
    }


# ---------------------------------------------------------------------------------------------------
# patch_hf_classes
# ---------------------------------------------------------------------------------------------------
def _model_classes(family: _Family) -> list[type]:
    """The family's bare model and every head class transformers defines for it."""
    module = family.modeling_module()
    return [c for name, c in vars(module).items()
            if isinstance(c, type) and c.__module__ == module.__name__ and name.startswith(family.prefix)
            and issubclass(c, family.cls("PreTrainedModel")) and c is not family.cls("PreTrainedModel")]


def patch_hf_classes(attention: bool = True, layer_norm: bool = True, gelu: bool = True, *,
                     unpad: bool | None = None) -> None:
    """Patch every transformers BERT, RoBERTa, XLM-RoBERTa, CamemBERT and ELECTRA model (bare or head)
    constructed from now on, as :func:`patch_hf` does.

    Call it before ``from_pretrained`` (or before building a model). Calling it again replaces the options;
    :func:`unpatch_hf_classes` restores transformers' behaviour for models built afterwards.
    """
    register_attention()
    for family in FAMILIES:
        for cls in _model_classes(family):
            original = cls.__dict__["__init__"] if "__init__" in cls.__dict__ else None
            if original is None:
                continue
            original = getattr(original, "_fastbert_original", original)

            cls.__init__ = _patching_init(original, (attention, layer_norm, gelu), unpad)


def _patching_init(original, parts: tuple[bool, bool, bool], unpad: bool | None):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if type(self).__init__ is __init__:  # only the outermost constructor of the object patches it
            patch_hf(self, *parts, unpad=unpad)

    __init__._fastbert_original = original
    return __init__


def unpatch_hf_classes() -> None:
    """Undo :func:`patch_hf_classes` (models already built stay patched)."""
    for family in FAMILIES:
        if family.module not in sys.modules:
            continue
        for cls in _model_classes(family):
            original = getattr(cls.__dict__.get("__init__"), "_fastbert_original", None)
            if original is not None:
                cls.__init__ = original


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
