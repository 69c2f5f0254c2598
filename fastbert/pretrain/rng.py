"""A process's random-number state: captured, written with plain tensors and numbers only (so reading it
runs no code: ``torch.load(weights_only=True)``), read back and restored; and the run's seeding.

Exact resume needs every generator a step draws from: Python's and NumPy's (data helpers) and torch's
CPU and CUDA generators (dropout, masking done on the device).
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastbert._atomic import write_errors_as_os_errors
from fastbert._validation import is_int


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


_MT_WORDS = 624  # the Mersenne Twister's state: 624 32-bit words and a position


def _words(value: Any, count: int, field: str) -> torch.Tensor:
    """``value`` is ``count`` integers in [0, 2³²) (a Mersenne Twister's words), else ValueError."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.int64 or tuple(value.shape) != (count,):
        raise ValueError(f"{field} is not {count} int64 words")
    if count and not bool(((value >= 0) & (value < 2**32)).all()):
        raise ValueError(f"{field} holds a value outside [0, 2**32)")
    return value


def _check_plain_rng(plain: Any) -> None:
    """The file holds what :func:`_plain_rng` writes, every field in range: a ValueError naming the field
    otherwise (set_state would raise IndexError or crash on a word count it does not expect)."""
    if not isinstance(plain, dict) or not {"python", "numpy", "torch"} <= set(plain):
        raise ValueError("it lacks the python/numpy/torch states")
    py, npy = plain["python"], plain["numpy"]
    if not isinstance(py, dict) or py.get("version") != 3 or not (py.get("gauss") is None or isinstance(py["gauss"], float)):
        raise ValueError("its python state is not version 3 with a float or None gauss")
    internal = _words(py.get("internal"), _MT_WORDS + 1, "its python state")
    if not 0 <= int(internal[-1]) <= _MT_WORDS:  # the position, stored as the last word
        raise ValueError(f"its python state's position {int(internal[-1])} is outside 0..{_MT_WORDS}")
    if not isinstance(npy, dict) or npy.get("name") != "MT19937":
        raise ValueError("its numpy state is not an MT19937 state")
    _words(npy.get("keys"), _MT_WORDS, "its numpy keys")
    cached = npy.get("cached_gaussian")
    if (not is_int(npy.get("pos")) or not 0 <= npy["pos"] <= _MT_WORDS or npy.get("has_gauss") not in (0, 1)
            or not isinstance(cached, float) or not math.isfinite(cached)):
        raise ValueError("its numpy position, has_gauss or cached_gaussian is out of range")
    fresh_bytes = torch.get_rng_state().numel()
    for field, states in (("torch", [plain["torch"]]), ("cuda", plain.get("cuda", []))):
        generator_states = isinstance(states, list) and all(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 for t in states)
        if not generator_states or (field == "torch" and states[0].numel() != fresh_bytes):
            raise ValueError(f"its {field} state is not a generator state (1-D uint8"
                             + (f", {fresh_bytes} bytes)" if field == "torch" else ")"))


def load_rng_state(path: Path) -> dict[str, Any]:
    """Read a file written by :func:`save_rng_state` back into the form :func:`set_rng_state` takes; a
    ValueError naming the field when it holds anything else."""
    plain = torch.load(path, map_location="cpu", weights_only=True)
    _check_plain_rng(plain)
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
