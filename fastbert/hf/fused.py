"""The fused modules: fastbert's layers, built around a transformers module's own children.

Each takes over the transformers module's children under the family's names (no copies: the same
parameters, the same state_dict keys) and reads them back by role through its family's child names
(:mod:`fastbert.hf.families`), so one class serves every family whatever it calls q/k/v or its LayerNorm.
They subclass fastbert's own modules (``fastbert.modeling.BertSelfAttention``, ...), whose computation
they repeat on those children, and take transformers' call.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import nn

from fastbert import modeling, ops
from fastbert.hf.families import AddNormChildren, AttentionChildren, IntermediateChildren
from fastbert.hf.inputs import UNSUPPORTED_CALL_ARGUMENTS, key_padding_mask


def _adopt_children(module: nn.Module, hf_module: nn.Module, names: tuple[str, ...]) -> None:
    """Make ``hf_module``'s children (and so its parameters, by name) ``module``'s own. No copies.
    The new module also takes over train/eval mode: a patched eval model must not start dropping out."""
    for name in names:
        setattr(module, name, getattr(hf_module, name))
    module.train(hf_module.training)


class FusedBertSelfAttention(modeling.BertSelfAttention):
    """fastbert's self-attention (one q/k/v GEMM, fused attention) on a transformers ``*SelfAttention``'s
    query/key/value/dropout (named as ``children`` says).

    Takes transformers' call (``hidden_states, attention_mask, ...``) and returns ``(context, None)``
    as transformers' attention does. ``attention_mask`` is the :class:`EncoderLayout` that the fused
    encoder passes down, or — a layer called on its own — any mask transformers builds (see
    :func:`key_padding_mask`).

    A call with ``output_attentions=True`` runs transformers' own attention function for the model's
    ``attn_implementation`` on transformers' mask instead (not fused) and returns its
    ``(context, weights)``: the attention maps a caller asked for, with transformers' numbers.
    """

    def __init__(self, hf_module: nn.Module, children: AttentionChildren | None = None):
        nn.Module.__init__(self)  # not BertSelfAttention.__init__: that would allocate new parameters
        self.child_names = children = children or AttentionChildren()  # None: BERT's names
        _adopt_children(self, hf_module, children.modules())
        self.num_attention_heads = getattr(hf_module, children.num_heads)
        self.all_head_size = getattr(self, children.query).out_features
        self.attention_head_size = self.all_head_size // self.num_attention_heads
        # What transformers' attention functions read from their module (the config for the model's
        # attn_implementation, which may change after patching; scaling; is_causal, which sdpa's
        # function takes as True when a module lacks it).
        self.config = getattr(hf_module, "config", None)
        self.scaling = self.attention_head_size ** -0.5
        self.is_causal = False
        self.eager_attention = _family_eager_attention(hf_module)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None, *args: Any,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
        # transformers 4.x passes (head_mask, encoder_hidden_states, encoder_attention_mask,
        # past_key_value, output_attentions) positionally; none may be set.
        if any(a is not None and a is not False for a in args):
            raise ValueError("a layer patched by fastbert.patch_hf computes plain self-attention: head_mask, "
                             "cross-attention and a cache are not supported")
        for name in UNSUPPORTED_CALL_ARGUMENTS:
            if kwargs.get(name) is not None:
                raise ValueError(f"a layer patched by fastbert.patch_hf does not support {name}")
        if kwargs.get("output_attentions"):
            return self.attend_as_transformers(hidden_states, attention_mask, **kwargs)
        if isinstance(attention_mask, modeling.AttentionInputs):
            layout = attention_mask
        else:
            layout = modeling.AttentionInputs(key_padding_mask=key_padding_mask(attention_mask, *hidden_states.shape[:2]))
        if layout.unpadded:
            # The patched encoder carries unpadded tokens as (1, total_tokens, hidden).
            return self.attend(hidden_states[0], layout).unsqueeze(0), None
        return self.attend(hidden_states, layout), None

    def attend(self, hidden_states: torch.Tensor, layout: modeling.AttentionInputs) -> torch.Tensor:
        """softmax(q kᵀ/√d) v over (..., hidden) tokens laid out as ``layout`` says; (..., all_head_size)."""
        names = self.child_names
        query, key, value = getattr(self, names.query), getattr(self, names.key), getattr(self, names.value)
        lead = hidden_states.shape[:-1]
        q, k, v = modeling.project_qkv(hidden_states, query, key, value, self.num_attention_heads,
                                       self.attention_head_size)
        dropout_p = getattr(self, names.dropout).p if self.training else 0.0
        if layout.unpadded:
            context = ops.attention_varlen(q, k, v, layout.cu_seqlens, layout.max_seqlen, dropout_p)
        else:
            context = ops.attention(q, k, v, layout.key_padding_mask, dropout_p)
            if layout.key_padding_mask is not None and self.attn_implementation == "eager":
                context = _uniform_where_keyless(context, v, layout.key_padding_mask)
        return context.reshape(*lead, self.all_head_size)

    @property
    def attn_implementation(self) -> str | None:
        return getattr(self.config, "_attn_implementation", None)

    def attend_as_transformers(self, hidden_states: torch.Tensor, attention_mask: Any,
                               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """transformers' own attention for this call: the ``attn_implementation``'s function (eager's is
        the family's ``eager_attention_forward``) on q/k/v laid out as transformers lays them out and on
        transformers' mask as built for that implementation. Returns (context, attention weights or None:
        sdpa returns none, as it does unpatched)."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if isinstance(attention_mask, modeling.AttentionInputs):
            raise ValueError("output_attentions=True needs transformers' attention mask, not fastbert's layout: call "
                             "the patched model (or its encoder) rather than a layer with a fastbert layout")
        if self.eager_attention is None:
            raise ValueError(f"output_attentions=True: transformers' {type(self).__name__} family has no "
                             "eager_attention_forward to compute the attention weights with")
        names = self.child_names
        lead = hidden_states.shape[:-1]
        q, k, v = (getattr(self, name)(hidden_states).view(*lead, -1, self.attention_head_size).transpose(1, 2)
                   for name in (names.query, names.key, names.value))
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.attn_implementation, self.eager_attention)
        context, weights = attention(self, q, k, v, attention_mask,
                                     dropout=getattr(self, names.dropout).p if self.training else 0.0,
                                     scaling=self.scaling, **kwargs)
        return context.reshape(*lead, -1).contiguous(), weights


