"""The attention kernels compile for Hopper (sm_90) without a GPU.

The interpreter runs the kernels as Python, so it misses what only the compiler rejects (a value
Triton specializes into a constant, a type mismatch between branches, a block too small for
``tl.dot``). Triton's bundled ptxas compiles ahead of time with no GPU present; this runs in a
subprocess because tests/conftest.py turns the interpreter on for this process.
"""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

COMPILE_SCRIPT = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from fastbert.kernels import flash_attention as fa

    def signature(kernel, dtype, constexprs):
        """Argument types by the kernels' naming convention: upper case = pointer, else scalar."""
        types = {}
        for name in kernel.arg_names:
            if name in constexprs:
                types[name] = "constexpr"
            elif name in ("LSE", "DELTA"):
                types[name] = "*fp32"
            elif name == "KEEP":
                types[name] = "*u8"
            elif name in ("SPANS", "CU_SEQLENS"):
                types[name] = "*i32"
            elif name.isupper():
                types[name] = "*" + dtype
            elif name in ("scale_log2", "softmax_scale", "dropout_p"):
                types[name] = "fp32"
            elif name == "seed":
                types[name] = "i32"  # kernels/_launch.py: seeds are int32
            else:
                types[name] = "i32"
        return types

    variants = [  # (dtype, head_dim, varlen, mask, dropout)
        ("bf16", 40, False, True, True),
        ("fp16", 64, True, False, False),
    ]
    kernels = [(fa._attention_fwd_kernel, fa._FWD_CONFIGS[0]), (fa._attention_bwd_dq_kernel, fa._BWD_DQ_CONFIGS[0]),
               (fa._attention_bwd_dkdv_kernel, fa._BWD_DKDV_CONFIGS[0])]
    for dtype, head_dim, varlen, mask, dropout in variants:
        for kernel, (block_m, block_n, warps, stages) in kernels:
            constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=block_m,
                              BLOCK_N=block_n, IS_VARLEN=varlen, HAS_MASK=mask, HAS_DROPOUT=dropout,
                              DOT_PRECISION="tf32")
            source = triton.compiler.ASTSource(fn=kernel, signature=signature(kernel, dtype, constexprs),
                                               constexprs=constexprs)
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                      options=dict(num_warps=warps, num_stages=stages))
            assert compiled.asm["cubin"], kernel.fn.__name__
            print("compiled", kernel.fn.__name__, dtype, head_dim, "smem", compiled.metadata.shared)
''')


def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # a real compile, not a cache hit
    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("compiled") == 6
