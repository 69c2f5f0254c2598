"""Turning rows into a report: % of the measured ceilings, markdown tables, speed-ups, goals, a plot."""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .ceilings import Ceilings
from .common import Row


def with_percent_of_peak(rows: list[Row], peaks: Ceilings) -> list[Row]:
    """Compute-bound rows (TFLOP/s) against the GEMM ceiling, memory-bound ones (GB/s) against copy."""
    out = []
    for r in rows:
        if r.op == "ceiling" or r.note:
            out.append(r)
        elif r.tflops is not None and peaks.gemm_tflops:
            out.append(dataclasses.replace(r, pct_of_peak=100 * r.tflops / peaks.gemm_tflops))
        elif r.gbps is not None and peaks.copy_gbps:
            out.append(dataclasses.replace(r, pct_of_peak=100 * r.gbps / peaks.copy_gbps))
        else:
            out.append(r)
    return out


def _measured(rows: list[Row]) -> list[Row]:
    return [r for r in rows if not r.note and r.ms_median is not None and r.op != "ceiling"]


def speedups(rows: list[Row]) -> list[tuple[str, str, str, str, float]]:
    """(op, mode, shape, baseline provider, baseline ms / fastbert ms) for every case with both."""
    by_case: dict[tuple, dict[str, Row]] = defaultdict(dict)
    for r in _measured(rows):
        by_case[(r.op, r.mode, r.dtype, r.shape)][r.provider] = r
    result = []
    for (op, mode, _dtype, shape), providers in by_case.items():
        ours = providers.get("fastbert")
        if ours is None:
            continue
        for name, base in providers.items():
            if name != "fastbert":
                result.append((op, mode, shape, name, base.ms_median / ours.ms_median))
    return result


# ---- goals (../shared/docs/GPU.md) ----------------------------------------------------------------
@dataclass(frozen=True)
class Goal:
    text: str
    target: float
    unit: str
    measure: Callable[[list[Row], Ceilings], float | None]
    # Whose rows count: "gpu" (the H200's goals: a CPU figure says nothing of them), "cpu", or "any"
    # (a memory ratio holds on every device).
    devices: str = "gpu"


ATTENTION_GOAL_CASE = ("L512 ", "D64 ", "mix")


def _find(rows, op, provider, mode, *needles) -> list[Row]:
    return [r for r in _measured(rows)
            if r.op == op and r.provider == provider and r.mode == mode and all(n in r.shape for n in needles)]


def _worst(rows, attr, op, mode, *needles):
    values = [getattr(r, attr) for r in _find(rows, op, "fastbert", mode, *needles) if getattr(r, attr) is not None]
    return min(values) if values else None


def _ratio(rows, op, mode, baseline, *needles, ours="fastbert"):
    mine = _find(rows, op, ours, mode, *needles)
    base = _find(rows, op, baseline, mode, *needles)
    pairs = [(m, b) for m in mine for b in base if m.shape == b.shape]
    return min(b.ms_median / m.ms_median for m, b in pairs) if pairs else None


def _mode_ratio(rows, op, baseline, ours):
    """baseline time / our time, (provider, mode) each, on the same shape (the worst such pair)."""
    mine, base = _find(rows, op, *ours), _find(rows, op, *baseline)
    pairs = [(m, b) for m in mine for b in base if m.shape == b.shape]
    return min(b.ms_median / m.ms_median for m, b in pairs) if pairs else None


def _memory_ratio(rows, shape):
    """The reference's peak memory over the op's (the Triton kernel's; the chunked torch path's in a run
    without it, e.g. on the CPU) for the mlm_loss case ``shape``."""
    peaks = {r.provider: r.peak_mem_mb for r in _measured(rows)
             if r.op == "mlm_loss" and r.shape == shape and r.peak_mem_mb}
    ours = peaks.get("fastbert", peaks.get("chunked"))
    return peaks["reference"] / ours if ours and "reference" in peaks else None


def _mfu(rows, peaks, *needles):
    r = _find(rows, "model", "fastbert", "step", *needles)
    return 100 * r[0].tflops / peaks.gemm_tflops if r and r[0].tflops is not None and peaks.gemm_tflops else None


