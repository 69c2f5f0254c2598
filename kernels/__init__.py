"""Raw Triton kernels and their launchers, installed as ``fastbert.kernels``.

No autograd and no nn.Module here: ``fastbert.ops`` wraps these. The kernel modules import triton, so
only ``fastbert.ops`` imports them, lazily, the first time a Triton path is taken; :mod:`.limits`
(what the kernels take) imports torch only, and this package itself imports nothing.
"""

if __name__ == "kernels":  # this folder imported from a checkout's root, not as fastbert.kernels
    # With the checkout's root on sys.path (`python -m`, pytest, a notebook started there) Python finds
    # this folder first and hides the PyPI package of the same name: Hugging Face's `kernels`, which
    # transformers >= 5.25 imports. Hand the name over to that package where it is installed; without
    # it, this stays an empty package (transformers then sees no version and does not use it).
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _this, _other = sys.modules[__name__], importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _other  # `import kernels` returns what sys.modules holds once this file ends
        try:
            _spec.loader.exec_module(_other)
        except BaseException:
            sys.modules[__name__] = _this
            raise
