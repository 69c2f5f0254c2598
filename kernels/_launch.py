"""Launch helpers shared by the kernels: row views of the inputs, the one autotuning switch, the one
interpreter path, seed checks and occupancy-sized program counts."""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable

import torch
import triton

from .limits import SEED_LIMIT, padded_block
from .limits import interpreter_enabled as interpreted  # the name the launchers (and tests' patches) use

# Seeds below SEED_LIMIT are typed int32 (see limits.py). Kernels also list "seed" in do_not_specialize: a
# seed of 1, or one divisible by 16, would otherwise be specialised into another variant.


def check_seed(seed: int) -> int:
    """``seed`` if it is a kernel seed (an int in [0, 2**31)), else a ValueError naming the rule."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"kernel seeds are ints in [0, 2**31) (typed int32 by Triton), got {seed!r}")
    return seed


def autotune_enabled() -> bool:
    """The one switch for every autotuned kernel: ``FASTBERT_AUTOTUNE=0`` runs each kernel's fixed
    configuration instead (e.g. tests that sweep many shapes). Read at every launch, so a test can set it.
    The interpreter never autotunes: it would cost minutes."""
    return os.environ.get("FASTBERT_AUTOTUNE", "1") != "0" and not interpreted()


def launch(kernel, tuned, grid: Callable[[dict], tuple], args: tuple, meta: dict, fixed: triton.Config) -> None:
    """Run ``kernel`` through its autotuner ``tuned`` when autotuning is on, else with the ``fixed`` config
    (always, when ``tuned`` is None: a launch with one measured configuration).

    ``grid`` maps the launch's meta-parameters (``meta`` plus the config's) to the grid, as Triton's
    autotuner expects."""
    if tuned is not None and autotune_enabled():
        tuned[grid](*args, **meta)
        return
    params = {**meta, **fixed.kwargs}
    kernel[grid(params)](*args, **params, num_warps=fixed.num_warps, num_stages=fixed.num_stages)


def as_rows(tensor: torch.Tensor, hidden: int) -> torch.Tensor:
    """``tensor`` as (rows, hidden) whose last dimension is contiguous: the layout every kernel here reads.

    A view when the strides allow one (the row stride may be anything, even 0 for an expanded tensor);
    a contiguous copy otherwise, so a kernel never walks memory with strides it does not know about.
    """
    rows = tensor.reshape(-1, hidden)
    if rows.stride(-1) != 1 and hidden > 1:
        rows = rows.contiguous()
    return rows


def block_size(hidden: int, minimum: int = 16) -> int:
    """The power of two a whole row is padded to inside a kernel (masked beyond ``hidden``)."""
    return padded_block(hidden, minimum)


def warps_for(elements_per_program: int) -> int:
    """Warps ladder: about eight elements per thread (one 16-byte load of bf16), 1 to 16 warps."""
    return min(16, max(1, elements_per_program // 256))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# ---------------------------------------------------------------------------------------------------
# Occupancy: how many programs of a compiled kernel fit on the GPU at once
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SMLimits:
    """Per-SM resources that bound how many CTAs of one kernel are resident at once (CUDA occupancy
    calculator figures; the defaults are Hopper's, sm_90: H100 / H200)."""

    registers: int = 65536
    register_granule: int = 256  # registers are handed out per warp, in units of 256
    max_warps: int = 64
    max_ctas: int = 32
    shared_bytes: int = 228 * 1024
    shared_reserved_per_cta: int = 1024  # the driver keeps 1 KB of every CTA's shared memory


HOPPER = SMLimits()

# Under the interpreter there is no compiled kernel to read: programs run one after another, so a few
# programs keep the tests quick while still splitting the rows (and the partial sums) several ways.
INTERPRETER_PROGRAMS = 4


def occupancy_bounds(registers_per_thread: int, shared_bytes: int, num_warps: int,
                     limits: SMLimits = HOPPER) -> dict[str, int]:
    """CTAs of a kernel that each SM resource alone would let reside: ``regs``, ``smem``, ``warps``,
    ``ctas`` (in that order, which breaks ties when the static report names the binding one)."""
    regs_per_warp = -(-max(1, registers_per_thread) * 32 // limits.register_granule) * limits.register_granule
    return {
        "regs": (limits.registers // regs_per_warp) // num_warps,
        "smem": limits.shared_bytes // (shared_bytes + limits.shared_reserved_per_cta),
        "warps": limits.max_warps // num_warps,
        "ctas": limits.max_ctas,
    }


def binding_occupancy(registers_per_thread: int, shared_bytes: int, num_warps: int,
                      limits: SMLimits = HOPPER) -> tuple[int, str]:
    """(CTAs resident per SM, the resource that bounds them): the tightest of :func:`occupancy_bounds`.
    The count is 0 when that resource alone cannot hold one CTA (the static report shows it as is)."""
    bounds = occupancy_bounds(registers_per_thread, shared_bytes, num_warps, limits)
    resource = min(bounds, key=bounds.__getitem__)  # the first of equals, in occupancy_bounds' order
    return bounds[resource], resource


def ctas_per_sm(registers_per_thread: int, shared_bytes: int, num_warps: int, limits: SMLimits = HOPPER) -> int:
    """CTAs of a kernel resident per SM, as a launcher sizes its grid: :func:`binding_occupancy`'s count,
    at least 1 (a kernel that compiled runs)."""
    return max(1, binding_occupancy(registers_per_thread, shared_bytes, num_warps, limits)[0])


def occupancy_programs(registers_per_thread: int, shared_bytes: int, num_warps: int, sm_count: int,
                       work_items: int, limits: SMLimits = HOPPER) -> int:
    """Programs for a persistent kernel: one full wave (``sm_count`` x CTAs per SM), never more than
    there are work items (row blocks), at least 1."""
    wave = sm_count * ctas_per_sm(registers_per_thread, shared_bytes, num_warps, limits)
    return max(1, min(wave, work_items))


def _variant_key(value) -> tuple:
    """What of an argument can select another compiled variant: a tensor's dtype and 16-byte alignment,
    an int's width and its 1 / divisible-by-16 specialisations, other values by type and value. A
    superset of what Triton specialises on, so one key never covers two variants."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, value.data_ptr() % 16 == 0)
    if isinstance(value, int) and not isinstance(value, bool):
        return ("int", -2**31 <= value < 2**31, value == 1, value % 16 == 0)
    if isinstance(value, float):
        return ("float",)
    return (type(value).__name__, value)


_RESOURCES: dict[tuple, tuple[int, int, int]] = {}


def _compiled_resources(kernel, args: tuple, params: dict) -> tuple[int, int, int]:
    """(registers per thread, shared bytes, warps) of ``kernel`` compiled for these arguments, read once
    per variant: binding the arguments again on every backward call would cost host time per layer."""
    key = (kernel, tuple(map(_variant_key, args)), tuple(sorted(params.items())))
    if key not in _RESOURCES:
        compiled = kernel.warmup(*args, grid=(1,), **params)
        compiled._init_handles()  # loads the binary: this is what fills in n_regs
        _RESOURCES[key] = (compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps)
    return _RESOURCES[key]


def programs_for(kernel, args: tuple, params: dict, device: torch.device, work_items: int) -> int:
    """:func:`occupancy_programs` of ``kernel`` compiled for these exact arguments (``params``: its
    constexprs plus num_warps/num_stages) on ``device``; :data:`INTERPRETER_PROGRAMS` under the interpreter.

    The registers and shared memory come from the compiled kernel's metadata, read once per compiled
    variant (:func:`_compiled_resources`)."""
    if interpreted() or device.type != "cuda":
        return max(1, min(INTERPRETER_PROGRAMS, work_items))
    index = device.index if device.index is not None else torch.cuda.current_device()
    return occupancy_programs(*_compiled_resources(kernel, args, params), _sm_count(index), work_items)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (CUDA only)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
