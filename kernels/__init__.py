"""Raw Triton kernels and their launchers, installed as ``fastbert.kernels``.

No autograd and no nn.Module here: ``fastbert.ops`` wraps these. The kernel modules import triton, so
only ``fastbert.ops`` imports them, lazily, the first time a Triton path is taken; :mod:`.limits`
(what the kernels take) imports torch only, and this package itself imports nothing.
"""
