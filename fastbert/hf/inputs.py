"""What the patched modules take from transformers' calls: its masks, turned back into the (batch, seq)
key-padding mask the fused ops use, and the call arguments they refuse rather than ignore."""
from __future__ import annotations

from typing import Any

import torch

# Keyword arguments of transformers' attention modules that change what attention computes. The fused
# modules compute plain bidirectional self-attention, so any of these being set is an error, not ignored.
UNSUPPORTED_CALL_ARGUMENTS = ("head_mask", "encoder_hidden_states", "encoder_attention_mask", "past_key_value",
                              "past_key_values", "cache", "cu_seq_lens_q", "cu_seq_lens_k")


def requested(kwargs: dict, config: Any, name: str) -> bool:
    """Whether a call asks for an optional output (``output_attentions``, ...): its argument, else the config's."""
    value = kwargs.get(name)
    if value is None:
        value = getattr(config, name, False)
    return value is not None and value is not False and value != []


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
