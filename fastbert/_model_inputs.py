"""The models' input checks: token ids and masks against the config, labels, masked positions.

Each raises a ValueError/TypeError naming the argument, before anything would give wrong numbers or a
deep trace. Checks that read values run where that is free (CPU tensors) or asked for
(``FASTBERT_DEBUG=1``): on CUDA they sync the device.
"""
from __future__ import annotations

import torch

from fastbert._validation import DtypeError, check_tensor, value_checks_cheap
from fastbert.config import BertConfig
from fastbert.masking import IGNORE_INDEX


def check_model_inputs(config: BertConfig, input_ids, attention_mask=None, token_type_ids=None,
                       position_ids=None) -> None:
    """``input_ids`` (batch, seq_len) and the optional tensors of the same shape, against ``config``."""
    check_tensor("input_ids", input_ids)
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise DtypeError(f"input_ids must be int64 (or int32) token ids, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D (batch, seq_len), got shape {tuple(input_ids.shape)}")
    batch, seqlen = input_ids.shape
    if seqlen == 0 or batch == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)})")
    limit = config.max_position_embeddings
    if position_ids is None and seqlen > limit:
        raise ValueError(f"sequence length {seqlen} is longer than max_position_embeddings ({limit})")
    for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                    ("position_ids", position_ids)):
        if t is None:
            continue
        check_tensor(name, t)
        if t.shape != input_ids.shape and not (name == "position_ids" and t.shape == (1, seqlen)):
            raise ValueError(f"{name} has shape {tuple(t.shape)} but input_ids has {tuple(input_ids.shape)}")
        if t.device != input_ids.device:
            raise ValueError(f"{name} is on {t.device} but input_ids is on {input_ids.device}")
    for name, t in (("token_type_ids", token_type_ids), ("position_ids", position_ids)):
        if t is not None and (t.dtype.is_floating_point or t.dtype == torch.bool):
            raise DtypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if not value_checks_cheap(input_ids):
        return
    ranges = (("input_ids", input_ids, config.vocab_size, "vocab_size"),
              ("token_type_ids", token_type_ids, config.type_vocab_size, "type_vocab_size"),
              ("position_ids", position_ids, limit, "max_position_embeddings"))
    for name, t, high, field_name in ranges:
        if t is not None and (int(t.min()) < 0 or int(t.max()) >= high):
            raise ValueError(f"{name} must be in [0, {field_name}={high}); got values in "
                             f"[{int(t.min())}, {int(t.max())}]")
    if attention_mask is not None and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask values must be 0 or 1 (1 = real token, 0 = padding)")


def check_labels(name: str, labels: torch.Tensor, shape: tuple[int, ...], num_classes: int,
                 allow_ignore: bool) -> None:
    """Integer class labels of ``shape`` in [0, num_classes) (or -100 where ``allow_ignore``)."""
    check_tensor(name, labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise DtypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(labels.shape)}")
    if value_checks_cheap(labels) and labels.numel():
        valid = (labels >= 0) & (labels < num_classes)
        if allow_ignore:
            valid |= labels == IGNORE_INDEX
        if not bool(valid.all()):
            bad = labels[~valid][0].item()
            allowed = f"[0, {num_classes})" + (f" or {IGNORE_INDEX}" if allow_ignore else "")
            raise ValueError(f"{name} must be in {allowed}; found {bad}")


def check_masked_positions(positions: torch.Tensor, flat_labels: torch.Tensor) -> None:
    """``masked_positions`` must be the row-major flat indices of ``labels != -100``."""
    check_tensor("masked_positions", positions)
    if positions.dtype != torch.int64 or positions.dim() != 1:
        raise ValueError(f"masked_positions must be 1-D int64, got {positions.dtype} of shape {tuple(positions.shape)}")
    if positions.device != flat_labels.device:
        raise ValueError(f"masked_positions is on {positions.device} but labels are on {flat_labels.device}")
    if value_checks_cheap(positions):
        expected = torch.nonzero(flat_labels != IGNORE_INDEX).flatten()
        if not torch.equal(positions, expected):
            raise ValueError("masked_positions must be the row-major flat indices of labels != -100")
