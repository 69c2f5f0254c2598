"""The fused modules: fastbert's layers, built around a transformers module's own children.

Each takes over the transformers module's children under the family's names (no copies: the same
parameters, the same state_dict keys) and reads them back by role through its family's child names
(:mod:`fastbert.hf.families`), so one class serves every family whatever it calls q/k/v or its LayerNorm.
They subclass fastbert's own modules (``fastbert.modeling.BertSelfAttention``, ...), whose computation
they repeat on those children, and take transformers' call.
"""
from __future__ import annotations

from typing import Any

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
    """

    def __init__(self, hf_module: nn.Module, children: AttentionChildren | None = None):
        nn.Module.__init__(self)  # not BertSelfAttention.__init__: that would allocate new parameters
        self.child_names = children = children or AttentionChildren()  # None: BERT's names
        _adopt_children(self, hf_module, children.modules())
        self.num_attention_heads = getattr(hf_module, children.num_heads)
        self.all_head_size = getattr(self, children.query).out_features
        self.attention_head_size = self.all_head_size // self.num_attention_heads

    def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None, *args: Any,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
        # transformers 4.x passes (head_mask, encoder_hidden_states, encoder_attention_mask,
        # past_key_value, output_attentions) positionally; none may be set.
        if any(a is not None and a is not False for a in args) or kwargs.get("output_attentions"):
            raise ValueError("a layer patched by fastbert.patch_hf computes plain self-attention: head_mask, "
                             "cross-attention, a cache and output_attentions are not supported")
        for name in UNSUPPORTED_CALL_ARGUMENTS:
            if kwargs.get(name) is not None:
                raise ValueError(f"a layer patched by fastbert.patch_hf does not support {name}")
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
        return context.reshape(*lead, self.all_head_size)


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
