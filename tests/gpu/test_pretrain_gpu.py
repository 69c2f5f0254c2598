"""On a CUDA GPU: a short pre-training run in bf16 and in fp16 (GradScaler) with the fused kernels."""
import importlib
import json
import math

import pytest

from tests.spies import count_calls

pytestmark = pytest.mark.gpu

# The kernel launchers a fused training step calls: (module in fastbert.kernels, forward launcher).
FUSED_FORWARDS = [("flash_attention", "forward"), ("layer_norm", "layer_norm_fwd"), ("gelu", "bias_gelu_fwd")]


@pytest.fixture
def kernel_launches(monkeypatch):
    """Counts the forward launches of each fused kernel, by launcher name."""
    counts = {}
    for module_name, launcher in FUSED_FORWARDS:
        count_calls(monkeypatch, importlib.import_module(f"fastbert.kernels.{module_name}"), (launcher,), counts)
    return counts


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_short_run_on_gpu(tmp_path, precision, kernel_launches):
    from fastbert.data import prepare_corpus
    from fastbert.pretrain.config import PretrainConfig
    from fastbert.pretrain.trainer import pretrain

    corpus = tmp_path / "corpus.txt"
    words = "the quick brown fox jumps over a lazy dog near the quiet river bank".split()
    lines = []
    for d in range(80):
        for s in range(6):
            lines.append(" ".join(words[(d + s + i) % len(words)] for i in range(9)) + " .")
        lines.append("")
    corpus.write_text("\n".join(lines))
    prepare_corpus([corpus], tmp_path / "data", vocab_size=120)
    result = pretrain(PretrainConfig(model="bert-mini", data=str(tmp_path / "data"), out=str(tmp_path / "out"),
                                     max_steps=40, batch_size=32, seq_len=64, precision=precision, lr=5e-3, optimizer="lamb",
                                     log_every=5, eval_every=40, num_workers=2, progress=False, device="cuda"))
    assert result.losses[-1] < 0.8 * result.losses[0], result.losses
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert all(r["tokens_per_s"] > 0 for r in steps)
    assert all(kernel_launches[launcher] > 0 for _, launcher in FUSED_FORWARDS), kernel_launches
    if precision == "fp16":
        # GradScaler ran: its scale starts at 2**16 and only halves, on an overflow, in a run this short
        # (it grows after 2000 clean steps); each skipped step the trainer counts is one of those halvings.
        scales = [r["loss_scale"] for r in steps]
        assert all(0 < s <= 2.0**16 and math.log2(s).is_integer() for s in scales), scales
        assert scales == sorted(scales, reverse=True), scales
        assert 0 <= steps[-1]["skipped_steps"] <= round(math.log2(2.0**16 / scales[-1])), steps[-1]