GOALS = (
    # bench_attention labels cases "B32 L512 H12 D64 mix"; "mix" = random lengths under a padding mask.
    Goal("attention fwd, hd64, seq512, padding mask", 350, "TFLOP/s",
         lambda rows, p: _worst(rows, "tflops", "attention", "fwd", *ATTENTION_GOAL_CASE)),
    Goal("attention bwd, hd64, seq512, padding mask", 270, "TFLOP/s",
         lambda rows, p: _worst(rows, "tflops", "attention", "bwd", *ATTENTION_GOAL_CASE)),
    Goal("attention fwd vs best SDPA backend (same case)", 1.0, "x",
         lambda rows, p: _best_sdpa_ratio(rows)),
    Goal("attention fwd vs eager attention (same case)", 6.0, "x",
         lambda rows, p: _ratio(rows, "attention", "fwd", "eager", *ATTENTION_GOAL_CASE)),
    Goal("residual+dropout+LayerNorm fwd, N=768/1024", 3600, "GB/s",
         lambda rows, p: _worst(rows, "gbps", "layer_norm", "fwd")),
    Goal("residual+dropout+LayerNorm bwd, N=768/1024", 3000, "GB/s",
         lambda rows, p: _worst(rows, "gbps", "layer_norm", "bwd")),
    Goal("bias+GELU fwd", 3600, "GB/s", lambda rows, p: _worst(rows, "gbps", "bias_gelu", "fwd")),
    Goal("bias+GELU bwd", 3600, "GB/s", lambda rows, p: _worst(rows, "gbps", "bias_gelu", "bwd")),
    Goal("BERT-base pre-training step, seq128: MFU", 55, "%",
         lambda rows, p: _mfu(rows, p, "bert-base-uncased", "L=128 full")),
    Goal("BERT-base seq128 step vs HF eager", 3.0, "x",
         lambda rows, p: _ratio(rows, "model", "step", "hf_eager", "bert-base-uncased", "L=128 full")),
    Goal("BERT-base seq128 step vs HF SDPA", 2.0, "x",
         lambda rows, p: _ratio(rows, "model", "step", "hf_sdpa", "bert-base-uncased", "L=128 full")),
    Goal("seq512 real length mix: unpadded vs padded (fastbert)", 1.9, "x",
         lambda rows, p: _ratio(rows, "model", "step", "fastbert_padded", "bert-base-uncased", "L=512 mix")),
    Goal("MLM masking (mask_tokens, 1 thread) vs HF DataCollatorForLanguageModeling", 30, "x",
         lambda rows, p: _ratio(rows, "masking", "mlm", "hf_collator")),
    Goal("MLMCollator (pad + mask, 1 thread) vs HF DataCollatorForLanguageModeling", 30, "x",
         lambda rows, p: _ratio(rows, "masking", "mlm", "hf_collator", ours="fastbert_collator")),
    Goal("MLM loss + backward, 20 k targets x 30522: reference peak memory / fastbert's", 4.0, "x",
         lambda rows, p: _memory_ratio(rows, "T20480 V30522 H768"), devices="any"),
    Goal("MLM loss + backward, 20 k targets x 250002: reference peak memory / fastbert's", 10.0, "x",
         lambda rows, p: _memory_ratio(rows, "T20480 V250002 H768"), devices="any"),
    Goal("MLM loss + backward vs the unfused head (time)", 1.0, "x",
         lambda rows, p: _ratio(rows, "mlm_loss", "fwd+bwd", "reference")),
    Goal("patched HF BERT-base seq512 mix vs HF SDPA", 2.0, "x",
         lambda rows, p: _ratio(rows, "patched_hf", "step", "hf_sdpa", "L512 ", "mix", ours="patched")),
    Goal("sentence embeddings (SentenceTransformer.encode) patched vs SDPA", 2.0, "x",
         lambda rows, p: _ratio(rows, "embeddings", "encode", "st_sdpa", ours="st_patched")),
    # The CPU, where users start: a drop-in is never slower than what it replaces (issue 25).
    Goal("CPU: sentence embeddings (encode, sorted batches) patched vs SDPA", 1.0, "x",
         lambda rows, p: _ratio(rows, "embeddings", "encode", "st_sdpa", ours="st_patched"), devices="cpu"),
    Goal("CPU: forward on unsorted padded batches, patched vs SDPA", 1.5, "x",
         lambda rows, p: _ratio(rows, "embeddings", "forward_unsorted", "st_sdpa", ours="st_patched"), devices="cpu"),
    Goal("CPU: pre-training step at seq 128 (bert-tiny, BERT-base) vs HF SDPA", 1.0, "x",
         lambda rows, p: _ratio(rows, "model", "step", "hf_sdpa", "L=128"), devices="cpu"),
    # Preparing a corpus with a given vocabulary (issue 26): the worker processes scale, and come near the
    # tokenizer alone on the already split sentences.
    Goal("prepare with a vocabulary: 2 workers vs 1", 1.8, "x",
         lambda rows, p: _mode_ratio(rows, "data_prepare", ("fastbert", "workers1"), ("fastbert", "workers2")),
         devices="any"),
    Goal("prepare with a vocabulary (2 workers) vs the tokenizer alone", 0.8, "x",
         lambda rows, p: _mode_ratio(rows, "data_prepare", ("tokenizers", "encode"), ("fastbert", "workers2")),
         devices="any"),
)


