"""What a checkpoint must contain before a run resumes from it.

A manifest proves only that the files are the ones written; a file edited and re-hashed, or written
by another program, matches its manifest too. So every field that ``--resume`` reads is checked for
type, range and consistency with this run before anything is loaded:

- the step: the trainer state's, the folder's (``step_N``) and the manifest's are one number;
- the weights: every tensor of this model, with its shape and dtype, and finite;
- the optimizer: this optimizer's parameter groups and per-parameter state (its keys, shapes,
  dtypes, finite values, a step count no later than the checkpoint's);
- the schedule: LambdaLR's own fields, its ``last_epoch`` equal to the step;
- the fp16 loss scaler, the skip count, the world size, the data's vocabulary hash.

Each failure raises :class:`CheckpointError` naming the folder
and the field; the caller moves that checkpoint aside and tries an older one. The RNG files are
checked where they are read (:func:`fastbert.pretrain.rng.load_rng_state`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastbert._validation import is_finite_number, is_int
from fastbert.training.optim import state_keys

# safetensors' names for the dtypes a BERT state dict holds
_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
_SCALER_FIELDS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
MAX_WORLD_SIZE = 1 << 20


class CheckpointError(ValueError):
    """No usable checkpoint: the message names what is wrong."""


@dataclass(frozen=True)
class ExpectedContents:
    """What a checkpoint of this run holds, taken from the freshly built model, optimizer and schedule."""

    model: dict[str, tuple[tuple[int, ...], str]]        # saved tensor name → (shape, safetensors dtype)
    optimizer: dict[int, tuple[tuple[int, ...], torch.dtype]]  # parameter index → (shape, dtype)
    optimizer_groups: tuple[dict[str, Any], ...]         # each group's settings (without "params")
    optimizer_state_keys: tuple[str, ...] | None         # None: an optimizer this module does not know
    scheduler: dict[str, Any]                            # the schedule's state_dict before any step

    @classmethod
    def of(cls, model, optimizer: torch.optim.Optimizer, scheduler) -> ExpectedContents:
        tied = set(model._tied_keys_now())  # tied parameters are saved once
        tensors = {k: (tuple(v.shape), _SAFETENSORS_DTYPE.get(v.dtype, str(v.dtype)))
                   for k, v in model.state_dict().items() if k not in tied}
        saved_groups = optimizer.state_dict()["param_groups"]
        indices = [i for group in saved_groups for i in group["params"]]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return cls(model=tensors, optimizer={i: (tuple(p.shape), p.dtype) for i, p in zip(indices, params)},
                   optimizer_groups=tuple({k: v for k, v in g.items() if k != "params"} for g in saved_groups),
                   optimizer_state_keys=state_keys(optimizer), scheduler=scheduler.state_dict())


# --- the trainer state -----------------------------------------------------------------------------
def check_trainer_state(path: Path, state: Any, manifest_step: Any, expected: ExpectedContents | None) -> None:
    """Every field of ``trainer_state.pt`` that resuming reads; ``expected=None`` checks types only."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path} is corrupt: {what}")

    missing = [k for k in ("step", "optimizer", "scheduler", "world_size") if not isinstance(state, dict) or k not in state]
    if missing:
        raise bad(f"its trainer state lacks {', '.join(missing)}")
    step, folder_step = state["step"], int(path.name.removeprefix("step_"))
    if not is_int(step) or step != folder_step or manifest_step != folder_step:
        raise bad(f"its trainer state says step {step!r} and its manifest {manifest_step!r}, but the folder "
                  f"is {path.name}")
    if not is_int(state["world_size"]) or not 1 <= state["world_size"] <= MAX_WORLD_SIZE:
        raise bad(f"world_size {state['world_size']!r} is not a process count")
    skipped = state.get("skipped_steps", 0)
    if not is_int(skipped) or not 0 <= skipped <= step:
        raise bad(f"skipped_steps {skipped!r} is not a count between 0 and the step ({step})")
    data = state.get("data", {})
    if not isinstance(data, dict) or not isinstance(data.get("vocab_sha256", ""), str):
        raise bad("its data record is not a {dir, vocab_sha256} object")
    _check_scaler(state.get("scaler"), bad)
    _check_optimizer(path, state["optimizer"], step, expected, bad)
    _check_scheduler(state["scheduler"], step, expected, bad)


def _check_scaler(scaler: Any, bad) -> None:
    if scaler is None:
        return
    if not isinstance(scaler, dict) or not all(is_finite_number(scaler.get(k)) for k in _SCALER_FIELDS):
        raise bad(f"its loss-scaler state is not {{{', '.join(_SCALER_FIELDS)}}} with finite numbers")
    if not scaler["scale"] > 0 or not is_int(scaler["_growth_tracker"]) or scaler["_growth_tracker"] < 0:
        raise bad(f"its loss scale {scaler['scale']!r} is not positive or its growth tracker is not a count")


def _same_kind(fresh: Any, saved: Any) -> bool:
    """``saved`` could have been written by the code that made ``fresh``: same type, finite numbers,
    same lengths (a setting of a parameter group or a field of the schedule)."""
    if isinstance(fresh, bool) or fresh is None or isinstance(fresh, str):
        return type(saved) is type(fresh) or (fresh is None and isinstance(saved, bool))
    if isinstance(fresh, (int, float)):
        return is_finite_number(saved) and saved >= 0
    if isinstance(fresh, (list, tuple)):
        return isinstance(saved, (list, tuple)) and len(saved) == len(fresh) and all(map(_same_kind, fresh, saved))
    return type(saved) is type(fresh)


