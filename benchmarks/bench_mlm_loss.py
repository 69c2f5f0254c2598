"""Benchmark: the MLM decoder + cross-entropy, loss and backward — ``fastbert.ops.mlm_loss`` with its
Triton kernel (``fastbert``), its chunked torch path (``chunked``) and the full-logits reference
(``reference``: ``F.linear`` + ``F.cross_entropy``, the unfused head) — peak memory and time.

Cases: BERT's vocabulary (30522) and XLM-R's (250002), 4 k and 20 k targets (BERT-base pre-training:
256 x 512 tokens, 15 % masked), hidden 768. bf16/fp16 run as training does: autocast over fp32 weights
and hidden states; fp32 runs plainly. Each call computes the loss and the gradients of hidden, weight and
bias from ``.grad = None``, so every provider's peak includes the weight gradient it leaves behind.

Peak memory is what the call allocates above what was live before it: on CUDA
``torch.cuda.max_memory_allocated``; on the CPU the allocations and frees of torch's CPU allocator as
the profiler records them (:func:`cpu_peak_memory_mb`). On the CPU each case runs once (memory is the
figure there; CPU time on a shared machine means little), and a reference whose peak (3 x targets x
vocab x 4 bytes: logits, log-softmax, their gradient) would not fit in the memory available is not run:
its row gives that analytic figure in the note instead.

    python -m benchmarks.bench_mlm_loss --device cpu --dtype fp32
"""
from __future__ import annotations

import contextlib
import time

import torch

from .common import DTYPES, Row, Timing, peak_memory_mb, script_main, time_fn
from fastbert import backend, ops

OP = "mlm_loss"
HIDDEN = 768
CASES = [(4096, 30522), (20480, 30522), (4096, 250_002), (20480, 250_002)]
QUICK_CASES = [(512, 4099)]
QUICK_HIDDEN = 128
# A CPU reference runs only if its analytic peak is below this share of the memory available now.
CPU_MEMORY_SHARE = 0.6


def cpu_peak_memory_mb(fn) -> float:
    """Peak MB of CPU tensors allocated during one call of ``fn``, above what was live before it.

    Every allocation and free of torch's CPU allocator is reported to the profiler with
    ``profile_memory=True``; their running sum in time order peaks at the call's peak. Memory outside
    torch's allocator (a BLAS library's own buffers, Python objects) is not counted, as CUDA's
    ``max_memory_allocated`` counts only the caching allocator's blocks."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def reference_peak_mb(targets: int, vocab: int) -> float:
    """The fp32 reference's peak on the CPU, analytically: logits, their log-softmax and its gradient,
    targets x vocab x 4 bytes each (what the measurement gives to the byte at 4096 and 20480 x 30522
    and 2048 x 250002: the weight gradient comes after the first of them is freed)."""
    return 3 * targets * vocab * 4 / 2**20


def _memory_available_mb() -> float | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _providers(device: str):
    def run(path):
        def call(h, w, b, t):
            with backend.use(path):
                return ops.mlm_loss(h, w, b, t)
        return call

    providers = [("reference", ops.mlm_loss_reference), ("chunked", run("torch"))]
    if device == "cuda":
        providers.insert(0, ("fastbert", run("triton")))
    return providers


def _inputs(targets: int, vocab: int, hidden: int, device: str):
    h = torch.randn(targets, hidden, device=device).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device) * 0.02).requires_grad_()
    b = torch.zeros(vocab, device=device).requires_grad_()
    return h, w, b, torch.randint(0, vocab, (targets,), device=device)


def _measure(fn, inputs, autocast, device: str, quick: bool) -> tuple[float, Timing]:
    """(peak MB, time) of loss + backward from cleared gradients."""
    h, w, b, t = inputs

    def call():
        for p in (h, w, b):
            p.grad = None
        with autocast:
            loss, _ = fn(h, w, b, t)
        loss.backward()

    if device == "cuda":
        call()  # warm-up: compiles the kernel, fills the allocator's cache
        peak = peak_memory_mb(call, device)
        # Calls take up to ~100 ms (the reference at 20 k x 250002): a longer window for the quantiles.
        timing = time_fn(call, device, quick=quick, rep_ms=None if quick else 500)
        torch.cuda.empty_cache()  # the next provider starts from free memory, not this one's cached blocks
        return peak, timing
    # One call per case on the CPU; a tiny one first pays the profiler's and libraries' first-call costs.
    tiny = _inputs(8, 8, 16, device)

    def warm_up():
        with autocast:
            fn(*tiny)[0].backward()

    cpu_peak_memory_mb(warm_up)
    start = time.perf_counter()
    peak = cpu_peak_memory_mb(call)
    ms = (time.perf_counter() - start) * 1e3
    return peak, Timing(ms, ms, ms)


def run(device: str, dtype: str, quick: bool) -> list[Row]:
    torch_dtype = DTYPES[dtype]
    autocast = (torch.autocast(device, dtype=torch_dtype) if torch_dtype != torch.float32
                else contextlib.nullcontext())
    hidden = QUICK_HIDDEN if quick else HIDDEN
    rows = []
    if device != "cuda":
        rows.append(Row.unsupported(OP, "fastbert", "fwd+bwd", dtype, "all",
                                    "the Triton kernel runs on CUDA (the interpreter is a test tool)"))
    for targets, vocab in (QUICK_CASES if quick else CASES):
        shape = f"T{targets} V{vocab} H{hidden}"
        inputs = _inputs(targets, vocab, hidden, device)
        flops = 6.0 * targets * vocab * hidden  # three GEMMs: logits, dH, dW
        for provider, fn in _providers(device):
            if device == "cpu" and provider == "reference":
                available = _memory_available_mb()
                need = reference_peak_mb(targets, vocab)
                if available is not None and need > CPU_MEMORY_SHARE * available:
                    rows.append(Row.unsupported(OP, provider, "fwd+bwd", dtype, shape,
                                                f"not run: analytic peak {need:,.0f} MB, {available:,.0f} MB available"))
                    continue
            peak, timing = _measure(fn, inputs, autocast, device, quick)
            rows.append(Row.measured(OP, provider, "fwd+bwd", dtype, shape, timing, flops=flops, peak_mem_mb=peak))
    return rows


def summary(rows: list[Row]) -> str:
    """Each case's peak memory and time as a share of the reference's."""
    by_case = {}
    for r in rows:
        if r.peak_mem_mb is not None:
            by_case.setdefault(r.shape, {})[r.provider] = r
    lines = ["peak memory and time vs the reference (full logits):"]
    for shape, providers in by_case.items():
        ref = providers.get("reference")
        for name, r in providers.items():
            if name == "reference":
                continue
            if ref is None:
                lines.append(f"  {shape} {name}: peak {r.peak_mem_mb:,.0f} MB (reference not run)")
                continue
            lines.append(f"  {shape} {name}: peak {r.peak_mem_mb:,.0f} MB = 1/{ref.peak_mem_mb / r.peak_mem_mb:.1f} "
                         f"of {ref.peak_mem_mb:,.0f} MB; time {r.ms_median / ref.ms_median:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    script_main(run, __doc__, summary=summary)