def _family_eager_attention(hf_module: nn.Module) -> Callable | None:
    """The ``eager_attention_forward`` of the transformers module that defines ``hf_module``'s class (each
    family has its own copy), or None where there is none."""
    return getattr(sys.modules.get(type(hf_module).__module__), "eager_attention_forward", None)


def _uniform_where_keyless(context: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
    """Rows of the batch with no real key, as transformers' eager attention computes them: every score is
    then "minus infinity" (the mask's dtype minimum absorbs the score), so softmax is uniform over all
    positions and the output is the mean of v over the row. context, v: (batch, seq, heads, head_dim)."""
    keyless = ~key_padding_mask.any(dim=-1)
    return torch.where(keyless[:, None, None, None], v.mean(dim=1, keepdim=True).to(context.dtype), context)


class _FusedAddNorm(nn.Module):
    """``LayerNorm(dropout(dense(x)) + residual)`` as one :func:`fastbert.ops.dropout_add_layer_norm` after
    the GEMM, on a transformers module's dense/LayerNorm/dropout (named as ``children`` says)."""

    def __init__(self, hf_module: nn.Module, children: AddNormChildren | None = None):
        nn.Module.__init__(self)
        self.child_names = children = children or AddNormChildren()  # None: BERT's names
        _adopt_children(self, hf_module, children.modules())

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        names = self.child_names
        dense, norm = getattr(self, names.dense), getattr(self, names.layer_norm)
        dropout_p = getattr(self, names.dropout).p if self.training else 0.0
        return ops.dropout_add_layer_norm(dense(hidden_states), input_tensor, norm.weight, norm.bias, norm.eps,
                                          dropout_p)


class FusedBertSelfOutput(_FusedAddNorm, modeling.BertSelfOutput):
    """fastbert's ``LayerNorm(dropout(dense(x)) + residual)`` on a transformers ``*SelfOutput``'s children."""


class FusedBertOutput(_FusedAddNorm, modeling.BertOutput):
    """fastbert's ``LayerNorm(dropout(dense(x)) + residual)`` on a transformers ``*Output``'s children."""


class FusedBertIntermediate(modeling.BertIntermediate):
    """fastbert's ``dense_gelu(x, W, b)`` on a transformers ``*Intermediate``'s dense (exact-erf GELU only)."""

    def __init__(self, hf_module: nn.Module, children: IntermediateChildren | None = None):
        nn.Module.__init__(self)
        self.child_names = children = children or IntermediateChildren()  # None: BERT's names
        _adopt_children(self, hf_module, children.modules())
        self.hidden_act = "gelu"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dense = getattr(self, self.child_names.dense)
        return ops.dense_gelu(hidden_states, dense.weight, dense.bias)
