"""The update half of a training step, the same for every job: a (loss-scaled) backward, then unscale,
clip, optimizer step, scaler update and schedule step, and the divergence rule.

Nothing here waits on the device. Divergence is flagged on the device (the first step whose loss or
gradient norm is NaN/inf) and read only where the caller already syncs: on log steps, at an epoch's
end, before a save. Under fp16 the GradScaler skips the steps whose unscaled gradients overflow; those
are counted, not divergence, unless the scale collapses. Outside fp16 the scaler is disabled, so the
same calls run and scaling is a no-op.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from fastbert.device import Precision

MIN_LOSS_SCALE = 2.0**-16  # below this fp16 gradients underflow anyway: stop instead of training on nothing
FP16_INIT_SCALE = 2.0**16  # GradScaler's usual start; tests raise it to force overflow skips


class Updater:
    """Owns the optimizer, the schedule and the loss scaler of one run, and counts its steps.

    ``clip``: the global gradient-norm bound (0: no clipping). ``warmup_flag``: the job's warmup flag,
    named in the divergence advice."""

    def __init__(self, params: Iterable[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any,
                 precision: Precision, *, clip: float, warmup_flag: str = "--warmup"):
        self.params = [p for p in params if p.requires_grad]
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = precision.grad_scaler(init_scale=FP16_INIT_SCALE)
        self.max_norm = clip if clip > 0 else math.inf
        self.warmup_flag = warmup_flag
        self.step = 0  # optimizer steps taken (skipped fp16 steps included, as the schedule counts them)
        device = self.params[0].device
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad_step = torch.zeros((), dtype=torch.int64, device=device)  # 0: none yet

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def update(self, loss: torch.Tensor) -> torch.Tensor:
        """One optimizer step from the accumulated gradients; ``loss`` (detached) is the step's loss.
        Returns the gradient norm before clipping (a device tensor)."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        overflow = ~torch.isfinite(grad_norm)
        skipped = overflow & self.scaler.is_enabled()  # exactly the steps the scaler skipped
        self.skipped_steps += skipped
        bad = (~torch.isfinite(loss) | overflow) & ~skipped
        self.first_bad_step.masked_fill_(bad & (self.first_bad_step == 0), self.step)
        return grad_norm

    # --- reading the flags (each a device sync: log steps, epoch ends, saves) ---------------------------
    def loss_scale(self) -> float | None:
        """The fp16 loss scale; None when the scaler is disabled."""
        return self.scaler.get_scale() if self.scaler.is_enabled() else None

    def check_divergence(self, loss_scale: float | None = None) -> None:
        """FloatingPointError once a step's loss or gradient norm was NaN/inf (a step the scaler skipped
        is not one), or when ``loss_scale`` (just read by :meth:`loss_scale`) has collapsed."""
        bad = int(self.first_bad_step)
        if bad:
            raise FloatingPointError(
                f"training diverged: the loss or gradient norm is NaN or infinite from step {bad} on; nothing "
                f"after it is saved: lower --lr, raise {self.warmup_flag}, or check --weight-decay and the data")
        if loss_scale is not None and loss_scale < MIN_LOSS_SCALE:
            # Every step overflows: the run is diverging, and fp16 can no longer represent it.
            raise FloatingPointError(
                f"the fp16 loss scale fell to {loss_scale:.3g} at step {self.step} (gradients overflow on every "
                f"step): lower --lr, raise {self.warmup_flag}, or use --precision bf16")

    def check_saveable(self) -> None:
        """Before any save: no divergence, and every weight finite (NaN weights are never written)."""
        self.check_divergence()
        if not bool(torch.stack([p.detach().isfinite().all() for p in self.params]).all()):
            raise FloatingPointError(f"the weights hold NaN or inf after step {self.step}: not saved; lower --lr "
                                     f"or raise {self.warmup_flag}")

    # --- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                # None, not the disabled scaler's {}: what checkpoints have always held without loss scaling.
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "skipped_steps": int(self.skipped_steps)}

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        """Continue from a checkpoint taken after ``step`` steps (a scaler state is used only under fp16)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])  # a disabled scaler ignores it
        self.skipped_steps.fill_(state.get("skipped_steps", 0))
        self.step = step
