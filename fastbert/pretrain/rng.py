"""A process's random-number state: captured, written with plain tensors and numbers only (so reading it
runs no code: ``torch.load(weights_only=True)``), read back and restored; and the run's seeding.

Exact resume needs every generator a step draws from: Python's and NumPy's (data helpers) and torch's
CPU and CUDA generators (dropout, masking done on the device).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastbert._atomic import write_errors_as_os_errors


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as Python/NumPy/torch return them."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), **torch_rng_state()}


def torch_rng_state() -> dict[str, Any]:
    """Only torch's CPU and CUDA generators (what dropout draws from): a few microseconds, no device sync."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _plain_rng(state: dict[str, Any]) -> dict[str, Any]:
    """The same states as plain tensors and numbers only (loadable with weights_only=True)."""
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    plain = {"python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                        "gauss": gauss},
             "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": state["torch"]}
    if "cuda" in state:
        plain["cuda"] = list(state["cuda"])
    return plain


def save_rng_state(state: dict[str, Any], path: Path) -> None:
    with write_errors_as_os_errors(path):
        torch.save(_plain_rng(state), path)


def load_rng_state(path: Path) -> dict[str, Any]:
    """Read a file written by :func:`save_rng_state` back into the form :func:`set_rng_state` takes."""
    plain = torch.load(path, map_location="cpu", weights_only=True)
    py, npy = plain["python"], plain["numpy"]
    state = {"python": (py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss"]),
             "numpy": (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                       npy["cached_gaussian"]),
             "torch": plain["torch"]}
    if "cuda" in plain:
        state["cuda"] = plain["cuda"]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
