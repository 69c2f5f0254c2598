"""Read and write Hugging Face BERT checkpoints (safetensors or pytorch_model.bin, sharded or not).

Key handling on load: old TF-port names ``LayerNorm.gamma/beta`` → ``weight/bias``; the
``position_ids``/``token_type_ids`` buffers are ignored; ``bert.``-prefixed and unprefixed keys are both
accepted (a BertModel checkpoint loads into BertForPreTraining and the other way round).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastbert._atomic import atomic_write
from fastbert.config import BertConfig

logger = logging.getLogger("fastbert")

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"
PYTORCH_INDEX_NAME = "pytorch_model.bin.index.json"
_BUFFER_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")


@dataclass
class LoadingInfo:
    """What a load did not match: parameters left at their initial values, and checkpoint keys not used."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = []
        if self.missing_keys:
            parts.append(f"missing from the checkpoint (left at their initial values): {', '.join(self.missing_keys)}")
        if self.unexpected_keys:
            parts.append(f"in the checkpoint but not in the model (ignored): {', '.join(self.unexpected_keys)}")
        return "; ".join(parts)


def find_weights_file(directory: str | os.PathLike) -> Path:
    """The checkpoint file in ``directory``: safetensors preferred, then pytorch_model.bin (or an index)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    for name in (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, PYTORCH_NAME, PYTORCH_INDEX_NAME):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"no weights in {directory}: expected {SAFETENSORS_NAME}, {PYTORCH_NAME} or a sharded index"
    )


def _read_one(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # corrupt or truncated file: name it instead of a deep library trace
        raise ValueError(f"cannot read checkpoint file {path}: {type(err).__name__}: {err}") from err


def read_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint in ``directory``, on the CPU, keys as stored."""
    path = find_weights_file(directory)
    if not path.name.endswith(".index.json"):
        return _read_one(path)
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a valid sharded-checkpoint index: {err}") from None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(_read_one(path.parent / shard))
    return state


def normalize_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``.gamma``/``.beta`` to ``.weight``/``.bias`` and drop non-parameter buffers."""
    out = {}
    for key, tensor in state.items():
        if key.endswith(_BUFFER_SUFFIXES):
            continue
        if key.endswith(".gamma"):
            key = key[: -len("gamma")] + "weight"
        elif key.endswith(".beta"):
            key = key[: -len("beta")] + "bias"
        out[key] = tensor
    return out


def align_prefix(state: dict[str, torch.Tensor], model_keys: set[str], prefix: str = "bert.") -> dict[str, torch.Tensor]:
    """Add or strip ``prefix`` per key so that checkpoint keys meet the model's where they can."""
    out = {}
    for key, tensor in state.items():
        if key not in model_keys:
            if prefix + key in model_keys:
                key = prefix + key
            elif key.startswith(prefix) and key[len(prefix):] in model_keys:
                key = key[len(prefix):]
        out[key] = tensor
    return out


def load_state_dict_into(model: nn.Module, state: dict[str, torch.Tensor], *, tied_keys: tuple[str, ...] = (),
                         prefix: str = "bert.") -> LoadingInfo:
    """Copy ``state`` into ``model`` after normalising keys; shape mismatches raise ValueError.

    ``tied_keys`` are parameters shared with another one (the MLM decoder): not reported missing.
    """
    model_state = model.state_dict()
    state = align_prefix(normalize_keys(state), set(model_state), prefix)
    mismatched = [
        f"{key}: checkpoint {tuple(t.shape)} vs model {tuple(model_state[key].shape)}"
        for key, t in state.items()
        if key in model_state and t.shape != model_state[key].shape
    ]
    if mismatched:
        raise ValueError("checkpoint shapes do not match the model's config: " + "; ".join(mismatched))
    usable = {k: v for k, v in state.items() if k in model_state}
    result = model.load_state_dict(usable, strict=False)
    return LoadingInfo(
        missing_keys=sorted(k for k in result.missing_keys if k not in tied_keys),
        unexpected_keys=sorted(k for k in state if k not in model_state),
    )


def save_state_dict(model: nn.Module, directory: str | os.PathLike, *, tied_keys: tuple[str, ...] = ()) -> Path:
    """Write ``model.safetensors`` (atomically). Tied duplicates are left out, as transformers does."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in tied_keys}
    path = Path(directory) / SAFETENSORS_NAME
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


def load_pretrained(cls: type, directory: str | os.PathLike, *, config: BertConfig | None = None,
                    strict: bool = False, dtype: torch.dtype | None = None) -> tuple[nn.Module, LoadingInfo]:
    """A fastbert model class (``BertPreTrainedModel``'s protocol: ``base_model_prefix``, ``tie_weights``,
    ``_tied_keys_now``) built from a checkpoint directory, in eval mode, and what the load did not match.
    See ``BertPreTrainedModel.from_pretrained``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(
            f"{str(directory)!r} is not a checkpoint directory. For a freshly initialised model of a preset "
            f"size use {cls.__name__}(fastbert.BertConfig.from_pretrained(name))"
        )
    if config is None:
        config = BertConfig.from_pretrained(directory)
    model = cls(config)
    info = load_state_dict_into(model, read_state_dict(directory), tied_keys=model._tied_keys_now(),
                                prefix=cls.base_model_prefix + ".")
    model.tie_weights()
    if strict and (info.missing_keys or info.unexpected_keys):
        raise ValueError(f"strict load of {directory} failed: {info.describe()}")
    if info.missing_keys:
        logger.warning("%s.from_pretrained(%s): %s", cls.__name__, directory, info.describe())
    elif info.unexpected_keys:
        logger.info("%s.from_pretrained(%s): %s", cls.__name__, directory, info.describe())
    if dtype is not None:
        model = model.to(dtype)
    model.eval()  # as transformers: a loaded model starts in eval mode
    return model, info


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> Path:
    """``config.json`` + ``model.safetensors`` of a fastbert model, which transformers loads with no
    missing keys; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.replace(architectures=[type(model).__name__])
    save_state_dict(model, directory, tied_keys=model._tied_keys_now())
    config.save_pretrained(directory)
    return directory