def _rows_for(goal: Goal, rows: list[Row]) -> list[Row]:
    """The rows a goal is measured on (a row's device is "cpu ..." on the CPU, the GPU's name otherwise)."""
    if goal.devices == "any":
        return rows
    return [r for r in rows if r.device.startswith("cpu") == (goal.devices == "cpu")]


def _best_sdpa_ratio(rows):
    ours = _find(rows, "attention", "fastbert", "fwd", *ATTENTION_GOAL_CASE)
    best = None
    for m in ours:
        sdpa = [r for r in _measured(rows) if r.op == "attention" and r.mode == "fwd" and r.shape == m.shape
                and r.provider.startswith("sdpa")]
        if sdpa:
            ratio = min(r.ms_median for r in sdpa) / m.ms_median
            best = ratio if best is None else min(best, ratio)
    return best


def goals_table(rows: list[Row], peaks: Ceilings) -> str:
    lines = ["## Goals", "", "| goal | target | measured | status |", "|---|---|---|---|"]
    for goal in GOALS:
        value = goal.measure(_rows_for(goal, rows), peaks)
        if value is None:
            lines.append(f"| {goal.text} | ≥ {goal.target:g} {goal.unit} | — | not measured in this run |")
            continue
        status = "met" if value >= goal.target else f"gap {goal.target - value:.3g} {goal.unit}"
        lines.append(f"| {goal.text} | ≥ {goal.target:g} {goal.unit} | {value:.3g} {goal.unit} | {status} |")
    return "\n".join(lines) + "\n"


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def markdown(rows: list[Row], peaks: Ceilings, env: dict[str, str], dtype: str, quick: bool) -> str:
    out = [f"# fastbert benchmarks — {env['device']}", "",
           f"date {env['date']} · commit `{env['commit'] or '-'}` · torch {env['torch']} · triton "
           f"{env['triton'] or '-'} · dtype {dtype}{' · quick mode (tiny shapes)' if quick else ''}", "",
           f"Ceilings measured in this run: {peaks.gemm_dtype} GEMM **{peaks.gemm_tflops:.1f} TFLOP/s**, "
           f"device copy **{peaks.copy_gbps:.0f} GB/s** (read + write). Times are medians (p20–p80).", ""]
    subjects = list(dict.fromkeys(r.op for r in rows if r.op != "ceiling"))
    for subject in subjects:
        if subject == "static":
            out += static_table([r for r in rows if r.op == "static"])
            continue
        out += [f"## {subject}", "",
                "| provider | mode | shape | ms (p20–p80) | TFLOP/s | GB/s | % of peak | tokens/s | peak MB |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r.op == subject):
            if r.note:
                out.append(f"| {r.provider} | {r.mode} | {r.shape} | {r.note} | | | | | |")
                continue
            out.append(f"| {r.provider} | {r.mode} | {r.shape} | {r.ms_median:.4g} ({r.ms_p20:.4g}–{r.ms_p80:.4g}) | "
                       f"{_fmt(r.tflops, '.1f')} | {_fmt(r.gbps, '.0f')} | {_fmt(r.pct_of_peak, '.1f')} | "
                       f"{_fmt(r.tokens_per_s, ',.0f')} | {_fmt(r.peak_mem_mb, '.0f')} |")
        out.append("")
    ups = speedups(rows)
    if ups:
        out += ["## Speed-ups of fastbert (baseline ms / fastbert ms, same inputs, same run)", "",
                "| subject | mode | shape | vs | speed-up |", "|---|---|---|---|---|"]
        out += [f"| {op} | {mode} | {shape} | {base} | {ratio:.2f}× |" for op, mode, shape, base, ratio in ups]
        out.append("")
    out.append(goals_table(rows, peaks))
    return "\n".join(out)


def static_table(rows: list[Row]) -> list[str]:
    """Markdown lines for the static (compiled for sm_90, not run) kernel rows, then what misses the
    static goals of shared/docs/GPU.md: spills, shared memory over 227 KB, attention dots off wgmma."""
    out = ["## static: kernels compiled for sm_90 (H200), not run", "",
           f"{len(rows)} kernel × configuration rows; CTAs/SM from registers, shared memory and warps at the "
           "H200's per-SM limits (65536 registers, 228 KB, 64 warps, 32 blocks); dots: wgmma / other "
           "(mma.sync, or FMA for fp32 ieee); loads: 16-byte vector / all global loads in the PTX.", "",
           "| case | kernel | config | regs | spill B | smem KB | CTAs/SM | dots wgmma/other | ld.v4/ld |",
           "|---|---|---|---|---|---|---|---|---|"]
    problems = []
    for r in rows:
        if r.note:
            out.append(f"| {r.shape} | {r.mode} | {r.config} | {r.note} | | | | | |")
            problems.append(f"- does not compile: {r.shape} · {r.mode} · {r.config}")
            continue
        out.append(f"| {r.shape} | {r.mode} | {r.config} | {r.registers} | {r.spill_bytes} | "
                   f"{r.smem_bytes / 1024:.1f} | {r.ctas_per_sm} | {r.wgmma_dots}/{r.other_dots} | "
                   f"{r.ld_global_v4}/{r.ld_global} |")
        if r.spill_bytes:
            problems.append(f"- spills {r.spill_bytes} B: {r.shape} · {r.mode} · {r.config}")
        if r.smem_bytes > 227 * 1024:
            problems.append(f"- {r.smem_bytes / 1024:.0f} KB shared memory: {r.shape} · {r.mode} · {r.config}")
    out += ["", f"Static problems: {len(problems)}", ""] + problems + [""]
    return out


def plot(rows: list[Row], path: Path) -> Path | None:
    """One panel per subject: throughput per provider and case (TFLOP/s, GB/s or tokens/s)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    measured = _measured(rows)
    subjects = list(dict.fromkeys(r.op for r in measured))
    if not subjects:
        return None
    fig, axes = plt.subplots(len(subjects), 1, figsize=(11, 3.2 * len(subjects)), squeeze=False)
    for ax, subject in zip(axes[:, 0], subjects):
        subject_rows = [r for r in measured if r.op == subject]
        metric, unit = next(((m, u) for m, u in (("tflops", "TFLOP/s"), ("gbps", "GB/s"), ("tokens_per_s", "tokens/s"))
                             if all(getattr(r, m) is not None for r in subject_rows)), ("ms_median", "ms (lower is better)"))
        cases = list(dict.fromkeys(f"{r.mode} {r.shape}" for r in subject_rows))
        providers = list(dict.fromkeys(r.provider for r in subject_rows))
        width = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            values = {f"{r.mode} {r.shape}": getattr(r, metric) for r in subject_rows if r.provider == provider}
            xs = [c + i * width for c in range(len(cases))]
            ax.bar(xs, [values.get(c, 0) for c in cases], width, label=provider)
        ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
        ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=7)
        ax.set_ylabel(unit)
        ax.set_title(subject)
        ax.legend(fontsize=7, ncol=min(len(providers), 6))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
