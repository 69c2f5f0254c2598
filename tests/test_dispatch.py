"""The one way every Triton-backed op runs (fastbert/ops/_dispatch.py), checked op by op: eager calls go
straight to the launchers, compiled graphs hold the custom ops, no autograd Function without a
gradient, dropout seeds drawn afresh in compiled graphs, and what autocast does to each op's dtypes.

Runs on the CPU: the kernels under the Triton interpreter (tests/conftest.py), at tiny sizes.
"""
import importlib
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastbert import backend, ops
from tests.kernel_checks import cu_seqlens_of, lengths_mask
from tests.spies import count_calls

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Case:
    """One op: how to call it on fresh leaf inputs, and its kernel module and launchers."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    call: Callable[..., torch.Tensor]
    kernel_module: str
    launchers: tuple[str, str]  # forward, backward
    custom_ops: tuple[str, str]  # forward, backward

    def inputs(self, dtype=torch.float32, requires_grad=True):
        return [torch.randn(s, dtype=dtype, device=DEVICE).requires_grad_(requires_grad) for s in self.shapes]


MASK = lengths_mask([9, 4], 9, DEVICE)
CU_SEQLENS = cu_seqlens_of([4, 5], DEVICE)


def _attention(q, k, v, dropout_p=0.0):
    return ops.attention(q, k, v, MASK, dropout_p=dropout_p)


def _attention_varlen(q, k, v, dropout_p=0.0):
    return ops.attention_varlen(q, k, v, CU_SEQLENS, 5, dropout_p=dropout_p)


def _layer_norm(x, residual, weight, bias, dropout_p=0.0):
    return ops.dropout_add_layer_norm(x, residual, weight, bias, 1e-12, dropout_p)


def _bias_gelu(x, bias, dropout_p=0.0):
    assert dropout_p == 0.0
    return ops.bias_gelu(x, bias)


CASES = {
    "attention": Case("attention", ((2, 9, 2, 16),) * 3, _attention, "flash_attention", ("forward", "backward"),
                      ("flash_attention_fwd", "flash_attention_bwd")),
    "attention_varlen": Case("attention_varlen", ((9, 2, 16),) * 3, _attention_varlen, "flash_attention",
                             ("forward", "backward"), ("flash_attention_varlen_fwd", "flash_attention_varlen_bwd")),
    "dropout_add_layer_norm": Case("dropout_add_layer_norm", ((6, 32), (6, 32), (32,), (32,)), _layer_norm,
                                   "layer_norm", ("layer_norm_fwd", "layer_norm_bwd"),
                                   ("dropout_add_layer_norm_fwd", "dropout_add_layer_norm_bwd")),
    "bias_gelu": Case("bias_gelu", ((6, 32), (32,)), _bias_gelu, "gelu", ("bias_gelu_fwd", "bias_gelu_bwd"),
                      ("bias_gelu_fwd", "bias_gelu_bwd")),
}
DROPOUT_CASES = ["attention", "attention_varlen", "dropout_add_layer_norm"]


@pytest.fixture(params=list(CASES))
def case(request) -> Case:
    return CASES[request.param]


@pytest.fixture
def launches(case, monkeypatch):
    """Counts of the case's forward and backward launcher calls."""
    module = importlib.import_module(f"fastbert.kernels.{case.kernel_module}")
    return count_calls(monkeypatch, module, case.launchers)


@pytest.fixture
def saved(monkeypatch):
    """How many times an autograd Function saved tensors for its backward."""
    calls = []
    original = torch.autograd.function.FunctionCtx.save_for_backward

    def recording(ctx, *tensors):
        calls.append(len(tensors))
        return original(ctx, *tensors)

    monkeypatch.setattr(torch.autograd.function.FunctionCtx, "save_for_backward", recording)
    return calls