def _check_optimizer(path: Path, optimizer: Any, step: int, expected: ExpectedContents | None, bad) -> None:
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict) \
            or not isinstance(optimizer.get("param_groups"), list) \
            or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in optimizer["param_groups"]):
        raise bad("its optimizer state is not {state, param_groups}")
    groups, per_param = optimizer["param_groups"], optimizer["state"]
    if expected is None:
        return
    indices = [i for group in groups for i in group["params"]]
    if len(groups) != len(expected.optimizer_groups) or sorted(indices) != sorted(expected.optimizer):
        raise CheckpointError(f"checkpoint {path} does not fit the model: its optimizer has {len(indices)} parameters in "
                              f"{len(groups)} groups, this run's {len(expected.optimizer)} in "
                              f"{len(expected.optimizer_groups)}")
    for number, (group, fresh) in enumerate(zip(groups, expected.optimizer_groups)):
        settings = {k: v for k, v in group.items() if k != "params"}
        if set(settings) != set(fresh) or not all(_same_kind(fresh[k], settings[k]) for k in fresh):
            raise bad(f"optimizer group {number} has settings {sorted(settings)} unlike this optimizer's "
                      "(or a value that is not a finite number >= 0)")
    for index, entries in per_param.items():
        if index not in expected.optimizer or not isinstance(entries, dict):
            raise bad(f"the optimizer state of parameter {index!r} belongs to no parameter or is not a dict")
        keys = expected.optimizer_state_keys
        if keys is not None and set(entries) != set(keys):
            raise bad(f"the optimizer state of parameter {index} has {sorted(entries)}, this optimizer keeps "
                      f"{sorted(keys)}")
        shape, dtype = expected.optimizer[index]
        for key, value in entries.items():
            _check_optimizer_value(index, key, value, shape, dtype, step, bad)


def _check_optimizer_value(index: int, key: str, value: Any, shape, dtype, step: int, bad) -> None:
    where = f"optimizer state {key} of parameter {index}"
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        if tuple(value.shape) != shape:
            # Stated as a misfit (another model), not damage: the message the fallback test looks for.
            raise bad(f"{where} has shape {list(value.shape)}, the parameter {list(shape)}")
        if value.dtype != dtype:
            raise bad(f"{where} is {value.dtype}, the parameter {dtype}")
        if not bool(torch.isfinite(value).all()):
            raise bad(f"{where} holds NaN or inf")
        return
    number = value.item() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
    if key == "step":
        if not is_finite_number(number) or not 0 <= number <= step:
            raise bad(f"{where} is {number!r}, not a count between 0 and the checkpoint's step ({step})")
    elif not is_finite_number(number):
        raise bad(f"{where} is {value!r}, not a finite number")


def _check_scheduler(scheduler: Any, step: int, expected: ExpectedContents | None, bad) -> None:
    if not isinstance(scheduler, dict) or scheduler.get("last_epoch") != step or not is_int(scheduler["last_epoch"]):
        last = scheduler.get("last_epoch") if isinstance(scheduler, dict) else scheduler
        raise bad(f"its schedule is at step {last!r}, the checkpoint at step {step}")
    if expected is None:
        return
    fresh = expected.scheduler
    if set(scheduler) != set(fresh) or not all(_same_kind(fresh[k], scheduler[k]) for k in fresh if k != "last_epoch"):
        raise bad(f"its schedule has fields {sorted(scheduler)} unlike this run's {sorted(fresh)} (or a value "
                  "of another type, or a learning rate that is not a finite number >= 0)")


# --- the weights -----------------------------------------------------------------------------------
def check_model_tensors(path: Path, expected: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """``model.safetensors`` holds exactly this model's tensors, each of its shape and dtype, all finite."""
    from safetensors import safe_open

    def misfit(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path} does not fit the model: {what}")

    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
            slices = {name: handle.get_slice(name) for name in handle.keys()}
            saved = {name: (tuple(part.get_shape()), part.get_dtype()) for name, part in slices.items()}
            missing = sorted(set(expected) - set(saved))
            if missing:
                raise misfit(f"model.safetensors lacks {missing[0]}"
                             + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
            for name, (shape, dtype) in saved.items():
                if name not in expected:
                    raise misfit(f"unexpected tensor {name}")
                if shape != expected[name][0]:
                    raise misfit(f"{name} has shape {list(shape)}, the config gives {list(expected[name][0])}")
                if dtype != expected[name][1]:
                    raise CheckpointError(f"checkpoint {path} is corrupt: {name} is stored as {dtype}, the model "
                                          f"holds {expected[name][1]}")
            for name in saved:  # a save refuses non-finite weights: one here was not written by a save
                tensor = handle.get_tensor(name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise CheckpointError(f"checkpoint {path} is corrupt: {name} holds NaN or inf")
    except CheckpointError:
        raise
    except Exception as err:  # safetensors raises its own error types for a malformed header
        raise CheckpointError(f"checkpoint {path} is corrupt: model.safetensors unreadable "
                              f"({type(err).__name__})") from None
