"""Compare two static reports (``results.csv`` of ``fastbert bench --only static``) row by row.

    python -m fastbert.kernels.static.compare OLD/results.csv NEW/results.csv [--rename OP:OLD=NEW ...]

Rows are matched by (kernel, case, config). A regression, which makes the exit status 1: registers
that moved by more than ``REGISTER_SLACK`` either way, a row of the new report that spills or does not
compile, a change in 16-byte vector loads, or a row present in one report only. ``--rename`` maps an
old kernel name for the cases of one op (the kernels of layer_norm and bias_gelu were both
``_fwd_kernel`` / ``_bwd_kernel`` before they got unique names). Prints a Markdown summary.
"""
from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

REGISTER_SLACK = 4
_COLUMNS = ("mode", "shape", "config", "registers", "spill_bytes", "ld_global_v4")


@dataclass(frozen=True)
class Figures:
    registers: int | None
    spill_bytes: int | None
    ld_global_v4: int | None
    note: str


def _int(text: str) -> int | None:
    return int(text) if text not in ("", None) else None


def read_report(path: str | Path, renames: dict[tuple[str, str], str] | None = None) -> dict[tuple, Figures]:
    """{(kernel, case, config): Figures} of the report's static rows; ValueError naming the file if it is
    not a static report."""
    renames = renames or {}
    path = Path(path)
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in ("op", *_COLUMNS) if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: not a static report (no column {', '.join(missing)})")
            rows = {}
            for line, row in enumerate(reader, start=2):
                if row["op"] != "static":
                    continue
                case = row["shape"]
                kernel = renames.get((case.split()[0], row["mode"]), row["mode"])
                key = (kernel, case, row["config"])
                if key in rows:
                    raise ValueError(f"{path}:{line}: row {' | '.join(key)} appears twice")
                try:
                    rows[key] = Figures(_int(row["registers"]), _int(row["spill_bytes"]), _int(row["ld_global_v4"]),
                                        row.get("note") or "")
                except ValueError:
                    raise ValueError(f"{path}:{line}: registers, spill_bytes and ld_global_v4 must be integers") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot read: {err.strerror or err}") from None
    if not rows:
        raise ValueError(f"{path}: no static rows")
    return rows


def compare(old: dict[tuple, Figures], new: dict[tuple, Figures]) -> tuple[list[str], list[str]]:
    """(regressions, differences within the slack), one line each."""
    regressions, within = [], []
    for key in sorted(old.keys() - new.keys()):
        regressions.append(f"{' | '.join(key)}: missing from the new report")
    for key in sorted(new.keys() - old.keys()):
        regressions.append(f"{' | '.join(key)}: new row, not in the old report")
    for key in sorted(old.keys() & new.keys()):
        a, b, where = old[key], new[key], " | ".join(key)
        if b.registers is None:
            regressions.append(f"{where}: does not compile ({b.note or 'no figures'})")
            continue
        if b.spill_bytes:
            regressions.append(f"{where}: spills {b.spill_bytes} B (was {a.spill_bytes})")
        if b.ld_global_v4 != a.ld_global_v4:
            regressions.append(f"{where}: 16-byte loads {a.ld_global_v4} -> {b.ld_global_v4}")
        if a.registers is not None and b.registers != a.registers:
            line = f"{where}: registers {a.registers} -> {b.registers}"
            (regressions if abs(b.registers - a.registers) > REGISTER_SLACK else within).append(line)
    return regressions, within


def _rename(text: str) -> tuple[tuple[str, str], str]:
    try:
        op_old, new = text.split("=")
        op, old = op_old.split(":")
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rename wants OP:OLD=NEW, got {text!r}") from None
    return (op, old), new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastbert.kernels.static.compare", description=__doc__.split("\n")[0])
    parser.add_argument("old", help="the reference results.csv")
    parser.add_argument("new", help="the results.csv to check")
    parser.add_argument("--rename", action="append", type=_rename, default=[], metavar="OP:OLD=NEW",
                        help="old kernel name OLD of op OP's cases is NEW in the new report")
    parser.add_argument("--common-cases", action="store_true",
                        help="compare only the cases both reports hold (a subset run against a full one)")
    args = parser.parse_args(argv)
    try:
        old, new = read_report(args.old, dict(args.rename)), read_report(args.new)
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if args.common_cases:
        cases = {case for _, case, _ in new} & {case for _, case, _ in old}
        old = {key: figures for key, figures in old.items() if key[1] in cases}
        new = {key: figures for key, figures in new.items() if key[1] in cases}
    regressions, within = compare(old, new)
    print(f"# static report: {args.new} vs {args.old}\n")
    print(f"- rows: {len(old)} old{' (cases both hold)' if args.common_cases else ''}, {len(new)} new, {len(old.keys() & new.keys())} matched by (kernel, case, config)")
    print(f"- registers within ±{REGISTER_SLACK}: {len(within)} rows differ; regressions: {len(regressions)}\n")
    for title, lines in (("Regressions", regressions), (f"Register changes within ±{REGISTER_SLACK}", within)):
        if lines:
            print(f"## {title}\n")
            print("\n".join(f"- {line}" for line in lines) + "\n")
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
