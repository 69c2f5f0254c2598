"""What every benchmark script shares: timing, the result row (one CSV format), and printing.

Timing: on CUDA ``triton.testing.do_bench`` (median, p20, p80 over many runs after warm-up); on the
CPU a plain repeated timer. Rows carry the columns of ``results.csv``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import os
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

CSV_COLUMNS = ("op", "provider", "mode", "dtype", "shape", "ms_median", "ms_p20", "ms_p80", "tflops", "gbps",
               "pct_of_peak", "peak_mem_mb", "device", "torch", "triton", "commit", "date", "tokens_per_s", "note",
               # static (compiled, not run) kernel rows: benchmarks/bench_static.py
               "config", "registers", "spill_bytes", "smem_bytes", "ctas_per_sm", "wgmma_dots", "other_dots",
               "ld_global_v4", "ld_global")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Timing:
    median: float  # milliseconds
    p20: float
    p80: float


def time_fn(fn: Callable[[], object], device: str, *, quick: bool = False, rep_ms: float | None = None) -> Timing:
    """Milliseconds per call of ``fn`` (median, p20, p80). ``rep_ms``: measuring time on CUDA (raise it
    for calls of tens of milliseconds, so that the quantiles rest on enough samples)."""
    if device == "cuda":
        import triton.testing

        rep = rep_ms if rep_ms is not None else (30 if quick else 100)
        ms = triton.testing.do_bench(fn, warmup=max(10, rep // 4), rep=rep, quantiles=[0.5, 0.2, 0.8])
        return Timing(*ms)
    fn()  # warm-up
    samples = []
    budget = 0.2 if quick else 1.0
    start = time.perf_counter()
    while len(samples) < 3 or (time.perf_counter() - start < budget and len(samples) < 50):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _timing(samples)


def _timing(samples: list[float]) -> Timing:
    """Median, p20 and p80 of CPU samples (milliseconds)."""
    samples = sorted(samples)
    q = statistics.quantiles(samples, n=5) if len(samples) >= 5 else [samples[0]] * 4
    return Timing(statistics.median(samples), q[0], q[3])


def time_interleaved(fns: dict[str, Callable[[], object]], device: str, *, quick: bool = False,
                     budget_s: float | None = None) -> dict[str, Timing]:
    """Milliseconds per call of each of ``fns``, measured side by side: on the CPU the calls alternate
    (A, B, A, B, ...) so that a change of machine load hits every provider alike (a CPU shared with other
    work drifts by tens of percent within a minute); on CUDA each is timed by :func:`time_fn`."""
    if device == "cuda":
        return {name: time_fn(fn, device, quick=quick) for name, fn in fns.items()}
    for fn in fns.values():
        fn()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in fns}
    budget = budget_s if budget_s is not None else (0.5 if quick else 20.0)
    start = time.perf_counter()
    while min(map(len, samples.values())) < 3 or (time.perf_counter() - start < budget
                                                  and min(map(len, samples.values())) < 30):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: _timing(ms) for name, ms in samples.items()}


def cpu_conditions() -> str:
    """The CPU, torch's thread count and the load while measuring: a CPU figure means little without them."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{model or 'CPU'} ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}), torch "
            f"{torch.get_num_threads()} threads, load average {load:.2f}")


def peak_memory_mb(fn: Callable[[], object], device: str) -> float | None:
    """Peak CUDA memory of one call (None on the CPU, where torch does not track it)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


@dataclass
class Row:
    op: str
    provider: str
    mode: str  # fwd | bwd | fwd+bwd | step | ...
    dtype: str
    shape: str
    ms_median: float | None = None
    ms_p20: float | None = None
    ms_p80: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    pct_of_peak: float | None = None
    peak_mem_mb: float | None = None
    device: str = ""
    torch: str = torch.__version__
    triton: str = ""
    commit: str = ""
    date: str = ""
    tokens_per_s: float | None = None  # model-level rows: real (non-padding) tokens per second
    note: str = ""  # e.g. "unsupported: ..." for a case a provider cannot run
    # Static rows (op "static"): one kernel in one launch configuration, compiled for sm_90, never run.
    config: str = ""
    registers: int | None = None
    spill_bytes: int | None = None
    smem_bytes: int | None = None
    ctas_per_sm: int | None = None
    wgmma_dots: int | None = None
    other_dots: int | None = None
    ld_global_v4: int | None = None
    ld_global: int | None = None

    @classmethod
    def measured(cls, op: str, provider: str, mode: str, dtype: str, shape: str, timing: Timing, *,
                 flops: float | None = None, bytes_moved: float | None = None, **extra) -> "Row":
        row = cls(op, provider, mode, dtype, shape, timing.median, timing.p20, timing.p80, **extra)
        if flops is not None:
            row.tflops = flops / (timing.median * 1e-3) / 1e12
        if bytes_moved is not None:
            row.gbps = bytes_moved / (timing.median * 1e-3) / 1e9
        return row

    @classmethod
    def unsupported(cls, op: str, provider: str, mode: str, dtype: str, shape: str, why: str) -> "Row":
        return cls(op, provider, mode, dtype, shape, note=f"unsupported: {why}")


def environment() -> dict[str, str]:
    """device / torch / triton / commit / date for every row of one run."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu ({os.cpu_count()} cores)"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"device": device, "torch": torch.__version__, "triton": triton_version, "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}


def stamp(rows: Iterable[Row], env: dict[str, str]) -> list[Row]:
    return [dataclasses.replace(r, **env) for r in rows]


