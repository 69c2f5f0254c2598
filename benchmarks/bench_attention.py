"""Attention speed: fastbert's Triton flash attention (padded + key-padding mask, and varlen) against
eager attention (matmul + masked softmax + matmul) and every ``F.scaled_dot_product_attention``
backend, forward, backward and forward+backward.

FLOPs (docs/GPU.md): forward 4·B·H·L²·D for the padded providers; the varlen provider counts only
real-token work, 4·H·D·ΣLᵢ²; backward = 2.5 × forward, forward+backward = 3.5 × forward.
Length mixes: ``full`` (every sequence L tokens) and ``mix`` (lengths uniform in [L/4, L], fixed
seed: a realistic pre-training batch). Each SDPA backend gets the mask it supports (a boolean
(B, 1, 1, L) mask; FlashAttention takes none, so it runs only the ``full`` mix).

    python -m benchmarks.bench_attention --device cuda --dtype bf16
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .common import DTYPES, Row, script_main, time_fn
from fastbert import backend, ops

OP = "attention"
MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
HIDDEN = 768  # BERT-base: heads = HIDDEN / head_dim


@dataclass
class Case:
    batch: int
    seqlen: int
    heads: int
    head_dim: int
    mix: str  # "full" | "mix"

    @property
    def label(self) -> str:
        return f"B{self.batch} L{self.seqlen} H{self.heads} D{self.head_dim} {self.mix}"


def cases(device: str, quick: bool) -> list[Case]:
    if device != "cuda":
        return [Case(2, 32, 2, 16, "mix")]
    if quick:
        return [Case(32, 512, 12, 64, mix) for mix in ("full", "mix")]
    out = []
    for seqlen in (128, 256, 512):
        batch = 16384 // seqlen  # the same number of tokens per batch at every length
        for mix in ("full", "mix"):
            out.append(Case(batch, seqlen, HIDDEN // 64, 64, mix))
    for head_dim in (32, 128):
        out.append(Case(32, 512, HIDDEN // head_dim, head_dim, "mix"))
    return out


def _lengths(case: Case, device: str) -> torch.Tensor:
    if case.mix == "full":
        return torch.full((case.batch,), case.seqlen, device=device)
    generator = torch.Generator().manual_seed(0)
    return torch.randint(case.seqlen // 4, case.seqlen + 1, (case.batch,), generator=generator).to(device)


def _sdpa_backends() -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
             "math": "MATH"}
    return {name: getattr(SDPBackend, attr) for name, attr in names.items() if hasattr(SDPBackend, attr)}


def _providers(case: Case, q, k, v, mask, device: str) -> dict[str, tuple[Callable[[], torch.Tensor], tuple] | str]:
    """provider name -> (forward() returning the output, the inputs gradients flow to), or a string
    saying why the provider cannot run this case."""

    providers: dict[str, object] = {}
    if device == "cuda" or backend.interpreter_enabled():
        def fastbert_padded():
            with backend.use("triton"):
                return ops.attention(q, k, v, mask)

        # Unpadded once, outside the timed region (the encoder unpads once per batch, not per layer).
        unpadded = [ops.unpad_input(t.detach(), mask)[0].requires_grad_() for t in (q, k, v)]
        _, _, cu_seqlens, max_seqlen = ops.unpad_input(q.detach(), mask)

        def fastbert_varlen():
            with backend.use("triton"):
                return ops.attention_varlen(*unpadded, cu_seqlens, max_seqlen)

        providers["fastbert"] = (fastbert_padded, (q, k, v))
        providers["fastbert-varlen"] = (fastbert_varlen, tuple(unpadded))
    else:
        why = "Triton needs CUDA (or TRITON_INTERPRET=1 on the CPU)"
        providers["fastbert"] = providers["fastbert-varlen"] = why

    providers["eager"] = (lambda: ops.attention_reference(q, k, v, mask), (q, k, v))

    # SDPA takes (B, H, L, D); the transposes happen once, outside the timed region.
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    sdpa_mask = mask[:, None, None, :]
    for name, sdpa_backend in _sdpa_backends().items():
        attn_mask = None if case.mix == "full" and name == "flash" else sdpa_mask
        if name == "flash" and attn_mask is not None:
            providers[f"sdpa-{name}"] = "no key-padding mask support"
            continue

        def run_sdpa(_backend=sdpa_backend, _mask=attn_mask):
            with torch.nn.attention.sdpa_kernel([_backend]):
                return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=_mask)

        providers[f"sdpa-{name}"] = (run_sdpa, (qt, kt, vt))
    return providers


def _flops(case: Case, lengths: torch.Tensor, provider: str) -> float:
    if provider == "fastbert-varlen":
        return 4.0 * case.heads * case.head_dim * float((lengths.double() ** 2).sum())
    return 4.0 * case.batch * case.heads * case.seqlen**2 * case.head_dim


def _time_mode(mode: str, forward: Callable[[], torch.Tensor], inputs: tuple, device: str, quick: bool):
    if mode == "fwd":
        def fwd_only():
            with torch.no_grad():
                forward()
        return time_fn(fwd_only, device, quick=quick)
    out = forward()
    grad_out = torch.randn_like(out)
    if mode == "bwd":
        return time_fn(lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True), device, quick=quick)
    return time_fn(lambda: torch.autograd.grad(forward(), inputs, grad_out), device, quick=quick)


def run(device: str, dtype: str, quick: bool) -> list[Row]:
    torch_dtype = DTYPES[dtype]
    rows: list[Row] = []
    for case in cases(device, quick):
        torch.manual_seed(0)
        shape = (case.batch, case.seqlen, case.heads, case.head_dim)
        q, k, v = (torch.randn(shape, device=device, dtype=torch_dtype, requires_grad=True) for _ in range(3))
        lengths = _lengths(case, device)
        mask = torch.arange(case.seqlen, device=device)[None, :] < lengths[:, None]
        for provider, spec in _providers(case, q, k, v, mask, device).items():
            for mode in MODES:
                if isinstance(spec, str):
                    rows.append(Row.unsupported(OP, provider, mode, dtype, case.label, spec))
                    continue
                forward, inputs = spec
                try:
                    timing = _time_mode(mode, forward, inputs, device, quick)
                except RuntimeError as error:  # an SDPA backend that rejects this input
                    rows.append(Row.unsupported(OP, provider, mode, dtype, case.label, str(error).split("\n")[0][:80]))
                    continue
                flops = _flops(case, lengths, provider) * FLOP_FACTOR[mode]
                rows.append(Row.measured(OP, provider, mode, dtype, case.label, timing, flops=flops))
    return rows


def summary(rows: list[Row]) -> str:
    """fastbert's padded kernel against the best SDPA backend and eager, per shape and mode (by time)."""
    lines = []
    keyed = {(r.shape, r.mode, r.provider): r for r in rows if r.ms_median is not None}
    for (shape, mode, provider), mine in keyed.items():
        if provider != "fastbert":
            continue
        sdpa = [r for (s, m, p), r in keyed.items() if s == shape and m == mode and p.startswith("sdpa-")]
        eager = keyed.get((shape, mode, "eager"))
        parts = [f"fastbert {shape} {mode}: {mine.tflops:.3g} TFLOP/s"]
        if sdpa:
            best = min(sdpa, key=lambda r: r.ms_median)
            parts.append(f"{best.ms_median / mine.ms_median:.2f}x best SDPA ({best.provider})")
        if eager is not None:
            parts.append(f"{eager.ms_median / mine.ms_median:.1f}x eager")
        lines.append(", ".join(parts))
    return "\n".join(lines)


if __name__ == "__main__":
    script_main(run, __doc__, summary=summary, interpret_on_cpu=True)
