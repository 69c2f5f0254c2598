"""Compile: each recorded launch for the H200 (sm_90) with Triton's bundled ptxas, and read it back.

A launch is specialised exactly as ``JITFunction.run`` would (Triton's own binder: pointer alignment
and divisibility by 16, integers equal to 1, constexprs), once per configuration it may run with, and
compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``. ptxas' log gives
registers and spills; the TTGIR and PTX show how dots and loads lowered. Needs the kernels imported
without ``TRITON_INTERPRET`` (see :mod:`.run`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from dataclasses import dataclass

from .capture import Launch

TARGET_ARCH = 90
WARP_SIZE = 32


@dataclass
class KernelStats:
    case: str
    kernel: str
    config: str
    num_warps: int
    num_stages: int
    registers: int | None = None
    spill_bytes: int | None = None  # spill stores + spill loads, bytes per thread
    smem_bytes: int | None = None
    ctas_per_sm: int | None = None
    occupancy_limit: str = ""  # what bounds ctas_per_sm: regs | smem | warps | ctas
    wgmma_dots: int | None = None  # TTGIR ttng.warp_group_dot (Hopper wgmma)
    other_dots: int | None = None  # TTGIR tt.dot left as mma.sync (or FMA for fp32 ieee)
    ld_global: int | None = None  # PTX ld.global instructions
    ld_global_v4: int | None = None  # of them 16-byte vector loads
    ptx_lines: int | None = None
    error: str = ""


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_WGMMA = re.compile(r"\bttng\.warp_group_dot\b")
_DOT = re.compile(r"\btt\.dot\b")
_LD_GLOBAL = re.compile(r"^\s*(?:@%p\d+\s+)?ld\.global\b", re.M)
_LD_GLOBAL_V4 = re.compile(r"^\s*(?:@%p\d+\s+)?ld\.global\S*\.v4\b", re.M)


def config_label(config, kwargs: dict) -> str:
    """``tuned BLOCK_M=.. w4 s3`` for an autotuner's configuration, ``fixed ...`` for a launch's own."""
    if config is None:
        blocks = {k: v for k, v in kwargs.items() if k.startswith("BLOCK")}
        warps, stages = kwargs.get("num_warps", 4), kwargs.get("num_stages", 3)
        return "fixed " + " ".join(f"{k}={v}" for k, v in blocks.items()) + f" w{warps} s{stages}"
    blocks = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"tuned {blocks} w{config.num_warps} s{config.num_stages}"


def read_ptxas_log(stats: KernelStats, log: str) -> None:
    """Registers and spill bytes (stores + loads) from ptxas' ``-v`` output; None where it says nothing."""
    used, spill = _PTXAS_USED.search(log), _PTXAS_SPILL.search(log)
    stats.registers = int(used.group(1)) if used else None
    stats.spill_bytes = int(spill.group(1)) + int(spill.group(2)) if spill else None


def read_lowering(stats: KernelStats, ttgir: str, ptx: str) -> None:
    """Dots on wgmma vs other, global loads and 16-byte vector loads, from the TTGIR and PTX."""
    stats.wgmma_dots = len(_WGMMA.findall(ttgir))
    stats.other_dots = len(_DOT.findall(ttgir))
    stats.ld_global = len(_LD_GLOBAL.findall(ptx))
    stats.ld_global_v4 = len(_LD_GLOBAL_V4.findall(ptx))
    stats.ptx_lines = ptx.count("\n")


def _compile_one(launch: Launch, config, target, backend, memo: dict) -> KernelStats:
    import triton
    from triton import knobs
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    # The launchers' occupancy arithmetic (one source; imported here, in the child that compiles).
    from fastbert.kernels._launch import binding_occupancy

    kernel = launch.kernel
    kwargs = dict(launch.kwargs)
    if config is not None:
        kwargs.update(config.all_kwargs())
    kwargs.setdefault("num_warps", 4)
    kwargs.setdefault("num_stages", 3)
    stats = KernelStats(launch.case, launch.name, config_label(config, launch.kwargs), kwargs["num_warps"],
                        kwargs["num_stages"])
    # Specialise exactly as JITFunction.run does (its binder and its packing of the arguments).
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    key = (launch.name, repr(sorted(signature.items())), repr(sorted(constexprs.items(), key=repr)),
           repr(sorted(attrs.items(), key=repr)), repr(sorted(options.__dict__.items(), key=repr)))
    if key in memo:
        return dataclasses.replace(memo[key], case=launch.case, config=stats.config)
    log = io.StringIO()
    try:
        with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as err:  # a configuration that does not compile is a result, not a crash
        message = str(err).strip().splitlines()
        stats.error = f"{type(err).__name__}: {message[0] if message else ''}"[:300]
        memo[key] = stats
        return stats
    read_ptxas_log(stats, log.getvalue())
    stats.smem_bytes = compiled.metadata.shared
    if stats.registers is not None:
        stats.ctas_per_sm, stats.occupancy_limit = binding_occupancy(stats.registers, stats.smem_bytes,
                                                                     stats.num_warps)
    read_lowering(stats, compiled.asm["ttgir"], compiled.asm["ptx"])
    memo[key] = stats
    return stats


def compile_all(launches: list[Launch]) -> list[KernelStats]:
    """Compile every (launch, configuration) for sm_90; identical specialisations compile once."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", TARGET_ARCH, WARP_SIZE)
    backend = make_backend(target)
    memo: dict = {}
    rows, seen = [], set()
    for launch in launches:
        for config in launch.configs:
            row = _compile_one(launch, config, target, backend, memo)
            # Kernels without an autotune switch are captured twice (switch on and off): one row each.
            if (row.case, row.kernel, row.config) not in seen:
                seen.add((row.case, row.kernel, row.config))
                rows.append(row)
    return rows
