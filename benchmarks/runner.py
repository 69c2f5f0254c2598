"""The benchmark runner: ceilings first, then every subject, into results.csv / results.md / benchmarks.png.

    python -m benchmarks [--quick] [--device cuda|cpu] [--dtype bf16|fp16|fp32]
                         [--only attention,layer_norm,...] [--out DIR] [--time-budget SECONDS]
    fastbert bench ...   (the same, from an installed package)
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import sys
import time
import traceback
from pathlib import Path

import torch

from . import ceilings, report
from .common import DTYPES, Row, environment, format_table, stamp, write_csv

# Subject name → module (benchmarks/bench_<name>.py); run in this order.
SUBJECTS = ("attention", "layer_norm", "bias_gelu", "mlm_loss", "bert_layer", "model", "patched_hf", "embeddings", "masking", "data")
# Run only when asked for (--only static): compiles every kernel for sm_90 on the CPU, minutes of ptxas.
OPT_IN_SUBJECTS = ("static",)


def _progress(items, total):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, total=total, desc="benchmarks", unit="subject", file=sys.stderr)


def run_subject(name: str, device: str, dtype: str, quick: bool) -> list[Row]:
    """One subject's rows; a subject that is missing or crashes becomes a row saying so."""
    try:
        module = importlib.import_module(f"{__package__}.bench_{name}")
    except ModuleNotFoundError as err:
        if err.name and err.name.endswith(f"bench_{name}"):
            return [Row.unsupported(name, "-", "-", dtype, "-", "no benchmark script yet")]
        raise
    try:
        return module.run(device, dtype, quick)
    except Exception as err:  # one broken subject must not lose the others' figures
        traceback.print_exc()
        return [Row(name, "-", "-", dtype, "-", note=f"error: {type(err).__name__}: {err}"[:300])]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastbert bench", description="fastbert benchmark suite")
    add_arguments(parser)
    return parser.parse_args(argv)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test: under 2 minutes)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(SUBJECTS)} (or {','.join(OPT_IN_SUBJECTS)})")
    parser.add_argument("--out", default=None, help="output folder (default: bench-out/DATE-DEVICE)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; subjects not started by then are reported as skipped")


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    args = args if args is not None else parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    subjects = SUBJECTS if not args.only else tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = [s for s in subjects if s not in SUBJECTS + OPT_IN_SUBJECTS]
    if unknown:
        raise ValueError(f"unknown subject(s) {unknown}; choose from {', '.join(SUBJECTS + OPT_IN_SUBJECTS)}")
    out = Path(args.out or f"bench-out/{datetime.date.today()}-{device}")
    out.mkdir(parents=True, exist_ok=True)

    start = time.monotonic()
    env = environment()
    print(f"device: {env['device']} | torch {env['torch']} | triton {env['triton'] or '-'} | commit "
          f"{env['commit'] or '-'} | dtype {dtype}{' | quick' if args.quick else ''}", flush=True)
    peaks, rows = ceilings.measure(device, dtype, args.quick)
    print(f"ceilings: {peaks.gemm_dtype} GEMM {peaks.gemm_tflops:.1f} TFLOP/s, copy {peaks.copy_gbps:.0f} GB/s", flush=True)
    for name in _progress(subjects, len(subjects)):
        if args.time_budget is not None and time.monotonic() - start > args.time_budget:
            rows.append(Row.unsupported(name, "-", "-", dtype, "-", f"skipped: time budget {args.time_budget:.0f}s spent"))
            continue
        rows.extend(run_subject(name, device, dtype, args.quick))
    rows = stamp(report.with_percent_of_peak(rows, peaks), env)

    write_csv(rows, out / "results.csv")
    (out / "results.md").write_text(report.markdown(rows, peaks, env, dtype, args.quick))
    plot = report.plot(rows, out / "benchmarks.png")
    print(format_table(rows))
    print(f"\nwrote {out / 'results.csv'}, {out / 'results.md'}" + (f", {plot}" if plot else ""))
    print(report.goals_table(rows, peaks))
    return 0
