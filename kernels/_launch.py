"""Launch helpers shared by the kernels: row views of the inputs and the GPU's size."""
from __future__ import annotations

import functools

import torch
import triton


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
    return max(minimum, triton.next_power_of_2(hidden))


def warps_for(elements_per_program: int) -> int:
    """Warps ladder: about eight elements per thread (one 16-byte load of bf16), 1 to 16 warps."""
    return min(16, max(1, elements_per_program // 256))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def persistent_programs(device: torch.device, per_sm: int, interpreter_programs: int = 4) -> int:
    """How many programs a kernel that loops over rows should launch: ``per_sm`` per streaming
    multiprocessor on a GPU; a few under the interpreter (on CPU tensors), where each program runs serially."""
    if device.type != "cuda":
        return interpreter_programs
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) * per_sm
