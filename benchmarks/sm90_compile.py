"""Compile every Triton kernel for the H200 (sm_90) as its real launch would, with no GPU present.

    python -m benchmarks.sm90_compile [--set default|full|quick] [--json OUT.json]

How: the real host launchers (``fastbert.kernels.*``) run on ``meta`` tensors that report a CUDA
device (:class:`CudaOnMeta`), with every ``@triton.jit`` kernel and autotuner in the kernel modules
replaced by a recorder. Each recorded launch is then specialised as ``JITFunction.run`` would
(Triton's own binder: pointer alignment and divisibility by 16, integers equal to 1, constexprs),
once per configuration the autotuner keeps after its pruning (or the one fixed configuration), and
compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``. Triton ships
``ptxas``, whose log gives registers and spills; the TTGIR and PTX show how dots and loads lowered.

Compiling needs the kernels imported without ``TRITON_INTERPRET`` (under the interpreter ``@jit``
makes Python functions, not compilable ones), so :func:`compile_in_subprocess` runs this module in
a child process; tests and the benchmark call that.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

TARGET_ARCH = 90
WARP_SIZE = 32
# The largest shared memory one block may take on the H200 (the occupancy limits are kernels/_launch.py's HOPPER).
SMEM_PER_BLOCK_MAX = 227 * 1024
SM_COUNT = 132  # what the launchers' per-SM program counts see

KERNEL_MODULES = ("flash_attention", "layer_norm", "gelu", "column_sum", "mlm_head")


# ---- cases: which launcher calls to capture ------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One call of an op's forward and backward launchers. dtype "mix" is the autocast mix: bf16
    activations with fp32 residual and weights (LayerNorm), bf16 input with an fp32 bias (GELU)."""

    op: str  # attention | layer_norm | bias_gelu | mlm_loss
    dtype: str  # bf16 | fp16 | fp32 | mix
    hidden: int
    head_dim: int = 0  # attention only
    layout: str = "rows"  # attention: padded | padded+mask | varlen; mlm_loss: [no]grad[+smooth][+nobias]
    dropout: bool = False
    vocab: int = 0  # mlm_loss only

    @property
    def label(self) -> str:
        if self.op == "mlm_loss":
            return f"{self.op} {self.dtype} V{self.vocab} {self.layout}"
        parts = [self.op, self.dtype, f"N{self.hidden}"]
        if self.op == "attention":
            parts += [f"D{self.head_dim}", self.layout]
        if self.op != "bias_gelu":
            parts.append("drop" if self.dropout else "nodrop")
        return " ".join(parts)


def _mlm_loss_case(dtype: str, vocab: int, write_grad: bool, smoothing: bool, bias: bool) -> Case:
    """A case of the kernel's own list (fastbert.kernels.mlm_head: SM90_CASES, sm90_full_cases)."""
    layout = ("grad" if write_grad else "nograd") + ("+smooth" if smoothing else "") + ("" if bias else "+nobias")
    return Case("mlm_loss", dtype, 768, layout=layout, vocab=vocab)


def case_set(name: str) -> list[Case]:
    """smoke: GELU only (three small kernels); quick: one case per op; default: the CI subset; full:
    the whole sweep."""
    if name == "smoke":
        return [Case("bias_gelu", "bf16", 768)]
    if name == "quick":
        return [Case("attention", "bf16", 768, 64, "padded+mask", True), Case("layer_norm", "bf16", 768, dropout=True),
                Case("bias_gelu", "bf16", 3072), _mlm_loss_case("bf16", 30522, True, False, True)]
    from fastbert.kernels import mlm_head

    if name == "default":
        return [
            Case("attention", "bf16", 768, 64, "padded+mask", True),
            Case("attention", "fp16", 768, 128, "varlen", False),
            # An odd multiple of 8: its head stride (24) is no multiple of 16, yet its loads must vectorise.
            Case("attention", "bf16", 1024, 24, "varlen", True),
            # fp32: FMA dots, its own configurations (the largest head dim, dropout: most registers).
            Case("attention", "fp32", 768, 128, "padded+mask", True),
            Case("layer_norm", "bf16", 768, dropout=True),
            Case("layer_norm", "mix", 1024, dropout=True),
            Case("layer_norm", "fp16", 1024, dropout=False),
            Case("bias_gelu", "bf16", 3072),
            Case("bias_gelu", "mix", 768),
        ] + [_mlm_loss_case(*case) for case in mlm_head.SM90_CASES]
    if name != "full":
        raise ValueError(f"unknown case set {name!r}: choose smoke, quick, default or full")
    from fastbert.kernels.limits import attention_head_dims

    # Every head dim the op takes (multiples of 8 up to 128), not only the padded ones (BLOCK_D): the
    # exact head dim changes the masks, hence ptxas' schedule and the loads' vector width.
    head_dims = attention_head_dims()
    cases = []
    for dtype in ("bf16", "fp16"):
        for head_dim in head_dims:
            for layout in ("padded+mask", "varlen"):
                for dropout in (False, True):
                    cases.append(Case("attention", dtype, 768, head_dim, layout, dropout))
    cases += [Case("attention", "bf16", 1024, 64, "padded", False)]
    # fp32's FMA dots spill erratically with the exact head dim and layout: every layout too.
    for head_dim in head_dims:
        for layout in ("padded", "padded+mask", "varlen"):
            for dropout in (False, True):
                cases.append(Case("attention", "fp32", 12 * head_dim, head_dim, layout, dropout))
    for dtype in ("bf16", "fp16", "fp32", "mix"):
        for hidden in (768, 1024):
            for dropout in (False, True):
                cases.append(Case("layer_norm", dtype, hidden, dropout=dropout))
        for hidden in (768, 1024, 3072, 4096):
            cases.append(Case("bias_gelu", dtype, hidden))
    cases += [_mlm_loss_case(*case) for case in mlm_head.sm90_full_cases()]
    return cases


