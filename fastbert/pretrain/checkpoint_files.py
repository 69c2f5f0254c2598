"""The files of one training checkpoint, and how one is checked before use (the policy around them,
which checkpoint to use and when to save, is :class:`fastbert.pretrain.checkpoint.Checkpointer`'s).

``OUT/checkpoints/step_N/`` = an HF-loadable model (config.json + model.safetensors) + the trainer
state (optimizer, scheduler, scaler, data position) + each rank's RNG states + ``manifest.json`` (size
and SHA-256 of every other file, written last). A checkpoint is staged in a hidden folder and renamed
into place once complete. Reading runs no code: the trainer state and RNG files hold only tensors,
numbers, strings, lists and dicts and are read with ``torch.load(weights_only=True)``. A checkpoint
verifies when every file matches the manifest and every field resuming reads is what this run would
have written (:mod:`~fastbert.pretrain.checkpoint_contents`).
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
from fastbert._validation import is_int
from fastbert.pretrain.checkpoint_contents import (CheckpointError, ExpectedContents, check_model_tensors,
                                                   check_trainer_state)
from fastbert.pretrain.rng import load_rng_state

TRAINER_STATE = "trainer_state.pt"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
_REQUIRED = ("config.json", "model.safetensors", TRAINER_STATE)


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
@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    trainer_state: dict[str, Any]


def _check_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
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
        if not isinstance(entry, dict) or not is_int(entry.get("bytes")) or not isinstance(entry.get("sha256"), str):
            raise CheckpointError(f"checkpoint {path} is corrupt: its manifest entry for {name} is {entry!r}, "
                                  "not {bytes, sha256}")
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if file.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} has {file.stat().st_size} bytes, "
                                  f"{entry['bytes']} were written")
        if file_sha256(file) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its checksum")
    return manifest


def load_trainer_state(path: Path, expected: ExpectedContents | None = None) -> dict[str, Any]:
    """Verify one checkpoint folder (its files against the manifest, then their contents against this
    run: :mod:`~fastbert.pretrain.checkpoint_contents`) and read its trainer state; CheckpointError says
    what is wrong. ``expected=None`` checks the files and the fields' types only."""
    manifest = _check_manifest(path)
    files = manifest["files"]
    try:
        state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler refuses anything but plain data, with its own error types
        raise CheckpointError(f"checkpoint {path} is corrupt or unsafe: cannot read {TRAINER_STATE} "
                              f"({type(err).__name__})") from None
    check_trainer_state(path, state, manifest.get("step"), expected)
    for rank in range(state["world_size"]):
        if rng_file(rank) not in files:
            raise CheckpointError(f"checkpoint {path} is incomplete: {rng_file(rank)} is missing")
        try:
            load_rng_state(path / rng_file(rank))
        except Exception as err:  # refused by the safe unpickler, or not the layout save_rng_state writes
            detail = str(err) if isinstance(err, ValueError) else type(err).__name__
            raise CheckpointError(f"checkpoint {path} is corrupt or unsafe: cannot read {rng_file(rank)} "
                                  f"({detail})") from None
    if expected is not None:
        check_model_tensors(path, expected.model)
    return state


def latest_valid(checkpoint_root: Path, warn: Callable[[str], None], expected: ExpectedContents | None = None,
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
