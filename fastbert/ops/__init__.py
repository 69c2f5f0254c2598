"""fastbert's public functional ops. Each runs a Triton kernel or a torch implementation (see
:mod:`fastbert.backend`), by the rules of :mod:`fastbert.ops._dispatch`; the references live beside the
ops as ``*_reference``. A Triton-backed op's file has the name of its kernels' file in
:mod:`fastbert.kernels`."""
from fastbert.ops.flash_attention import attention, attention_reference, attention_varlen, attention_varlen_reference
from fastbert.ops.gelu import bias_gelu, bias_gelu_reference, dense_gelu
from fastbert.ops.layer_norm import dropout_add_layer_norm, dropout_add_layer_norm_reference
from fastbert.ops.mlm_head import mlm_loss, mlm_loss_reference
from fastbert.ops.padding import gather_tokens, pad_input, unpad_input, unpad_metadata, unpad_metadata_reference

__all__ = [
    "attention",
    "attention_reference",
    "attention_varlen",
    "attention_varlen_reference",
    "bias_gelu",
    "bias_gelu_reference",
    "dense_gelu",
    "dropout_add_layer_norm",
    "dropout_add_layer_norm_reference",
    "gather_tokens",
    "mlm_loss",
    "mlm_loss_reference",
    "pad_input",
    "unpad_input",
    "unpad_metadata",
    "unpad_metadata_reference",
]
