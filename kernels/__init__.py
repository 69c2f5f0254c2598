"""Raw Triton kernels and their launchers, installed as ``fastbert.kernels``.

No autograd and no nn.Module here: ``fastbert.ops`` wraps these. Importing this package imports
triton, so only ``fastbert.ops`` does it, lazily, the first time a Triton path is taken.
"""
