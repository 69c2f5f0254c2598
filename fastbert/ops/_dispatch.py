"""How every fastbert op runs, written once. Each Triton-backed op (``attention``, ``attention_varlen``,
``dropout_add_layer_norm``, ``bias_gelu``) follows these four rules; a new op should too.

1. **One decision point.** The public function validates its input, applies rule 2, then asks one
   function of its module, ``_implementation(...)``, which implementation runs, and calls it; every
   implementation of an op takes the same (validated) arguments. The Triton kernel runs when :func:`fastbert.backend.use_triton` says so
   (``FASTBERT_BACKEND`` and the kernel's limits, :mod:`fastbert.kernels.limits`); otherwise a torch
   implementation (today the ``*_reference``). A further path — a fast exact torch kernel — is one
   more branch of ``_implementation``; nothing else changes.
2. **Autocast is resolved by the op, once, before dispatch**, as torch autocast treats the torch op it
   replaces, so every implementation sees the same dtypes and returns the same dtype: ``attention``
   casts q, k, v to the autocast dtype (:func:`autocast_inputs`; torch does so for matmul and SDPA);
   ``dropout_add_layer_norm`` returns float32 (layer_norm is on autocast's float32 list);
   ``bias_gelu`` keeps x's dtype (gelu is not an autocast op). The Triton path never reads the
   autocast state (its launchers allocate in explicit dtypes), so no autograd Function here carries
   ``torch.amp.custom_fwd`` / ``custom_bwd``.
3. **Custom ops only while compiling.** Each kernel's host function (:func:`kernel_op`) is registered
   as the custom op ``fastbert::<name>`` with a fake implementation, so ``torch.compile`` traces it as
   one opaque node, without a graph break. Eager calls run the host function directly: a custom op's
   Python dispatch costs about as much as the kernel at BERT sizes. A kernel that drops out takes its
   Philox seed as a tensor the public op draws with a torch random op (:func:`dropout_seed`), so a
   compiled graph draws a fresh one on every call; the autograd Function saves it for the backward.
4. **No autograd without a gradient.** :func:`run_kernel` builds the op's autograd Function (which
   saves what its backward needs) only when autograd would record the op: grad mode on and some tensor
   argument requiring grad. Otherwise the forward host function alone runs: no node, nothing saved.

Nothing here imports triton at import time; :func:`kernel_module` does, the first time a kernel runs,
so ``import fastbert`` stays free of triton and CUDA.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Callable, Iterable

import torch

from fastbert.kernels.limits import SEED_LIMIT  # triton-free


def kernel_module(name: str) -> ModuleType:
    """``fastbert.kernels.<name>``, imported on first use (this is what imports triton).

    Host functions look their launchers up on the returned module at every call, so tests can
    monkeypatch them.
    """
    return importlib.import_module(f"fastbert.kernels.{name}")


# --------------------------------------------------------------------------------------------- dropout
def dropout_seed(dropout_p: float) -> torch.Tensor:
    """A fresh seed for a kernel's Philox dropout: an int64 (1,) CPU tensor in [0, 2**31), drawn from
    torch's default CPU generator; zero without dropout (no random number drawn).

    The CPU generator means no device sync, and ``torch.manual_seed`` reproduces the run. A tensor from
    a torch random op, not a Python int: inside a compiled graph it is drawn again on every call and
    never merged with another draw (graph passes treat random ops so; two calls of a custom op on the
    same arguments they would merge into one). A kernel derives each element's random number from
    (seed, element position), so its backward regenerates the forward's mask from the saved seed.
    """
    if dropout_p > 0.0:
        return torch.randint(0, SEED_LIMIT, (1,), dtype=torch.int64)
    return _NO_SEED


_NO_SEED = torch.zeros((1,), dtype=torch.int64)  # shared, never written: no allocation per call without dropout


def seed_value(seed: torch.Tensor) -> int:
    """The seed as the launchers take it (in a host function, which runs eagerly)."""
    return int(seed[0])


# -------------------------------------------------------------------------------------------- autocast
def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on ``device``'s type, or None where autocast is off."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors as autocast gives them to a lower-precision op (matmul, SDPA): float16, bfloat16 and
    float32 in the autocast dtype when autocast is on for their device, anything else (float64) as is.
    Differentiable: each gradient comes back in its input's dtype."""
    dtype = autocast_dtype(tensors[0].device)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors)


# ------------------------------------------------------------------------------ custom ops and autograd
class KernelOp:
    """A kernel's host function and the custom op ``fastbert::<name>`` registered from it (rule 3).

    Calling it runs the host function in eager mode and the custom op while ``torch.compile`` traces.
    ``register_fake`` gives the op its fake implementation, as on a ``torch.library`` custom op.
    """

    def __init__(self, name: str, host_function: Callable[..., Any], mutates_args: Iterable[str]):
        self.name = f"fastbert::{name}"
        self.host_function = host_function
        self.custom_op = torch.library.custom_op(self.name, host_function, mutates_args=tuple(mutates_args))
        # What a traced graph calls: the op overload (torch.compile takes it as one opaque node).
        self.overload = getattr(torch.ops.fastbert, name).default

    def __call__(self, *args: Any) -> Any:
        if torch.compiler.is_compiling():
            return self.overload(*args)
        return self.host_function(*args)

    def register_fake(self, fake: Callable[..., Any]) -> Callable[..., Any]:
        self.custom_op.register_fake(fake)
        return fake


def kernel_op(name: str, *, mutates_args: Iterable[str] = ()) -> Callable[[Callable[..., Any]], KernelOp]:
    """Decorator: ``@kernel_op("bias_gelu_fwd")`` over a host function (typed as a custom op's must be)
    makes it a :class:`KernelOp`. ``mutates_args``: the arguments it writes (a backward's gradient
    buffers), as for ``torch.library.custom_op``."""
    return lambda host_function: KernelOp(name, host_function, mutates_args)


def needs_autograd(args: Iterable[Any]) -> bool:
    """Whether autograd would record an op on ``args``: grad mode on and some tensor requiring grad."""
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def run_kernel(function: type[torch.autograd.Function], forward: KernelOp, *args: Any) -> torch.Tensor:
    """An op's Triton path (rule 4): ``function.apply(*args)`` when a gradient can flow, else the forward
    host function alone. ``function`` takes the same arguments as ``forward``, whose result is the op's
    output or a tuple that starts with it (then what the backward needs)."""
    if needs_autograd(args):
        return function.apply(*args)
    result = forward(*args)
    return result[0] if isinstance(result, tuple) else result
