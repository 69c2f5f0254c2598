"""What the static report must show; each check returns its failures as lines (empty: it passes).

:func:`failures` runs them all: every row compiles with no spill and at most 227 KB of shared memory,
the attention forward and dQ dots run on wgmma (16-bit inputs), attention and MLM cross-entropy tiles
load as 16-byte vectors, and, with ``every_kernel``, every kernel of the kernel modules was launched.
"""
from __future__ import annotations

from .compiler import KernelStats

# The largest shared memory one block may take on the H200 (the occupancy limits are kernels/_launch.py's HOPPER).
SMEM_PER_BLOCK_MAX = 227 * 1024
# Attention dots that must run on Hopper's wgmma (the dK/dV kernel's transposed dots may use mma.sync).
WGMMA_KERNELS = ("_attention_fwd_kernel", "_attention_bwd_dq_kernel")


def declared_kernels() -> set[str]:
    """The names of every ``@triton.jit`` kernel the kernel modules define: those named ``*_kernel``
    (the ``@jit`` helpers they call are not launched on their own)."""
    from triton.runtime.jit import JITFunction

    from .cases import kernel_modules

    return {name for module in kernel_modules() for name, value in vars(module).items()
            if isinstance(value, JITFunction) and name.endswith("_kernel") and value.fn.__module__ == module.__name__}


def compile_failures(rows: list[KernelStats]) -> list[str]:
    failures = []
    for r in rows:
        where = f"{r.case} | {r.kernel} | {r.config}"
        if r.error:
            failures.append(f"{where}: does not compile: {r.error}")
            continue
        if r.smem_bytes > SMEM_PER_BLOCK_MAX:
            failures.append(f"{where}: {r.smem_bytes} B shared memory > 227 KB")
        if r.spill_bytes != 0:
            failures.append(f"{where}: spills {r.spill_bytes} B")
        # fp32 attention uses ieee dots, which wgmma (tf32 at best) cannot run.
        if r.kernel in WGMMA_KERNELS and " fp32 " not in f" {r.case} " and (r.other_dots or not r.wgmma_dots):
            failures.append(f"{where}: {r.other_dots} of {r.other_dots + r.wgmma_dots} dots not on wgmma")
    return failures


def unvectorised_attention(rows: list[KernelStats]) -> list[str]:
    """Attention tiles must load as 16-byte vectors at every head dim: from BLOCK_D 32 on every kernel
    has some, and a head dim loads as many as the power of two that is its BLOCK_D (same dtype, layout,
    dropout, kernel and configuration) wherever the rows hold both. Head dims that are odd multiples
    of 8 compiled to scalar loads (and spilled) before the kernels declared their strides' alignment."""
    from fastbert.kernels.limits import padded_block

    failures, vector_loads = [], {}
    for r in rows:
        if not r.kernel.startswith("_attention") or r.error:
            continue
        _, dtype, _, head_dim, layout, dropout = r.case.split()
        head_dim = int(head_dim[1:])
        block_d = padded_block(head_dim)
        if block_d >= 32 and not r.ld_global_v4:
            failures.append(f"{r.case} | {r.kernel} | {r.config}: no 16-byte vector load")
        vector_loads[(dtype, head_dim, layout, dropout, r.kernel, r.config)] = (r.ld_global_v4, block_d)
    for (dtype, head_dim, *rest), (count, block_d) in vector_loads.items():
        reference = vector_loads.get((dtype, block_d, *rest))
        if reference is not None and count != reference[0]:
            failures.append(f"attention {dtype} D{head_dim} {' | '.join(rest)}: {count} vector loads, "
                            f"{reference[0]} at D{block_d}")
    return failures


def unvectorised_mlm_loss(rows: list[KernelStats]) -> list[str]:
    """The MLM cross-entropy kernel reads rows of the op's padded logits buffer (a multiple of 16
    elements wide, masked beyond the vocabulary): from tiles of 8 elements per thread on (vocabularies
    over 128), whatever the vocabulary's divisibility, its loads must be 16-byte vectors."""
    return [f"{r.case} | {r.kernel} | {r.config}: no 16-byte vector load" for r in rows
            if r.kernel == "_mlm_cross_entropy_kernel" and not r.error and int(r.case.split()[2][1:]) > 128
            and not r.ld_global_v4]


def failures(rows: list[KernelStats], every_kernel: bool = True) -> list[str]:
    """Every check's failures; ``every_kernel``: also each declared kernel that no row shows."""
    if not rows:
        return ["no kernel was captured"]
    found = compile_failures(rows) + unvectorised_attention(rows) + unvectorised_mlm_loss(rows)
    if every_kernel:
        missing = declared_kernels() - {r.kernel for r in rows}
        found += [f"kernel never launched: {name}" for name in sorted(missing)]
    return found