# ---- meta tensors that say "cuda" -----------------------------------------------------------------
def _is_cuda_device(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return isinstance(value, str) and value.startswith("cuda")


_CUDA0 = torch.device("cuda", 0)
_META = torch.device("meta")


def _asked_by_a_launcher() -> bool:
    """Whether the code reading a tensor's device (two frames up) is a kernel module's launcher."""
    return sys._getframe(2).f_globals.get("__name__", "").startswith("fastbert.kernels")


class CudaLookingMeta(torch.Tensor):
    """A ``meta`` tensor (shape, strides, dtype; no memory) that tells the kernel launchers it is on
    ``cuda:0``, so they take their GPU branches; torch itself still sees a meta tensor."""

    @property
    def device(self):
        return _CUDA0 if _asked_by_a_launcher() else _META

    @property
    def is_cuda(self):
        return _asked_by_a_launcher()


class CudaOnMeta(TorchFunctionMode):
    """Within it, anything asked for on a CUDA device is made on ``meta`` as a :class:`CudaLookingMeta`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.device:
            return func(*args, **(kwargs or {}))
        args = tuple("meta" if _is_cuda_device(a) else a for a in args)
        kwargs = {k: ("meta" if k == "device" and _is_cuda_device(v) else v) for k, v in (kwargs or {}).items()}
        result = func(*args, **kwargs)
        if isinstance(result, torch.Tensor) and result.is_meta and not isinstance(result, CudaLookingMeta):
            return result.as_subclass(CudaLookingMeta)
        return result


# A fresh CUDA allocation is aligned far beyond 16 bytes; a view is offset from its storage's start.
_FAKE_BASE_ADDRESS = 1 << 32


class PointerArg:
    """What the recorder keeps of a tensor argument: its dtype and the address a real launch would pass."""

    def __init__(self, tensor: torch.Tensor):
        self.dtype = tensor.dtype
        self._address = _FAKE_BASE_ADDRESS + tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        return self._address


# ---- recording the launches -----------------------------------------------------------------------
@dataclass
class Launch:
    """One kernel launch as the launcher made it, and the configurations it may run with."""

    case: str
    kernel: object  # the triton JITFunction
    args: tuple
    kwargs: dict
    configs: list  # triton.Config list (autotuned: after pruning) or [None]: the launch's own options

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


def _config_label(config, kwargs: dict) -> str:
    if config is None:
        blocks = {k: v for k, v in kwargs.items() if k.startswith("BLOCK")}
        warps, stages = kwargs.get("num_warps", 4), kwargs.get("num_stages", 3)
        return "fixed " + " ".join(f"{k}={v}" for k, v in blocks.items()) + f" w{warps} s{stages}"
    blocks = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"tuned {blocks} w{config.num_warps} s{config.num_stages}"


class _Recorder:
    """Stands in for a kernel (``kernel[grid](...)``) or an autotuner and records each call."""

    def __init__(self, target, launches: list, case: list):
        self.target, self.launches, self.case = target, launches, case

    def __getitem__(self, grid):
        self.grid = grid
        return self._record

    def warmup(self, *args, grid, **kwargs):
        """What a launcher that sizes its grid by occupancy (kernels/_launch.py: programs_for) reads of
        the compiled kernel. The grid does not change what compiles; the real figures are in the report."""
        metadata = types.SimpleNamespace(shared=0, num_warps=kwargs.get("num_warps", 4))
        return types.SimpleNamespace(_init_handles=lambda: None, n_regs=32, metadata=metadata)

    def _record(self, *args, **kwargs):
        from triton.runtime.autotuner import Autotuner, Heuristics

        wrapped = self.target
        configs = [None]
        if isinstance(wrapped, Autotuner):
            # The configurations a run can pick from: all, or what the early pruning keeps (Triton
            # prunes only when there is more than one).
            if len(wrapped.configs) > 1:
                wrapped.nargs = dict(zip(wrapped.arg_names, args))
                configs = list(wrapped.prune_configs(kwargs))
                wrapped.nargs = None
            else:
                configs = list(wrapped.configs)
            wrapped = wrapped.fn
        while isinstance(wrapped, Heuristics):
            named = dict(zip(wrapped.arg_names, args))
            for name, rule in wrapped.values.items():
                kwargs[name] = rule({**named, **kwargs})
            wrapped = wrapped.fn
        if callable(self.grid):  # as a launch does, once per configuration it runs (a launcher may count them)
            named = dict(zip(wrapped.arg_names, args))
            for config in configs:
                self.grid({**named, **kwargs, **(config.kwargs if config is not None else {})})
        recorded = tuple(PointerArg(a) if isinstance(a, torch.Tensor) else a for a in args)
        recorded_kw = {k: PointerArg(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        self.launches.append(Launch(self.case[0], wrapped, recorded, recorded_kw, configs))


@contextlib.contextmanager
def recording(launches: list, case: list):
    """Replace every jit kernel / autotuner of the kernel modules by a recorder (restored on exit)."""
    import importlib

    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    from fastbert.kernels import _launch

    saved = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"fastbert.kernels.{name}")
        for attr, value in list(vars(module).items()):
            if isinstance(value, (JITFunction, Autotuner, Heuristics)):
                saved.append((module, attr, value))
                setattr(module, attr, _Recorder(value, launches, case))
    saved.append((_launch, "_sm_count", _launch._sm_count))
    _launch._sm_count = lambda device_index: SM_COUNT
    try:
        with CudaOnMeta():
            yield
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)


def _tensor(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="cuda")


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _run_attention(case: Case) -> None:
    from fastbert.kernels import flash_attention as fa

    dtype = _DTYPES[case.dtype]
    heads, batch, seqlen = case.hidden // case.head_dim, 2, 128
    p = 0.1 if case.dropout else 0.0
    kw = dict(softmax_scale=case.head_dim ** -0.5, dropout_p=p, seed=1234)
    if case.layout == "varlen":
        total = batch * seqlen - 37
        q, k, v, dout = (_tensor((total, heads, case.head_dim), dtype) for _ in range(4))
        kw.update(cu_seqlens=_tensor((batch + 1,), torch.int32), max_seqlen=seqlen)
    else:
        # q, k, v as the model makes them: slices of one fused projection (B, L, 3, H, D).
        qkv = _tensor((batch, seqlen, 3, heads, case.head_dim), dtype)
        q, k, v = qkv.unbind(2)
        dout = _tensor((batch, seqlen, heads, case.head_dim), dtype)
        if case.layout == "padded+mask":
            kw["key_padding_mask"] = _tensor((batch, seqlen), torch.bool)
    out, lse = fa.forward(q, k, v, **kw)
    out = _tensor(q.shape, dtype)  # the recorder wrote nothing: the backward only needs shapes
    fa.backward(dout, q, k, v, out, lse, **kw)


def _run_layer_norm(case: Case) -> None:
    from fastbert.kernels import layer_norm as ln

    rows, n = 4096, case.hidden
    act = torch.bfloat16 if case.dtype == "mix" else _DTYPES[case.dtype]
    param = torch.float32 if case.dtype == "mix" else act
    out_dtype = torch.float32 if case.dtype == "mix" else act  # autocast runs LayerNorm in fp32
    x, residual, dy = _tensor((rows, n), act), _tensor((rows, n), param), _tensor((rows, n), out_dtype)
    weight, bias = _tensor((n,), param), _tensor((n,), param)
    p = 0.1 if case.dropout else 0.0
    _, mean, rstd = ln.layer_norm_fwd(x, residual, weight, bias, 1e-12, p, 1234, out_dtype)
    separate = p > 0.0 or residual.dtype != x.dtype  # as fastbert.ops.layer_norm decides
    ln.layer_norm_bwd(dy, x, residual, weight, mean, rstd, p, 1234, _tensor((rows, n), act),
                      _tensor((rows, n), param) if separate else None, _tensor((n,), param), _tensor((n,), param))


def _run_bias_gelu(case: Case) -> None:
    from fastbert.kernels import gelu as bg

    rows, n = 4096, case.hidden
    act = torch.bfloat16 if case.dtype == "mix" else _DTYPES[case.dtype]
    param = torch.float32 if case.dtype == "mix" else act
    x, bias = _tensor((rows, n), act), _tensor((n,), param)
    bg.bias_gelu_fwd(x, bias)
    bg.bias_gelu_bwd(_tensor((rows, n), act), x, bias, _tensor((rows, n), act), _tensor((n,), param))


def _run_mlm_loss(case: Case) -> None:
    from fastbert.kernels import mlm_head
    from fastbert.kernels.limits import mlm_logits_width

    rows = 4096
    dtype, width = _DTYPES[case.dtype], mlm_logits_width(case.vocab)
    buffer = _tensor((rows, width), dtype)  # the op's padded logits buffer, and its padded bias
    bias = None if "nobias" in case.layout else _tensor((width,), dtype)
    mlm_head.cross_entropy_rows_(buffer, case.vocab, bias, _tensor((rows,), torch.int64), _tensor((rows,), torch.float32),
                                 _tensor((rows,), torch.int32), -100, 0.1 if "smooth" in case.layout else 0.0,
                                 case.layout.startswith("grad"))


_RUNNERS = {"attention": _run_attention, "layer_norm": _run_layer_norm, "bias_gelu": _run_bias_gelu,
            "mlm_loss": _run_mlm_loss}


def capture(cases: list[Case]) -> list[Launch]:
    """Every launch the launchers make for ``cases``, autotuned and with autotuning off (the one switch,
    FASTBERT_AUTOTUNE, so the fixed configurations are captured too)."""
    launches: list[Launch] = []
    current = [""]
    saved = os.environ.get("FASTBERT_AUTOTUNE")
    try:
        for autotune in ("1", "0"):
            os.environ["FASTBERT_AUTOTUNE"] = autotune
            with recording(launches, current):
                for case in cases:
                    current[0] = case.label
                    _RUNNERS[case.op](case)
    finally:
        if saved is None:
            os.environ.pop("FASTBERT_AUTOTUNE", None)
        else:
            os.environ["FASTBERT_AUTOTUNE"] = saved
    return launches


# ---- compiling and reading back -------------------------------------------------------------------
@dataclass
class KernelStats:
    case: str
    kernel: str
    config: str
    num_warps: int
    num_stages: int
    registers: int | None = None
    spill_bytes: int | None = None  # spill stores + spill loads, bytes per thread
    smem_bytes: int | None = None
    ctas_per_sm: int | None = None
    occupancy_limit: str = ""  # what bounds ctas_per_sm: regs | smem | warps | ctas
    wgmma_dots: int | None = None  # TTGIR ttng.warp_group_dot (Hopper wgmma)
    other_dots: int | None = None  # TTGIR tt.dot left as mma.sync (or FMA for fp32 ieee)
    ld_global: int | None = None  # PTX ld.global instructions
    ld_global_v4: int | None = None  # of them 16-byte vector loads
    ptx_lines: int | None = None
    error: str = ""


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _compile_one(launch: Launch, config, target, backend, memo: dict) -> KernelStats:
    import triton
    from triton import knobs
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    # The launchers' occupancy arithmetic (one source; imported here, in the child that compiles).
    from fastbert.kernels._launch import binding_occupancy

    kernel = launch.kernel
    kwargs = dict(launch.kwargs)
    if config is not None:
        kwargs.update(config.all_kwargs())
    kwargs.setdefault("num_warps", 4)
    kwargs.setdefault("num_stages", 3)
    stats = KernelStats(launch.case, launch.name, _config_label(config, launch.kwargs), kwargs["num_warps"],
                        kwargs["num_stages"])
    # Specialise exactly as JITFunction.run does (its binder and its packing of the arguments).
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    key = (launch.name, repr(sorted(signature.items())), repr(sorted(constexprs.items(), key=repr)),
           repr(sorted(attrs.items(), key=repr)), repr(sorted(options.__dict__.items(), key=repr)))
    if key in memo:
        return dataclasses.replace(memo[key], case=launch.case, config=stats.config)
    log = io.StringIO()
    try:
        with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as err:  # a configuration that does not compile is a result, not a crash
        message = str(err).strip().splitlines()
        stats.error = f"{type(err).__name__}: {message[0] if message else ''}"[:300]
        memo[key] = stats
        return stats
    ptxas = log.getvalue()
    used, spill = _PTXAS_USED.search(ptxas), _PTXAS_SPILL.search(ptxas)
    stats.registers = int(used.group(1)) if used else None
    stats.spill_bytes = int(spill.group(1)) + int(spill.group(2)) if spill else None
    stats.smem_bytes = compiled.metadata.shared
    if stats.registers is not None:
        stats.ctas_per_sm, stats.occupancy_limit = binding_occupancy(stats.registers, stats.smem_bytes,
                                                                     stats.num_warps)
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    stats.wgmma_dots = len(re.findall(r"\bttng\.warp_group_dot\b", ttgir))
    stats.other_dots = len(re.findall(r"\btt\.dot\b", ttgir))
    stats.ld_global = len(re.findall(r"^\s*(?:@%p\d+\s+)?ld\.global\b", ptx, re.M))
    stats.ld_global_v4 = len(re.findall(r"^\s*(?:@%p\d+\s+)?ld\.global\S*\.v4\b", ptx, re.M))
    stats.ptx_lines = ptx.count("\n")
    memo[key] = stats
    return stats


def compile_all(launches: list[Launch]) -> list[KernelStats]:
    """Compile every (launch, configuration) for sm_90; identical specialisations compile once."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", TARGET_ARCH, WARP_SIZE)
    backend = make_backend(target)
    memo: dict = {}
    rows, seen = [], set()
    for launch in launches:
        for config in launch.configs:
            row = _compile_one(launch, config, target, backend, memo)
            # Kernels without an autotune switch are captured twice (switch on and off): one row each.
            if (row.case, row.kernel, row.config) not in seen:
                seen.add((row.case, row.kernel, row.config))
                rows.append(row)
    return rows


