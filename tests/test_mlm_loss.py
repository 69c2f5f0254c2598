"""fastbert.ops.mlm_loss: the chunked torch path and the Triton kernel (under TRITON_INTERPRET=1 on the CPU)
against a float64 reference, flash-attention style: the op's error in the loss and in every gradient must
stay within a small factor of the error the reference (full logits + F.cross_entropy) makes in the same
precision. Label smoothing is supported (as F.cross_entropy's)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fastbert import backend, ops
from fastbert._validation import DtypeError
from fastbert.kernels.limits import mlm_logits_width
from fastbert.ops import mlm_head
from tests.kernel_checks import assert_error_within

# The interpreter's own scalar handling warns on every loop bound; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# "torch": the chunked torch path (auto's choice on the CPU); "triton": the kernel, under the interpreter.
PATHS = ["torch", "triton"]
# (rows, hidden, vocab): odd vocabularies spanning several interpreter tiles (64), one below a tile.
SHAPES = [(37, 32, 97), (13, 16, 1025), (9, 24, 50)]


def make_inputs(rows, hidden, vocab, dtype=torch.float32, ignored=0.2, bias=True):
    """Logits with a spread of about 3 (a trained head's range), some targets ignored."""
    h = torch.randn(rows, hidden)
    w = torch.randn(vocab, hidden) * (3 / hidden ** 0.5)
    b = 0.5 * torch.randn(vocab) if bias else None
    targets = torch.randint(0, vocab, (rows,))
    targets[torch.rand(rows) < ignored] = -100
    leaves = [t.to(dtype).requires_grad_() if t is not None else None for t in (h, w, b)]
    return (*leaves, targets)


def run_op(path, h, w, b, targets, grad_loss=1.7, **kwargs):
    """(loss, num_correct, grads of h, w, b) of the op on ``path``; the loss weighted by ``grad_loss``."""
    with backend.use(path):
        loss, num_correct = ops.mlm_loss(h, w, b, targets, **kwargs)
    inputs = [t for t in (h, w, b) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss, inputs, torch.tensor(grad_loss, dtype=loss.dtype)) if inputs else []
    return loss, num_correct, grads


def run_reference(dtype, h, w, b, targets, grad_loss=1.7, **kwargs):
    """The reference on copies of the inputs in ``dtype`` (float64: the exact values)."""
    leaves = [t.detach().to(dtype).requires_grad_(t.requires_grad) if t is not None else None for t in (h, w, b)]
    loss, num_correct = ops.mlm_loss_reference(*leaves, targets, **kwargs)
    inputs = [t for t in leaves if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss, inputs, torch.tensor(grad_loss, dtype=loss.dtype)) if inputs else []
    return loss, num_correct, grads


def check_against_reference(path, h, w, b, targets, **kwargs):
    """The op's loss and gradients vs float64, within 3x the same-precision reference's error (plus one
    ulp at the scale of the quantity: the loss is a sum over rows, which no two orders round alike)."""
    loss, num_correct, grads = run_op(path, h, w, b, targets, **kwargs)
    exact_loss, _, exact_grads = run_reference(torch.float64, h, w, b, targets, **kwargs)
    same_loss, same_correct, same_grads = run_reference(h.dtype, h, w, b, targets, **kwargs)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert num_correct.dtype == torch.int64 and num_correct.shape == ()
    assert_error_within("loss", loss, same_loss, exact_loss, slack_ulps=2.0)
    names = [n for n, t in zip(("hidden", "weight", "bias"), (h, w, b)) if t is not None and t.requires_grad]
    for name, got, same, exact in zip(names, grads, same_grads, exact_grads, strict=True):
        assert got.dtype == same.dtype
        assert_error_within(f"grad {name}", got, same, exact)
    return loss, num_correct, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("path", PATHS)
def test_matches_float64_reference(poison_empty, path, shape, dtype):
    check_against_reference(path, *make_inputs(*shape, dtype))


@pytest.mark.parametrize("path", PATHS)
def test_many_chunks_match_one(monkeypatch, path):
    """Chunks of 5 rows (the last one short) give the reference's figures, as one chunk does."""
    h, w, b, targets = make_inputs(37, 16, 97)
    whole = check_against_reference(path, h, w, b, targets)
    monkeypatch.setattr(mlm_head, "CHUNK_BYTES", 5 * mlm_logits_width(97) * 4)
    assert mlm_head.chunk_rows(37, 97, torch.float32) == 5
    chunked = check_against_reference(path, h, w, b, targets)
    assert torch.equal(whole[1], chunked[1])


def test_chunk_rule():
    """At most CHUNK_BYTES of logits per chunk, rows evened out over the chunks."""
    budget = mlm_head.CHUNK_BYTES
    for rows, vocab, dtype in [(20_000, 30522, torch.bfloat16), (20_000, 250_002, torch.bfloat16),
                               (20_000, 30522, torch.float32), (4096, 250_002, torch.float32), (7, 97, torch.float32)]:
        step = mlm_head.chunk_rows(rows, vocab, dtype)
        chunks = -(-rows // step)
        assert step * mlm_logits_width(vocab) * dtype.itemsize <= budget
        assert chunks == -(-rows * mlm_logits_width(vocab) * dtype.itemsize // budget)
        assert rows - (chunks - 1) * step > 0
    assert mlm_logits_width(30522) == 30528 and mlm_logits_width(32) == 32


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("smoothing", [0.1, 1.0])
def test_label_smoothing_as_cross_entropy(path, smoothing):
    check_against_reference(path, *make_inputs(21, 16, 97), label_smoothing=smoothing)


@pytest.mark.parametrize("path", PATHS)
def test_exact_logits_count_argmax_with_torch_ties(path):
    """Integer inputs make every logit an exact small integer in every dtype and summation order, so the
    op's logits equal the reference's bit for bit and ties are frequent: num_correct must count exactly
    the rows whose torch.argmax (the first maximum) is the target."""
    rows, hidden, vocab = 200, 4, 150
    for dtype in DTYPES:
        h = torch.randint(-1, 2, (rows, hidden)).to(dtype)
        w = torch.randint(-1, 2, (vocab, hidden)).to(dtype)
        b = torch.randint(0, 2, (vocab,)).to(dtype)
        logits = F.linear(h.double(), w.double(), b.double())
        targets = torch.randint(0, vocab, (rows,))
        # Every row with ties: the first maximum (correct), a later equal maximum (not correct), or random.
        first, last = logits.argmax(1), vocab - 1 - logits.flip(1).argmax(1)
        kind = torch.arange(rows) % 3
        targets = torch.where(kind == 0, first, torch.where(kind == 1, last, targets))
        assert (first != last).sum() > rows // 2  # the test has ties to break
        expected = (first == targets).sum()
        with backend.use(path):
            assert torch.equal(ops.mlm_loss(h, w, b, targets)[1], expected), dtype
            assert torch.equal(ops.mlm_loss_reference(h, w, b, targets)[1], expected), dtype


@pytest.mark.parametrize("path", PATHS)
def test_ties_across_tiles(path):
    """hidden = 0 makes the logits the bias, exactly: maxima repeated within a tile and in later tiles
    (the interpreter's tiles are 64 wide) resolve to the first, as torch.argmax."""
    vocab = 200
    for maxima in ([70, 100, 150], [3, 64, 199], [130, 131]):
        b = -torch.rand(vocab)
        b[maxima] = 5.0
        h, w = torch.zeros(len(maxima) + 1, 8), torch.randn(vocab, 8)
        targets = torch.tensor(maxima + [-100])
        with backend.use(path):
            assert ops.mlm_loss(h, w, b, targets)[1].item() == 1
        assert torch.argmax(b).item() == maxima[0]


@pytest.mark.parametrize("path", PATHS)
def test_all_targets_ignored_give_zero_loss_and_gradients(path):
    h, w, b, targets = make_inputs(11, 16, 97)
    targets.fill_(-100)
    loss, num_correct, grads = run_op(path, h, w, b, targets)
    ref_loss, _, _ = run_reference(torch.float32, h, w, b, targets)
    assert loss.item() == 0.0 == ref_loss.item() and num_correct.item() == 0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("path", PATHS)
def test_no_rows(path):
    h, w, b, targets = make_inputs(0, 16, 97)
    loss, num_correct, grads = run_op(path, h, w, b, targets)
    assert loss.item() == 0.0 and num_correct.item() == 0
    assert [g.shape for g in grads] == [h.shape, w.shape, b.shape]
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("path", PATHS)
def test_one_target_and_custom_ignore_index(path):
    h, w, b, targets = make_inputs(1, 16, 1025, ignored=0.0)
    check_against_reference(path, h, w, b, targets)
    h, w, b, targets = make_inputs(6, 16, 97, ignored=0.0)
    targets[:5] = 7
    check_against_reference(path, h, w, b, targets, ignore_index=7)


@pytest.mark.parametrize("path", PATHS)
def test_no_bias_and_partial_gradients(path):
    """A decoder without bias; and gradients only for the inputs that require them."""
    check_against_reference(path, *make_inputs(19, 16, 97, bias=False))
    h, w, b, targets = make_inputs(19, 16, 97)
    h.requires_grad_(False)
    b.requires_grad_(False)
    _, _, grads = check_against_reference(path, h, w, b, targets)
    assert len(grads) == 1 and grads[0].shape == w.shape


@pytest.mark.parametrize("path", PATHS)
def test_leading_dimensions_and_strided_inputs_with_poison(poison_empty, path):
    """hidden (B, L, H) and targets (B, L), as views whose gaps hold NaN: nothing outside them is read."""
    h, w, b, targets = make_inputs(24, 16, 97)
    padded = torch.full((4, 6, 16 + 5), float("nan"))
    padded[..., :16] = h.detach().view(4, 6, 16)
    hidden = padded[..., :16].requires_grad_()
    wide_targets = torch.full((4, 12), 10**6, dtype=torch.int64)
    wide_targets[:, ::2] = targets.view(4, 6)
    strided_targets = wide_targets[:, ::2]
    loss, num_correct, grads = run_op(path, hidden, w, b, strided_targets)
    ref_loss, ref_correct, ref_grads = run_reference(torch.float64, h, w, b, targets)
    assert torch.equal(num_correct, ref_correct)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item()
    assert torch.isfinite(grads[0]).all() and grads[0].shape == (4, 6, 16)
    for got, exact in zip((grads[0].reshape(24, 16), *grads[1:]), ref_grads):
        assert (got.double() - exact).abs().max() <= 1e-5 * exact.abs().max()


@pytest.mark.parametrize("path", PATHS)
def test_out_of_range_targets(monkeypatch, path):
    """A ValueError where checking is cheap (CPU); where it is not (CUDA without FASTBERT_DEBUG), the loss
    and the gradients are NaN: never an out-of-bounds read, never a plausible number."""
    h, w, b, targets = make_inputs(9, 16, 97, ignored=0.0)
    for bad in (97, -1, -101):
        targets[4] = bad
        with backend.use(path), pytest.raises(ValueError, match=rf"targets must be in \[0, 97\).*found {bad}"):
            ops.mlm_loss(h, w, b, targets)
    monkeypatch.setattr(mlm_head, "value_checks_cheap", lambda tensor: False)
    loss, _, grads = run_op(path, h, w, b, targets)
    assert torch.isnan(loss) and all(torch.isnan(g).any() for g in grads)


@pytest.mark.parametrize("backend_name", PATHS)
def test_bad_inputs_raise_clear_errors(backend_name):
    h, w, b, targets = (t.detach() for t in make_inputs(5, 16, 97))
    cases = [
        ((h.to(torch.int32), w, b, targets), DtypeError, "hidden must be"),
        ((h, w, b, targets.float()), DtypeError, "targets must be an integer"),
        ((h, w, b, targets.bool()), DtypeError, "targets must be an integer"),
        ((h, w.half(), b, targets), DtypeError, "must have one dtype outside autocast"),
        ((h, w[:, :15], b, targets), ValueError, r"decoder_weight must have shape \(vocab >= 1, 16\)"),
        ((h, w[:0], b[:0], targets), ValueError, "decoder_weight must have shape"),
        ((h, w, b[:96], targets), ValueError, r"decoder_bias must have shape \(97,\)"),
        ((h, w, b, targets[:4]), ValueError, r"targets must have shape \(5,\)"),
        ((h, w, b, targets.to("meta")), ValueError, "targets is on meta but hidden is on cpu"),
        ((h, w.to("meta"), b, targets), ValueError, "decoder_weight is on meta"),
        ((h, [[0.0]], b, targets), TypeError, "decoder_weight must be a torch.Tensor"),
    ]
    with backend.use(backend_name):
        for args, error, message in cases:
            with pytest.raises(error, match=message):
                ops.mlm_loss(*args)
        with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
            ops.mlm_loss(h, w, b, targets, label_smoothing=1.5)
        with pytest.raises(TypeError, match="ignore_index must be an int"):
            ops.mlm_loss(h, w, b, targets, ignore_index=-100.0)


def test_float64_raises_under_triton_and_runs_chunked_under_auto():
    h, w, b, targets = make_inputs(7, 8, 50, torch.float64)
    with backend.use("triton"), pytest.raises(ValueError, match="float64"):
        ops.mlm_loss(h, w, b, targets)
    with backend.use("auto"):
        loss, _ = ops.mlm_loss(h, w, b, targets)
    assert loss.dtype == torch.float64
    exact, _ = ops.mlm_loss_reference(h, w, b, targets)
    assert abs(loss.item() - exact.item()) <= 1e-12 * exact.item()


def test_gradcheck_float64(monkeypatch):
    """The backward's formula (ignored rows, label smoothing, several chunks) against finite differences."""
    monkeypatch.setattr(mlm_head, "CHUNK_BYTES", 3 * mlm_logits_width(13) * 8)
    h, w, b, targets = make_inputs(7, 5, 13, torch.float64)
    for smoothing in (0.0, 0.2):
        def loss(h, w, b, smoothing=smoothing):
            return ops.mlm_loss(h, w, b, targets, label_smoothing=smoothing)[0]

        assert torch.autograd.gradcheck(loss, (h, w, b))


@pytest.mark.parametrize("path", PATHS)
def test_autocast_computes_as_the_models_head(path):
    """Under CPU bf16 autocast with fp32 weights (the training setup): bf16 logits, an fp32 loss, fp32
    gradients, within the error the reference makes under the same autocast."""
    h, w, b, targets = make_inputs(29, 32, 97)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, num_correct, grads = run_op(path, h, w, b, targets)
        same_loss, same_correct, same_grads = run_reference(torch.float32, h, w, b, targets)
    exact_loss, _, exact_grads = run_reference(torch.float64, h, w, b, targets)
    assert loss.dtype == same_loss.dtype == torch.float32
    assert_error_within("loss", loss, same_loss, exact_loss, slack_ulps=2.0)
    for name, got, same, exact in zip(("hidden", "weight", "bias"), grads, same_grads, exact_grads):
        assert got.dtype == same.dtype == torch.float32
        assert_error_within(f"grad {name}", got, same, exact)


@pytest.mark.parametrize("path", PATHS)
def test_no_gradient_work_without_grad(monkeypatch, path):
    """Under no_grad (or when nothing requires grad) the cross-entropy step writes no gradient and the
    op makes no autograd node."""
    steps = []
    spied = mlm_head._cross_entropy_rows_torch
    if path == "triton":
        from fastbert.kernels import mlm_head as kernels

        spied = kernels.cross_entropy_rows_

    def spy(*args):
        steps.append(args[-1])
        return spied(*args)

    monkeypatch.setattr(kernels if path == "triton" else mlm_head,
                        "cross_entropy_rows_" if path == "triton" else "_cross_entropy_rows_torch", spy)
    h, w, b, targets = make_inputs(9, 16, 97)
    with backend.use(path):
        with torch.no_grad():
            loss, _ = ops.mlm_loss(h, w, b, targets)
        assert loss.grad_fn is None and steps == [False]
        loss, _ = ops.mlm_loss(h.detach(), w.detach(), b.detach(), targets)
        assert loss.grad_fn is None and steps == [False, False]
        loss, _ = ops.mlm_loss(h, w, b, targets)
        assert loss.grad_fn is not None and steps == [False, False, True]


def test_auto_on_cpu_takes_the_chunked_torch_path(monkeypatch, triton_dispatch):
    calls = []
    monkeypatch.setattr(mlm_head, "mlm_loss_reference", lambda *a, **k: calls.append("reference"))
    real_step = mlm_head._cross_entropy_rows_torch
    monkeypatch.setattr(mlm_head, "_cross_entropy_rows_torch", lambda *a: calls.append("chunked") or real_step(*a))
    with backend.use("auto"):
        ops.mlm_loss(*make_inputs(9, 16, 97))
    assert triton_dispatch == [("mlm_loss", False)] and calls == ["chunked"]


@pytest.mark.parametrize("path", PATHS)
def test_backward_twice_through_a_retained_graph(path):
    """The saved gradients are scaled out of place: a second backward gives the same gradients."""
    h, w, b, targets = make_inputs(9, 16, 97)
    with backend.use(path):
        loss, _ = ops.mlm_loss(h, w, b, targets)
    first = torch.autograd.grad(loss, (h, w, b), torch.tensor(0.5), retain_graph=True)
    second = torch.autograd.grad(loss, (h, w, b), torch.tensor(0.5))
    assert all(torch.equal(a, c) for a, c in zip(first, second))


class _SyncDetector(TorchDispatchMode):
    """Records the ops that make a CUDA device wait for the host to read a value."""

    SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique",
               "aten::_unique2", "aten::equal", "aten::is_nonzero"}

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCING:
            self.found.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", PATHS)
def test_no_host_sync(monkeypatch, path):
    """Forward and backward read no value back to the host (once the value checks are off, as on CUDA
    without FASTBERT_DEBUG): no .item(), no nonzero, no boolean indexing."""
    monkeypatch.setattr(mlm_head, "value_checks_cheap", lambda tensor: False)
    h, w, b, targets = make_inputs(9, 16, 97)
    detector = _SyncDetector()
    with backend.use(path), detector:
        loss, num_correct = ops.mlm_loss(h, w, b, targets)
        loss.backward()
    assert detector.found == []
    assert h.grad is not None and num_correct.dim() == 0


def test_custom_op_passes_opcheck():
    h, w, b, targets = (t.detach() for t in make_inputs(6, 8, 37))
    for flags in ((True, True, True), (False, True, False), (False, False, False)):
        torch.library.opcheck(mlm_head._forward.custom_op, (h, w, b, targets, -100, 0.1, torch.float32, *flags, False))
    torch.library.opcheck(mlm_head._forward.custom_op, (h, w, None, targets, -100, 0.0, torch.float32, True, True, False, False))


@pytest.mark.parametrize("path", PATHS)
def test_torch_compile_fullgraph(path):
    """The custom op's fake lets torch.compile(fullgraph=True) trace forward and backward (aot_eager: no
    C++ compiler needed), giving the eager figures."""
    torch._dynamo.reset()
    h, w, b, targets = make_inputs(13, 16, 97)

    def step(h, w, b):
        loss, num_correct = ops.mlm_loss(h, w, b, targets)
        return loss * 2.0, num_correct

    results = []
    with backend.use(path):
        for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
            leaves = [t.detach().clone().requires_grad_() for t in (h, w, b)]
            loss, num_correct = fn(*leaves)
            results.append((loss.detach(), num_correct, torch.autograd.grad(loss, leaves)))
    torch._dynamo.reset()
    (loss_e, correct_e, grads_e), (loss_c, correct_c, grads_c) = results
    assert torch.equal(correct_e, correct_c)
    assert (loss_e - loss_c).abs() <= 1e-6 * loss_e.abs()
    for a, c in zip(grads_e, grads_c):
        assert (a - c).abs().max() <= 1e-6 * a.abs().max()
