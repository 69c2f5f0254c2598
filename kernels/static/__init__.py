"""Static sm_90 report: compile every Triton kernel for the H200 as its real launch would, with no GPU.

    python -m fastbert.kernels.static [--set smoke|quick|default|full] [--json OUT.json]
    python -m fastbert.kernels.static.compare OLD/results.csv NEW/results.csv

The parts, one job each:

* :mod:`.case` — :class:`StaticCase`, one call of an op's launchers; every kernel module declares its
  own (``static_cases(case_set)``) and runs them (``run_static_case(case)``) — nothing here lists them;
* :mod:`.cases` — finds those modules (every module of ``fastbert.kernels`` that declares cases) and
  gathers a case set;
* :mod:`.capture` — runs the launchers on meta tensors that report a CUDA device and records each
  launch (kernel, arguments, the configurations the autotuner may pick);
* :mod:`.compiler` — specialises a recorded launch as ``JITFunction.run`` would, compiles it for
  ``GPUTarget("cuda", 90, 32)`` and reads registers and spills from ptxas' log, dots and vector loads
  from the TTGIR and PTX;
* :mod:`.checks` — what the report must show (no spills, shared memory, wgmma, 16-byte loads, every
  kernel launched); :mod:`.compare` — two reports side by side, non-zero on a regression;
* :mod:`.run` — the command line and :func:`compile_in_subprocess` (compiling needs the kernels
  imported without ``TRITON_INTERPRET``, so tests and the benchmark run it in child processes).

Importing this package imports nothing (the kernel modules import :mod:`.case` for its dataclass).
"""