class _DispatchedOps(TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def _fastbert_ops(graph: torch.fx.GraphModule) -> set[str]:
    """The fastbert custom ops a graph calls, directly or wrapped (a mutating op is functionalised)."""
    found = set()
    for node in graph.graph.nodes:
        for target in (node.target, *node.args):
            if isinstance(target, torch._ops.OpOverload) and target.namespace == "fastbert":
                found.add(target._opname)
    return found


# ---------------------------------------------------------------------------------------------- eager
def test_eager_calls_run_the_launchers_without_custom_op_dispatch(case, launches, saved):
    inputs = case.inputs()
    with backend.use("triton"), _DispatchedOps() as dispatched:
        out = case.call(*inputs)
        out.backward(torch.ones_like(out))
    assert launches == dict.fromkeys(case.launchers, 1)
    assert not [name for name in dispatched.names if name.startswith("fastbert::")]
    assert len(saved) == 1 and out.grad_fn is not None  # the autograd Function ran, and saved once
    assert all(x.grad is not None for x in inputs)


# ------------------------------------------------------------------------------------------ inference
@pytest.mark.parametrize("without_grad", ["no_grad", "inputs_need_no_grad"])
def test_no_autograd_function_without_a_gradient(case, without_grad, launches, saved):
    """Under no_grad, or when no input requires grad, the forward launcher alone runs: no Function, no
    saved tensors, no graph node; the same numbers as the autograd path."""
    inputs = case.inputs()
    with backend.use("triton"):
        trained = case.call(*inputs)
        assert len(saved) == 1
        if without_grad == "no_grad":
            with torch.no_grad():
                inferred = case.call(*inputs)
        else:
            inferred = case.call(*[x.detach() for x in inputs])
    assert len(saved) == 1, "an autograd Function saved tensors without a gradient to compute"
    assert inferred.grad_fn is None and not inferred.requires_grad
    assert launches[case.launchers[0]] == 2 and launches[case.launchers[1]] == 0
    assert torch.equal(inferred, trained.detach())


# ------------------------------------------------------------------------------------------ compiled
def test_compiled_graphs_hold_the_custom_ops(case, launches):
    """Under torch.compile (fullgraph) each kernel is one custom-op node of the forward or backward graph,
    and the compiled step gives the eager numbers."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    graphs = {"forward": set(), "backward": set()}

    def recorder(kind):
        def compile_graph(graph, example_inputs):
            graphs[kind] |= _fastbert_ops(graph)
            return make_boxed_func(graph.forward)
        return compile_graph

    torch._dynamo.reset()
    compiled = torch.compile(case.call, fullgraph=True,
                             backend=aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward")))
    inputs = case.inputs()
    eager_inputs = [x.detach().clone().requires_grad_() for x in inputs]
    with backend.use("triton"):
        out = compiled(*inputs)
        out.backward(torch.ones_like(out))
        eager = case.call(*eager_inputs)
        eager.backward(torch.ones_like(eager))
    torch._dynamo.reset()
    assert graphs == {"forward": {case.custom_ops[0]}, "backward": {case.custom_ops[1]}}
    assert launches == dict.fromkeys(case.launchers, 2)  # compiled and eager
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    for x, y in zip(inputs, eager_inputs):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", DROPOUT_CASES)
def test_compiled_dropout_draws_a_fresh_seed_per_call(name):
    """The seed is drawn by a torch random op in the graph: fullgraph compiles, every call of the
    compiled function drops differently, and the same torch.manual_seed gives eager's mask."""
    case = CASES[name]
    inputs = case.inputs(requires_grad=False)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *xs: case.call(*xs, dropout_p=0.5), fullgraph=True, backend="aot_eager")
    with backend.use("triton"):
        torch.manual_seed(3)
        first, second = compiled(*inputs), compiled(*inputs)
        torch.manual_seed(3)
        eager = case.call(*inputs, dropout_p=0.5)
    torch._dynamo.reset()
    assert not torch.equal(first, second)
    torch.testing.assert_close(first, eager, rtol=0, atol=0)


@pytest.mark.parametrize("name", DROPOUT_CASES)
def test_two_dropout_calls_in_one_graph_draw_two_masks_and_each_backward_reuses_its_own(name, monkeypatch):
    """Two calls on the same inputs in one compiled graph are not merged into one (graph passes merge
    identical calls of a custom op, never two random draws), and after the partitioner splits forward
    and backward (min-cut, as inductor does) each backward launch gets its forward's seed."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    case = CASES[name]
    module = importlib.import_module(f"fastbert.kernels.{case.kernel_module}")
    seeds = {"forward": [], "backward": []}
    for kind, launcher in zip(seeds, case.launchers):
        original = getattr(module, launcher)

        def recording(*args, _kind=kind, _original=original, **kwargs):
            seeds[_kind].append(kwargs["seed"] if "seed" in kwargs else args[6 if _kind == "forward" else 7])
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, launcher, recording)
    nop = aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward),
                       bw_compiler=lambda g, _: make_boxed_func(g.forward),
                       partition_fn=min_cut_rematerialization_partition)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *xs: case.call(*xs, dropout_p=0.5) - case.call(*xs, dropout_p=0.5),
                             fullgraph=True, backend=nop)
    inputs = case.inputs()
    with backend.use("triton"):
        difference = compiled(*inputs)
        difference.backward(torch.ones_like(difference))
    torch._dynamo.reset()
    assert difference.abs().max() > 0
    assert len(set(seeds["forward"])) == 2 and sorted(seeds["backward"]) == sorted(seeds["forward"])


# ------------------------------------------------------------------------------------------- autocast
AUTOCAST = torch.float16  # the interpreter computes fp16 dots correctly (bf16 ones it does not)


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
@pytest.mark.parametrize("name, casts_inputs, out_dtype", [
    ("attention", True, AUTOCAST),  # q, k, v cast to the autocast dtype, as torch does for matmul and SDPA
    ("attention_varlen", True, AUTOCAST),
    ("dropout_add_layer_norm", False, torch.float32),  # layer_norm is on autocast's float32 list
    ("bias_gelu", False, torch.float32),  # gelu is not an autocast op: x's dtype
])
def test_autocast_gives_each_op_its_documented_dtype_on_every_backend(name, casts_inputs, out_dtype, backend_name):
    """fp32 inputs under autocast: the op's rule decides the dtypes, the same on both backends, and the
    result is exactly the op on the inputs as the rule casts them; gradients come back in each input's dtype."""
    case = CASES[name]
    inputs = case.inputs()
    with backend.use(backend_name):
        with torch.autocast(DEVICE, dtype=AUTOCAST):
            out = case.call(*inputs)
        expected = case.call(*[x.detach().to(AUTOCAST) if casts_inputs else x.detach() for x in inputs])
    assert out.dtype == out_dtype
    assert torch.equal(out.detach(), expected)
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
    assert [g.dtype for g in grads] == [x.dtype for x in inputs]
