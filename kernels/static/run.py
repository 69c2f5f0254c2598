"""The command line, ``python -m fastbert.kernels.static``, and :func:`compile_in_subprocess`.

Compiling needs the kernels imported without ``TRITON_INTERPRET`` (under the interpreter ``@jit``
makes Python functions, not compilable ones), so tests and the benchmark run this module in child
processes, each with its own Triton cache (a cache hit has no ptxas log to read).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .case import CASE_SETS
from .compiler import KernelStats

_MODULE = "fastbert.kernels.static"


def compile_cases(case_set_name: str, case_filter: str = "", shard: int = 0, shards: int = 1) -> list[KernelStats]:
    """Capture and compile, in this process, the cases of the set whose label holds every word of
    ``case_filter``, every ``shards``-th from the ``shard``-th."""
    from .capture import capture
    from .cases import case_set
    from .compiler import compile_all

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise ValueError("unset TRITON_INTERPRET (the interpreter's kernels cannot be compiled)")
    words = case_filter.split()
    cases = [c for c in case_set(case_set_name) if all(word in c.label.split() for word in words)]
    # A fresh Triton cache: on a cache hit ptxas does not run, and its log (registers, spills) is empty.
    previous = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="fastbert-static-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        try:
            return compile_all(capture(cases[shard::shards]))
        finally:
            if previous is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = previous


def compile_in_subprocess(case_names: str = "default", jobs: int = 1, timeout: float = 3600,
                          case_filter: str = "") -> list[KernelStats]:
    """Run this module in ``jobs`` child processes (each a share of the cases) without the interpreter
    (each compiles in a fresh Triton cache, see :func:`compile_cases`); their rows, shard by shard."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="sm90-") as tmp:
        outs = [Path(tmp) / f"stats-{i}.json" for i in range(jobs)]
        children = [subprocess.Popen([sys.executable, "-m", _MODULE, "--set", case_names, "--filter", case_filter,
                                      "--shard", f"{i}/{jobs}", "--json", str(out)],
                                     env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                    for i, out in enumerate(outs)]
        failures = []
        for child in children:
            try:
                _, err = child.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                _, err = child.communicate()
            if child.returncode != 0:
                failures.append(f"exit {child.returncode}:\n{err[-3000:]}")
        if failures:
            raise RuntimeError("static sm_90 compile failed: " + "\n".join(failures))
        return [KernelStats(**row) for out in outs for row in json.loads(out.read_text())]


def _shard(text: str) -> tuple[int, int]:
    try:
        shard, shards = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard wants I/N (two integers), got {text!r}") from None
    if not 0 <= shard < shards:
        raise argparse.ArgumentTypeError(f"--shard {text}: I must be in [0, N)")
    return shard, shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastbert.kernels.static",
                                     description="compile every Triton kernel for sm_90 and print the stats")
    parser.add_argument("--set", default="default", choices=CASE_SETS)
    parser.add_argument("--json", default=None, help="write the rows here as JSON")
    parser.add_argument("--filter", default="", help="only cases whose label contains all these words")
    parser.add_argument("--shard", default=(0, 1), type=_shard,
                        help="I/N: compile every N-th case from the I-th (parallel runs)")
    args = parser.parse_args(argv)
    try:
        stats = compile_cases(args.set, args.filter, *args.shard)
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if args.json:
        target = Path(args.json)
        staged = target.with_name(f".{target.name}.tmp")
        staged.write_text(json.dumps([dataclasses.asdict(s) for s in stats], indent=1))
        staged.replace(target)  # atomic: a reader sees the old file or the whole new one
    for s in stats:
        print(f"{s.case:<40} {s.kernel:<28} {s.config:<32} regs {s.registers} spill {s.spill_bytes} "
              f"smem {s.smem_bytes} ctas/SM {s.ctas_per_sm} wgmma {s.wgmma_dots} other {s.other_dots} "
              f"ld {s.ld_global_v4}/{s.ld_global} {s.error}")
    return 0