def write_csv(rows: Iterable[Row], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for r in rows:
            writer.writerow(["" if getattr(r, c) is None else getattr(r, c) for c in CSV_COLUMNS])
    return path


def format_table(rows: Iterable[Row]) -> str:
    """A fixed-width table for the terminal."""
    lines = [f"{'op':<14} {'provider':<20} {'mode':<8} {'dtype':<5} {'shape':<28} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} "
             f"{'tokens/s':>13}"]
    for r in rows:
        if r.note:
            lines.append(f"{r.op:<14} {r.provider:<20} {r.mode:<8} {r.dtype:<5} {r.shape:<28} {r.note}")
            continue
        if r.op == "static":
            lines.append(f"{r.op:<14} {r.mode:<28} {r.shape:<40} {r.config:<34} regs {r.registers} spill "
                         f"{r.spill_bytes} smem {r.smem_bytes} CTAs/SM {r.ctas_per_sm} wgmma {r.wgmma_dots}")
            continue
        tf = f"{r.tflops:8.2f}" if r.tflops is not None else f"{'':8}"
        gb = f"{r.gbps:8.1f}" if r.gbps is not None else f"{'':8}"
        tok = f"{r.tokens_per_s:13,.0f}" if r.tokens_per_s is not None else ""
        lines.append(f"{r.op:<14} {r.provider:<20} {r.mode:<8} {r.dtype:<5} {r.shape:<28} {r.ms_median:9.4f} {tf} {gb} {tok}")
    return "\n".join(lines)


# ---- elementwise / normalisation ops: fwd, bwd and fwd+bwd over rotating inputs ---------------------
# Inputs rotate through enough copies that one pass over them overflows the H200's 60 MB L2.
ROTATE_BYTES = 3 * 60 * 2**20


class Cycle:
    """Calls ``body(item)`` on the next item each time: successive calls never hit the same inputs in L2."""

    def __init__(self, items, body):
        self.items, self.body, self.i = items, body, 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.items)
        return self.body(self.items[self.i])


def fwd_bwd_modes(fn: Callable, sets: list[tuple]) -> list[tuple[str, Callable[[], object]]]:
    """(mode, timed callable) for "fwd", "bwd" (on a retained graph) and "fwd+bwd".

    Each item of ``sets`` is ``(*inputs, grad_output)``: ``fn(*inputs)`` runs the op and the gradient
    flows to every input."""

    def forward(s):
        return fn(*s[:-1])

    def forward_backward(s):
        return torch.autograd.grad(forward(s), s[:-1], s[-1])

    outputs = [(forward(s), s) for s in sets]

    def backward(item):
        y, s = item
        return torch.autograd.grad(y, s[:-1], s[-1], retain_graph=True)

    return [("fwd", Cycle(sets, forward)), ("bwd", Cycle(outputs, backward)), ("fwd+bwd", Cycle(sets, forward_backward))]


def fused_vs_eager_rows(op: str, dtype: str, shape: str, device: str, quick: bool, sets: list[tuple],
                        fused: Callable, eager: Callable, bytes_for_mode: Callable[[str], float]) -> list[Row]:
    """fwd / bwd / fwd+bwd rows of ``fused`` (fastbert's kernel), ``eager`` and, on CUDA, torch.compile of
    ``eager``, on the same rotating ``sets`` (see :func:`fwd_bwd_modes`); a provider that cannot run
    here is a row saying why."""
    from fastbert import backend

    rows = []
    providers = [("eager", eager)]
    if backend.triton_can_run_on(torch.empty(0, device=device)):
        providers.insert(0, ("fastbert", fused))
    else:
        rows.append(Row.unsupported(op, "fastbert", "all", dtype, shape,
                                    "Triton needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)"))
    if device == "cuda":
        providers.append(("compile", torch.compile(eager, dynamic=False)))
    else:
        rows.append(Row.unsupported(op, "compile", "all", dtype, shape, "measured on CUDA only"))
    for provider, fn in providers:
        for mode, call in fwd_bwd_modes(fn, sets):
            call()  # warm-up: compiles, autotunes
            rows.append(Row.measured(op, provider, mode, dtype, shape, time_fn(call, device, quick=quick),
                                     bytes_moved=bytes_for_mode(mode), peak_mem_mb=peak_memory_mb(call, device)))
    return rows


def hf_bert_config(config, **overrides):
    """A transformers BertConfig of a fastbert one (same field names), for the HF providers."""
    import transformers

    fields = {k: v for k, v in config.to_dict().items() if k not in ("architectures", "id2label", "label2id")}
    return transformers.BertConfig(**fields, **overrides)


def script_main(run: Callable[[str, str, bool], list[Row]], doc: str, *, default_device: str | None = None,
                default_dtype: str = "bf16", summary: Callable[[list[Row]], str] | None = None,
                interpret_on_cpu: bool = False) -> list[Row]:
    """The command line every ``bench_*.py`` shares: ``--device cpu|cuda --dtype ... --quick``, then the
    table (and the script's own summary, if any)."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default=default_device or ("cuda" if torch.cuda.is_available() else "cpu"))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=default_dtype)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU, fewer repeats on CUDA")
    args = parser.parse_args()
    if interpret_on_cpu and args.device == "cpu":
        # Triton kernels run on the CPU only under the interpreter, set before triton is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    rows = run(args.device, args.dtype, args.quick)
    print(format_table(rows))
    if summary is not None:
        print()
        print(summary(rows))
    return rows
