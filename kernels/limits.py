"""What the kernels take, in one triton-free module: ``fastbert.ops`` (which must not import triton),
the launchers and the tests all read these values from here.

Importing this module imports torch only.
"""
from __future__ import annotations

import os

import torch

# Storage dtypes every kernel takes (each computes in fp32 whatever it loads).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Kernel seeds are Python ints in [0, 2**31): Triton types such an argument as int32 whatever its value
# (an int64 only from 2**31 on), so every seed compiles the same kernel variant, and Philox takes its key
# as 32-bit words anyway.
SEED_LIMIT = 2**31

# LayerNorm keeps a whole row in registers.
MAX_HIDDEN = 16384

# Attention head dims: multiples of 8 (so every row offset is a multiple of 8 elements, 16-byte vector
# loads) up to 128, each padded inside the kernel to the power-of-two block :func:`padded_block` gives.
ATTENTION_HEAD_DIM_MULTIPLE = 8
ATTENTION_MAX_HEAD_DIM = 128


def attention_head_dims() -> range:
    """Every head dim the attention kernels take."""
    return range(ATTENTION_HEAD_DIM_MULTIPLE, ATTENTION_MAX_HEAD_DIM + 1, ATTENTION_HEAD_DIM_MULTIPLE)


def padded_block(n: int, minimum: int = 16) -> int:
    """The power of two a row of ``n`` elements (a head dim, a hidden size) is padded to inside a kernel
    (loads are masked beyond ``n``); ``triton.next_power_of_2`` without importing triton."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


# The MLM loss's chunk of logits lives in a buffer whose rows are padded to a multiple of 16 elements:
# rows start aligned for cuBLAS, and the cross-entropy kernel's tiles load as 16-byte vectors whatever
# the vocabulary (BERT's 30522 is not even a multiple of 8).
MLM_ROW_ALIGN = 16


def mlm_logits_width(vocab: int) -> int:
    """The row stride of the MLM loss's logits buffer for a vocabulary of ``vocab``."""
    return -(-vocab // MLM_ROW_ALIGN) * MLM_ROW_ALIGN


def dtype_unsupported(tensors: dict[str, torch.Tensor | None]) -> str:
    """Why the kernels cannot take these tensors' dtypes ('' when they can); ``None`` entries are absent."""
    for name, t in tensors.items():
        if t is not None and t.dtype not in KERNEL_DTYPES:
            return f"{name} is {t.dtype}; the kernels take float16, bfloat16 and float32"
    return ""


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` (set before triton is imported): the kernels then run on CPU
    tensors, and every launcher takes its small interpreter configuration."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
