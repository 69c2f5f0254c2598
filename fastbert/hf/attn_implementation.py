"""``attn_implementation="fastbert"``: transformers' attention and mask registries (transformers >= 5)
pointed at :func:`fastbert.ops.attention`.

Only the attention core, softmax(q kᵀ) v, changes; every module stays transformers' own and the batch
stays padded, fed a (batch, seq) key-padding mask instead of a 4-D one. :func:`fastbert.patch_hf` goes
further (fused modules, unpadding).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastbert import ops

ATTENTION_NAME = "fastbert"


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
