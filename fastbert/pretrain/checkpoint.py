"""Training checkpoints: ``OUT/checkpoints/step_N/`` = an HF-loadable model (config.json +
model.safetensors) + the trainer state (optimizer, scheduler, scaler, data position) + each rank's
RNG states.

A checkpoint is written into a hidden temporary folder and renamed into place once complete, so a
save killed midway leaves the previous checkpoints as they were. The last K are kept.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

TRAINER_STATE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """No usable checkpoint: the message names what is wrong."""


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def step_dirs(checkpoint_root: Path) -> list[tuple[int, Path]]:
    """Completed checkpoints (renamed into place), newest first."""
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


def publish(staging: Path, checkpoint_root: Path, step: int, keep: int) -> Path:
    """Rename a complete staging folder to ``step_N`` and drop all but the newest ``keep``."""
    final = checkpoint_root / f"step_{step}"
    if final.exists():  # a re-run of the same step (e.g. after an interrupt): replace it whole
        shutil.rmtree(final)
    os.replace(staging, final)
    for _, old in step_dirs(checkpoint_root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in checkpoint_root.glob(".tmp-step_*"):  # leftovers of saves killed midway
        if stale != staging:
            shutil.rmtree(stale, ignore_errors=True)
    return final


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    trainer_state: dict[str, Any]


def load_trainer_state(path: Path) -> dict[str, Any]:
    """Read and sanity-check one checkpoint folder; CheckpointError says what is wrong with it."""
    for name in ("config.json", "model.safetensors", TRAINER_STATE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    try:
        state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} is corrupt: cannot read {TRAINER_STATE} ({type(err).__name__})") from None
    if not isinstance(state, dict) or "step" not in state or "optimizer" not in state:
        raise CheckpointError(f"checkpoint {path} is corrupt: {TRAINER_STATE} lacks step/optimizer")
    try:
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
            handle.keys()
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} is corrupt: model.safetensors unreadable ({type(err).__name__})") from None
    return state


def latest_valid(checkpoint_root: Path, warn) -> LoadedCheckpoint | None:
    """The newest checkpoint that loads; each corrupt newer one is reported through ``warn`` by name."""
    for step, path in step_dirs(checkpoint_root):
        try:
            return LoadedCheckpoint(path, step, load_trainer_state(path))
        except CheckpointError as err:
            warn(f"{err}; trying an older checkpoint")
    return None
