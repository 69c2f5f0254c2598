"""Learning-rate schedules: linear warmup, then linear or polynomial decay to zero (BERT's recipe)."""
from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "poly")


def warmup_steps(warmup: float, max_steps: int) -> int:
    """``warmup`` < 1 is a fraction of max_steps; >= 1 a number of steps."""
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not math.isfinite(warmup) or warmup < 0:
        raise ValueError(f"--warmup must be a finite number >= 0 (a fraction of the steps below 1, else a number "
                         f"of steps), got {warmup!r}")
    steps = int(round(warmup * max_steps)) if warmup < 1 else int(warmup)
    if steps > max_steps:
        raise ValueError(f"warmup ({steps} steps) is longer than the run ({max_steps} steps)")
    return steps


def lr_factor(step: int, *, warmup: int, max_steps: int, schedule: str, power: float = 0.5) -> float:
    """The multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    remaining = max(0.0, (max_steps - step) / max(1, max_steps - warmup))
    if schedule == "linear":
        return remaining
    if schedule == "poly":
        return remaining**power
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup: int, max_steps: int, schedule: str,
                    power: float = 0.5) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(0, warmup=warmup, max_steps=max_steps, schedule=schedule, power=power)  # validates the name
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup=warmup, max_steps=max_steps, schedule=schedule, power=power))
