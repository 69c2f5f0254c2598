"""The activations ``BertConfig.hidden_act`` may name (transformers' names), in one table: the config
validates against it and the model looks its functions up in it."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "gelu": F.gelu,  # exact erf form: the one fastbert.ops.bias_gelu fuses
    "relu": F.relu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}
