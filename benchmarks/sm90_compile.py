"""Moved to :mod:`fastbert.kernels.static`; this keeps ``python -m benchmarks.sm90_compile`` working.

    python -m fastbert.kernels.static [--set smoke|quick|default|full] [--json OUT.json]
"""
import sys

from fastbert.kernels.static.run import compile_in_subprocess, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
