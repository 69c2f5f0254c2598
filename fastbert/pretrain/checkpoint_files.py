"""The files of one training checkpoint, and how one is checked before use (the policy around them,
which checkpoint to use and when to save, is :class:`fastbert.pretrain.checkpoint.Checkpointer`'s).

``OUT/checkpoints/step_N/`` = an HF-loadable model (config.json + model.safetensors) + the trainer
state (optimizer, scheduler, scaler, data position) + each rank's RNG states + ``manifest.json`` (size
and SHA-256 of every other file, written last). A checkpoint is staged in a hidden folder and renamed
into place once complete. Reading runs no code: the trainer state and RNG files hold only tensors,
numbers, strings, lists and dicts and are read with ``torch.load(weights_only=True)``. A checkpoint
verifies when every file matches the manifest and every tensor has the shape the model implies.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from fastbert._hashing import file_sha256
from fastbert.pretrain.rng import load_rng_state

TRAINER_STATE = "trainer_state.pt"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
_REQUIRED = ("config.json", "model.safetensors", TRAINER_STATE)


class CheckpointError(ValueError):
    """No usable checkpoint: the message names what is wrong."""


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


# --- the folder layout -----------------------------------------------------------------------------
def step_dirs(checkpoint_root: Path) -> list[tuple[int, Path]]:
    """Completed checkpoints (renamed into place), newest first. ``step_N.corrupt`` is not one."""
    if not checkpoint_root.is_dir():
        return []
    found = []
    for p in checkpoint_root.iterdir():
        match = _STEP_DIR.match(p.name)
        if match and p.is_dir():
            found.append((int(match.group(1)), p))
    return sorted(found, reverse=True)


def staging_dir(checkpoint_root: Path, step: int) -> Path:
    """A fresh hidden folder beside the checkpoints; every rank writes its RNG file into it."""
    checkpoint_root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-step_{step}-", dir=checkpoint_root))


def remove_stale_staging(checkpoint_root: Path, keep: Path | None = None) -> None:
    """Drop the leftovers of saves killed midway (they only take disk space)."""
    if checkpoint_root.is_dir():
        for stale in checkpoint_root.glob(".tmp-step_*"):
            if stale != keep:
                shutil.rmtree(stale, ignore_errors=True)


def write_manifest(staging: Path, step: int) -> None:
    """Size and SHA-256 of every file in the folder; written last, so its presence means 'complete'."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(staging.iterdir()) if p.is_file() and p.name != MANIFEST}
    text = json.dumps({"format": MANIFEST_FORMAT, "step": step, "files": files}, indent=1)
    with open(staging / MANIFEST, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def publish(staging: Path, checkpoint_root: Path, step: int, keep: int) -> Path:
    """Rename a complete staging folder to ``step_N`` and drop all but the newest ``keep``."""
    final = checkpoint_root / f"step_{step}"
    if final.exists():  # a re-run of the same step (e.g. after an interrupt): replace it whole
        shutil.rmtree(final)
    os.replace(staging, final)
    for _, old in step_dirs(checkpoint_root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    remove_stale_staging(checkpoint_root)
    return final


def move_aside(path: Path) -> Path:
    """Rename a corrupt ``step_N`` to ``step_N.corrupt`` (kept for inspection, out of the --keep count)."""
    target = path.with_name(f"{path.name}.corrupt")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt{n}")
    os.replace(path, target)
    return target


# --- verification ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpectedShapes:
    """What a checkpoint of this run must hold: the saved tensors' shapes by name, and the optimizer's
    per-parameter state shapes by the optimizer's parameter index."""

    model: dict[str, tuple[int, ...]]
    optimizer: dict[int, tuple[int, ...]]

    @classmethod
    def of(cls, model, optimizer: torch.optim.Optimizer) -> ExpectedShapes:
        """The shapes a checkpoint of ``model`` (tied parameters are saved once) and ``optimizer`` holds."""
        tied = set(model._tied_keys_now())
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
        indices = [i for group in optimizer.state_dict()["param_groups"] for i in group["params"]]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return cls(model=shapes, optimizer={i: tuple(p.shape) for i, p in zip(indices, params)})


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    trainer_state: dict[str, Any]


def _check_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError("unknown format")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: {MANIFEST} is missing "
                              "(an interrupted copy, or a checkpoint from an older fastbert)") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt: {MANIFEST} unreadable ({err})") from None
    for name in _REQUIRED:
        if name not in files:
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is not in its manifest")
    for name, entry in files.items():
        file = path / name
        if Path(name).name != name:
            raise CheckpointError(f"checkpoint {path} is corrupt: its manifest names {name!r}")
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if file.stat().st_size != entry.get("bytes"):
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} has {file.stat().st_size} bytes, "
                                  f"{entry.get('bytes')} were written")
        if file_sha256(file) != entry.get("sha256"):
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its checksum")
    return files