def compile_in_subprocess(case_names: str = "default", jobs: int = 1, timeout: float = 3600,
                          case_filter: str = "") -> list[KernelStats]:
    """Run this module in ``jobs`` child processes (each a share of the cases) without the interpreter
    and with a fresh Triton cache, so every kernel really goes through ptxas; their rows, in case order."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="sm90-") as tmp:
        outs = [Path(tmp) / f"stats-{i}.json" for i in range(jobs)]
        # One cache per child: a kernel another child compiled first would be a cache hit here, with no
        # ptxas log to read registers and spills from.
        children = [subprocess.Popen([sys.executable, "-m", f"{__package__}.sm90_compile", "--set", case_names,
                                      "--filter", case_filter, "--shard", f"{i}/{jobs}", "--json", str(out)],
                                     cwd=root, env={**env, "TRITON_CACHE_DIR": str(Path(tmp) / f"cache-{i}")},
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
            raise RuntimeError("sm90_compile failed: " + "\n".join(failures))
        return [KernelStats(**row) for out in outs for row in json.loads(out.read_text())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="compile every Triton kernel for sm_90 and print the stats")
    parser.add_argument("--set", default="default", choices=("smoke", "quick", "default", "full"))
    parser.add_argument("--json", default=None, help="write the rows here as JSON")
    parser.add_argument("--filter", default="", help="only cases whose label contains all these words")
    parser.add_argument("--shard", default="0/1", help="I/N: compile every N-th case from the I-th (parallel runs)")
    args = parser.parse_args(argv)
    shard, shards = (int(x) for x in args.shard.split("/"))
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("sm90_compile: unset TRITON_INTERPRET (the interpreter's kernels cannot be compiled)")
    cases = [c for c in case_set(args.set) if all(word in c.label.split() for word in args.filter.split())]
    cases = cases[shard::shards]
    stats = compile_all(capture(cases))
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(s) for s in stats], indent=1))
    for s in stats:
        print(f"{s.case:<40} {s.kernel:<28} {s.config:<32} regs {s.registers} spill {s.spill_bytes} "
              f"smem {s.smem_bytes} ctas/SM {s.ctas_per_sm} wgmma {s.wgmma_dots} other {s.other_dots} "
              f"ld {s.ld_global_v4}/{s.ld_global} {s.error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
