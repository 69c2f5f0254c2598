"""The fused encoder: transformers' layer stack between one unpad and one pad.

It runs unpadded (varlen attention) only when that changes nothing a caller reads; see :mod:`fastbert.hf`
for the rules. The per-call part of them that only the head knows (question answering, labels at padding
positions) arrives as the ``fastbert_keep_padding`` keyword argument, set by :mod:`fastbert.hf.heads`.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import threading
import warnings
from typing import Any

import torch
from torch import nn

from fastbert import modeling, ops
from fastbert.hf.inputs import UNSUPPORTED_CALL_ARGUMENTS, key_padding_mask, requested
from fastbert.ops.flash_attention import varlen_preferred

# The keyword argument by which a head wrapper tells the fused encoder to keep the padding for one call.
KEEP_PADDING = "fastbert_keep_padding"


@dataclasses.dataclass
class EncoderLayout(modeling.AttentionInputs):
    """What the fused encoder hands each layer in place of transformers' 4-D mask: the key-padding mask
    (padded) or cu_seqlens (unpadded), plus what is needed to pad the encoder's output again."""

    indices: torch.Tensor | None = None
    batch: int = 0
    seqlen: int = 0


class FusedBertEncoder(nn.Module):
    """A transformers ``*Encoder`` on its own ``layer`` list: turns the mask it gets into an
    :class:`EncoderLayout`, and drops the padding once before the first layer and restores it once after
    the last when that is exact (see :mod:`fastbert.hf`). Takes and returns what transformers'
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
        keep_padding = kwargs.pop(KEEP_PADDING, None)
        if encoder_hidden_states is not None or encoder_attention_mask is not None or cache is not None or use_cache:
            raise ValueError("a model patched by fastbert.patch_hf is an encoder: cross-attention and caches "
                             "are not supported")
        for name in UNSUPPORTED_CALL_ARGUMENTS:
            if kwargs.get(name) is not None:
                raise ValueError(f"a model patched by fastbert.patch_hf does not support {name}")
        batch, seqlen = hidden_states.shape[:2]
        mask = key_padding_mask(attention_mask, batch, seqlen)
        if mask is not None:
            mask = mask.to(hidden_states.device)
        if requested(kwargs, self.config, "output_attentions"):
            return self._run_as_transformers(hidden_states, attention_mask, kwargs)
        if keep_padding is None:
            keep_padding = self.keeps_padding
        unpad = self.unpad if self.unpad is not None else varlen_preferred(hidden_states, self.head_dim, mask)
        # Per-layer hidden states are recorded padded (transformers hooks the layers' outputs). Under
        # torch.compile the batch stays padded: unpadding needs the lengths on the host (a graph break).
        if (mask is not None and unpad and not keep_padding and not torch.compiler.is_compiling()
                and not requested(kwargs, self.config, "output_hidden_states")):
            first_real, all_real = torch.stack((mask[:, 0].all(), mask.all())).tolist()
            # Position 0 is read by the pooler and the first-token classifiers: padding there must hold
            # transformers' values. Without padding there is nothing to drop.
            if first_real and not all_real:
                return self._run_unpadded(hidden_states, mask, kwargs)
        layout = EncoderLayout(key_padding_mask=mask)
        return self._output_class(last_hidden_state=self._run_layers(hidden_states, layout, kwargs))

    def _run_as_transformers(self, hidden_states: torch.Tensor, attention_mask: Any, kwargs: dict):
        """A call that asks for attention maps: padded, every layer's attention transformers' own on
        transformers' mask (:meth:`FusedBertSelfAttention.attend_as_transformers`), its weights recorded
        by transformers' output recorder."""
        warnings.warn("output_attentions=True: this call's attention runs transformers' own attention (not fastbert's "
                      "fused kernel) so that it can return the attention weights; the other fused layers still run",
                      UserWarning, stacklevel=_callers_stacklevel())
        _record_attention_weights(self.layer)
        kwargs["output_attentions"] = True  # also when only the config asks: the layers' attention reads it
        return self._output_class(last_hidden_state=self._run_layers(hidden_states, attention_mask, kwargs))

    def _run_unpadded(self, hidden_states: torch.Tensor, mask: torch.Tensor, kwargs: dict):
        batch, seqlen = mask.shape
        tokens, indices, cu_seqlens, max_seqlen = ops.unpad_input(hidden_states, mask)
        layout = EncoderLayout(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, indices=indices, batch=batch,
                               seqlen=seqlen)
        # Layers carry the unpadded tokens as (1, total_tokens, hidden); position_ids are already used.
        kwargs.pop("position_ids", None)
        tokens = self._run_layers(tokens.unsqueeze(0), layout, kwargs)
        return self._output_class(last_hidden_state=ops.pad_input(tokens[0], indices, batch, seqlen))

    def _run_layers(self, hidden_states: torch.Tensor, layout: Any, kwargs: dict) -> torch.Tensor:
        for layer in self.layer:
            # positional as transformers passes them, so gradient checkpointing sees the same call
            hidden_states = layer(hidden_states, layout, None, **kwargs)
        return hidden_states


def _callers_stacklevel() -> int:
    """warnings' stacklevel of the first frame outside fastbert, torch and transformers (the call in the
    user's code: its depth depends on the head and transformers' wrappers), so the warning names that
    line and Python's default filter shows it once per line."""
    import transformers

    libraries = tuple(os.path.dirname(m.__file__) + os.sep for m in (sys.modules["fastbert"], torch, transformers))
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(libraries):
        frame, level = frame.f_back, level + 1
    return level


_recorder_lock = threading.Lock()
_RECORDED = "_fastbert_records_attention_weights"


def _record_attention_weights(layers: nn.ModuleList) -> None:
    """Give each fused self-attention transformers' own output recorder for "attentions" (index 1 of the
    module's output), as transformers gives its attention classes, which the fused module is not an
    instance of. Installed by the first call that asks for attention maps; the others run hook-free."""
    from transformers.utils import output_capturing

    install = getattr(output_capturing, "install_output_capuring_hook", None) or getattr(
        output_capturing, "install_output_capturing_hook", None)
    if install is None:
        raise ValueError("output_attentions=True: this transformers has no output recorder that fastbert knows; "
                         "call the unpatched model for attention maps")
    from fastbert.hf.fused import FusedBertSelfAttention

    with _recorder_lock:
        for module in layers.modules():
            if isinstance(module, FusedBertSelfAttention) and not getattr(module, _RECORDED, False):
                install(module, "attentions", 1)
                setattr(module, _RECORDED, True)