def _check_model_shapes(path: Path, expected: dict[str, tuple[int, ...]]) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
            saved = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for a malformed header
        raise CheckpointError(f"checkpoint {path} is corrupt: model.safetensors unreadable "
                              f"({type(err).__name__})") from None
    missing = sorted(set(expected) - set(saved))
    if missing:
        raise CheckpointError(f"checkpoint {path} does not fit the model: model.safetensors lacks {missing[0]}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    for name, shape in saved.items():
        if name not in expected:
            raise CheckpointError(f"checkpoint {path} does not fit the model: unexpected tensor {name}")
        if shape != expected[name]:
            raise CheckpointError(f"checkpoint {path} does not fit the model: {name} has shape {list(shape)}, "
                                  f"the config gives {list(expected[name])}")


def _check_optimizer_shapes(path: Path, optimizer_state: Any, expected: dict[int, tuple[int, ...]]) -> None:
    try:
        indices = [i for group in optimizer_state["param_groups"] for i in group["params"]]
        per_param = optimizer_state["state"]
    except (KeyError, TypeError):
        raise CheckpointError(f"checkpoint {path} is corrupt: {TRAINER_STATE} holds no optimizer state") from None
    if sorted(indices) != sorted(expected):
        raise CheckpointError(f"checkpoint {path} does not fit the model: its optimizer has {len(indices)} "
                              f"parameters, the model {len(expected)}")
    for index, entries in per_param.items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != expected.get(index):
                raise CheckpointError(f"checkpoint {path} does not fit the model: optimizer state {key} of "
                                      f"parameter {index} has shape {list(value.shape)}, the parameter "
                                      f"{list(expected.get(index, ()))}")


def load_trainer_state(path: Path, expected: ExpectedShapes | None = None) -> dict[str, Any]:
    """Verify one checkpoint folder and read its trainer state; CheckpointError says what is wrong."""
    files = _check_manifest(path)
    try:
        state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler refuses anything but plain data, with its own error types
        raise CheckpointError(f"checkpoint {path} is corrupt or unsafe: cannot read {TRAINER_STATE} "
                              f"({type(err).__name__})") from None
    if not isinstance(state, dict) or not {"step", "optimizer", "world_size"} <= set(state):
        raise CheckpointError(f"checkpoint {path} is corrupt: {TRAINER_STATE} lacks step/optimizer/world_size")
    world_size = state["world_size"]
    for rank in range(world_size if isinstance(world_size, int) else 0):
        if rng_file(rank) not in files:
            raise CheckpointError(f"checkpoint {path} is incomplete: {rng_file(rank)} is missing")
        try:
            load_rng_state(path / rng_file(rank))
        except Exception as err:  # refused by the safe unpickler, or not the layout save_rng_state writes
            raise CheckpointError(f"checkpoint {path} is corrupt or unsafe: cannot read {rng_file(rank)} "
                                  f"({type(err).__name__})") from None
    if expected is not None:
        _check_model_shapes(path, expected.model)
        _check_optimizer_shapes(path, state["optimizer"], expected.optimizer)
    return state


def latest_valid(checkpoint_root: Path, warn: Callable[[str], None], expected: ExpectedShapes | None = None,
                 corrupt: list[Path] | None = None) -> LoadedCheckpoint | None:
    """The newest checkpoint that verifies; each bad newer one is reported through ``warn`` by name (and
    appended to ``corrupt``, for the caller to move aside)."""
    for step, path in step_dirs(checkpoint_root):
        try:
            return LoadedCheckpoint(path, step, load_trainer_state(path, expected))
        except CheckpointError as err:
            warn(f"{err}; trying an older checkpoint")
            if corrupt is not None:
                corrupt.append(path)
    return None
