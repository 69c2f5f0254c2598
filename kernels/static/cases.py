"""The case sets: gathered from the kernel modules, each of which declares its own.

A kernel module takes part by defining ``static_cases(case_set: str) -> list[StaticCase]`` and
``run_static_case(case)`` (calls its launchers on :func:`~.case.cuda_tensor` inputs). Modules are found
by listing the ``fastbert.kernels`` package, so a new kernel module needs no entry here.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from .case import StaticCase, check_case_set

_PACKAGE = "fastbert.kernels"
_SKIP = {"static", "limits"}  # this tooling; the triton-free limits


def kernel_modules() -> list[ModuleType]:
    """Every module of ``fastbert.kernels`` (imported; they import triton), in name order."""
    package = importlib.import_module(_PACKAGE)
    names = sorted(info.name for info in pkgutil.iter_modules(package.__path__) if info.name not in _SKIP)
    return [importlib.import_module(f"{_PACKAGE}.{name}") for name in names]


def case_modules() -> dict[str, ModuleType]:
    """{op: module} for the modules that declare static cases (the op named by their cases)."""
    owners = {}
    for module in kernel_modules():
        if hasattr(module, "static_cases"):
            for case in module.static_cases("full"):
                owners.setdefault(case.op, module)
    return owners


def case_set(name: str) -> list[StaticCase]:
    """The cases of set ``name`` (see ``case.CASE_SETS``), module by module in name order."""
    check_case_set(name)
    return [case for module in kernel_modules() if hasattr(module, "static_cases")
            for case in module.static_cases(name)]


def run_case(case: StaticCase, owners: dict[str, ModuleType]) -> None:
    owners[case.op].run_static_case(case)
