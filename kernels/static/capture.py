"""Capture: run the real host launchers on meta tensors that report a CUDA device, recording launches.

Within :func:`recording`, every ``@triton.jit`` kernel and autotuner of the kernel modules is replaced
by a :class:`_Recorder`, and anything asked for on a CUDA device is made on ``meta``
(:class:`CudaOnMeta`) as a :class:`CudaLookingMeta`: shape, strides and dtype, no memory. Such a
tensor reports ``cuda:0`` to the launchers while the capture's flag is up, and ``meta`` to torch's own
code, which runs with the flag down (:class:`CudaOnMeta` lowers it around every torch function), so
the launchers take their GPU branches and torch still computes on meta.
"""
from __future__ import annotations

import contextlib
import os
import types
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

from . import cases as case_sets
from .case import StaticCase

SM_COUNT = 132  # what the launchers' per-SM program counts see (the H200's SMs)

_CUDA0 = torch.device("cuda", 0)
_META = torch.device("meta")


class _Flag:
    """Whether a CudaLookingMeta reports cuda (the launchers asking) or meta (torch itself asking)."""

    reports_cuda = False


def _is_cuda_device(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return isinstance(value, str) and value.startswith("cuda")


class CudaLookingMeta(torch.Tensor):
    """A ``meta`` tensor that tells the kernel launchers it is on ``cuda:0`` while the capture runs them."""

    @property
    def device(self):
        return _CUDA0 if _Flag.reports_cuda else _META

    @property
    def is_cuda(self):
        return _Flag.reports_cuda


class CudaOnMeta(TorchFunctionMode):
    """Within it, anything asked for on a CUDA device is made on ``meta`` as a :class:`CudaLookingMeta`;
    torch's functions run with the flag down, so they see meta tensors as what they are."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.device:
            return func(*args, **(kwargs or {}))
        args = tuple("meta" if _is_cuda_device(a) else a for a in args)
        kwargs = {k: ("meta" if k == "device" and _is_cuda_device(v) else v) for k, v in (kwargs or {}).items()}
        outer, _Flag.reports_cuda = _Flag.reports_cuda, False
        try:
            result = func(*args, **kwargs)
        finally:
            _Flag.reports_cuda = outer
        if isinstance(result, torch.Tensor) and result.is_meta and not isinstance(result, CudaLookingMeta):
            return result.as_subclass(CudaLookingMeta)
        return result


# A fresh CUDA allocation is aligned far beyond 16 bytes; a view is offset from its storage's start.
_FAKE_BASE_ADDRESS = 1 << 32


class PointerArg:
    """What the recorder keeps of a tensor argument: its dtype and the address a real launch would pass."""

    def __init__(self, tensor: torch.Tensor):
        self.dtype = tensor.dtype
        self._address = _FAKE_BASE_ADDRESS + tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        return self._address


@dataclass
class Launch:
    """One kernel launch as the launcher made it, and the configurations it may run with."""

    case: str
    kernel: object  # the triton JITFunction
    args: tuple
    kwargs: dict
    configs: list  # triton.Config list (autotuned: after pruning) or [None]: the launch's own options

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


class _Recorder:
    """Stands in for a kernel (``kernel[grid](...)``) or an autotuner and records each call."""

    def __init__(self, target, launches: list, case: list):
        self.target, self.launches, self.case = target, launches, case

    def __getitem__(self, grid):
        self.grid = grid
        return self._record

    def warmup(self, *args, grid, **kwargs):
        """What a launcher that sizes its grid by occupancy (kernels/_launch.py: programs_for) reads of
        the compiled kernel. The grid does not change what compiles; the real figures are in the report."""
        metadata = types.SimpleNamespace(shared=0, num_warps=kwargs.get("num_warps", 4))
        return types.SimpleNamespace(_init_handles=lambda: None, n_regs=32, metadata=metadata)

    def _record(self, *args, **kwargs):
        from triton.runtime.autotuner import Autotuner, Heuristics

        wrapped = self.target
        configs = [None]
        if isinstance(wrapped, Autotuner):
            # The configurations a run can pick from: all, or what the early pruning keeps (Triton
            # prunes only when there is more than one).
            if len(wrapped.configs) > 1:
                wrapped.nargs = dict(zip(wrapped.arg_names, args))
                configs = list(wrapped.prune_configs(kwargs))
                wrapped.nargs = None
            else:
                configs = list(wrapped.configs)
            wrapped = wrapped.fn
        while isinstance(wrapped, Heuristics):
            named = dict(zip(wrapped.arg_names, args))
            for name, rule in wrapped.values.items():
                kwargs[name] = rule({**named, **kwargs})
            wrapped = wrapped.fn
        if callable(self.grid):  # as a launch does, once per configuration it runs (a launcher may count them)
            named = dict(zip(wrapped.arg_names, args))
            for config in configs:
                self.grid({**named, **kwargs, **(config.kwargs if config is not None else {})})
        recorded = tuple(PointerArg(a) if isinstance(a, torch.Tensor) else a for a in args)
        recorded_kw = {k: PointerArg(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        self.launches.append(Launch(self.case[0], wrapped, recorded, recorded_kw, configs))


@contextlib.contextmanager
def recording(launches: list, case: list):
    """Replace every jit kernel / autotuner of the kernel modules by a recorder and raise the flag
    (both restored on exit)."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    from fastbert.kernels import _launch

    saved = []
    for module in case_sets.kernel_modules():
        for attr, value in list(vars(module).items()):
            if isinstance(value, (JITFunction, Autotuner, Heuristics)):
                saved.append((module, attr, value))
                setattr(module, attr, _Recorder(value, launches, case))
    saved.append((_launch, "_sm_count", _launch._sm_count))
    _launch._sm_count = lambda device_index: SM_COUNT
    try:
        with CudaOnMeta():
            _Flag.reports_cuda = True
            yield
    finally:
        _Flag.reports_cuda = False
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)


def capture(cases: list[StaticCase]) -> list[Launch]:
    """Every launch the launchers make for ``cases``, autotuned and with autotuning off (the one switch,
    FASTBERT_AUTOTUNE, so the fixed configurations are captured too)."""
    owners = case_sets.case_modules()
    launches: list[Launch] = []
    current = [""]
    saved = os.environ.get("FASTBERT_AUTOTUNE")
    try:
        for autotune in ("1", "0"):
            os.environ["FASTBERT_AUTOTUNE"] = autotune
            with recording(launches, current):
                for case in cases:
                    current[0] = case.label
                    case_sets.run_case(case, owners)
    finally:
        if saved is None:
            os.environ.pop("FASTBERT_AUTOTUNE", None)
        else:
            os.environ["FASTBERT_AUTOTUNE"] = saved
    return launches
