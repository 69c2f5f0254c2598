"""Pre-training on the fused MLM loss (fastbert.ops.mlm_loss, no logits) learns as the logits head did."""
import functools

import torch

from fastbert import heads, ops
from fastbert.modeling import BertForPreTraining
from fastbert.pretrain.trainer import pretrain
from tests.test_pretrain import config, data_dir, read_metrics  # noqa: F401  (data_dir: the fixture)

STEPS = 20


def _train_figures(out):
    return [r for r in read_metrics(out) if "loss" in r]


def test_fused_run_follows_the_logits_run_and_resumes_exactly(tmp_path, data_dir, monkeypatch):  # noqa: F811
    with monkeypatch.context() as patch:
        patch.setattr(BertForPreTraining, "forward",
                      functools.partialmethod(BertForPreTraining.forward, return_logits=True))
        unfused = pretrain(config(tmp_path / "unfused", data_dir, max_steps=STEPS))
    # The fused run, paused half-way and resumed: the pause changes nothing, the loss path next to nothing.
    first = pretrain(config(tmp_path / "fused", data_dir, max_steps=STEPS, stop_at=STEPS // 2))
    second = pretrain(config(tmp_path / "fused", data_dir, max_steps=STEPS, resume=True))
    straight = pretrain(config(tmp_path / "straight", data_dir, max_steps=STEPS))
    fused = first.losses + second.losses
    assert fused == straight.losses and second.param_checksum == straight.param_checksum
    assert len(fused) == len(unfused.losses) == STEPS
    # The two heads round differently (chunked GEMM + fp32 cross-entropy vs logits + F.cross_entropy),
    # and 20 Adam steps amplify that; the curves still agree to 1e-5 of the loss (seen: 2e-7).
    for step, (a, b) in enumerate(zip(fused, unfused.losses), 1):
        assert abs(a - b) <= 1e-5 * abs(b), (step, a, b)
    assert fused[-1] < 0.95 * fused[0]  # and it learns
    a, b = _train_figures(tmp_path / "straight"), _train_figures(tmp_path / "unfused")
    # The training accuracy (from num_correct, not logits) counts the same hits.
    for x, y in zip(a, b):
        assert abs(x["mlm_accuracy_train"] - y["mlm_accuracy_train"]) <= 0.02, (x, y)
    assert a[-1]["mlm_accuracy_train"] > 0.0
    # Held-out eval computes logits either way: the same figures, within their standard error.
    eval_a = [r for r in read_metrics(tmp_path / "straight") if "mlm_accuracy" in r][-1]
    eval_b = [r for r in read_metrics(tmp_path / "unfused") if "mlm_accuracy" in r][-1]
    assert abs(eval_a["mlm_accuracy"] - eval_b["mlm_accuracy"]) <= eval_b["mlm_accuracy_se"]
    assert abs(eval_a["eval_loss"] - eval_b["eval_loss"]) <= 2e-3 * eval_b["eval_loss"]


def test_training_steps_never_compute_logits(tmp_path, data_dir, monkeypatch):  # noqa: F811
    """The decoder (the (rows, vocab) logits) runs only in the held-out eval, under no_grad; every training
    step's MLM loss is the fused op's."""
    decoder_calls, fused_calls = [], []
    head_forward, fused = heads.BertLMPredictionHead.forward, ops.mlm_loss

    def spy_head(self, hidden):
        decoder_calls.append(torch.is_grad_enabled())
        return head_forward(self, hidden)

    def spy_fused(*args, **kwargs):
        fused_calls.append(torch.is_grad_enabled())
        return fused(*args, **kwargs)

    monkeypatch.setattr(heads.BertLMPredictionHead, "forward", spy_head)
    monkeypatch.setattr(ops, "mlm_loss", spy_fused)
    monkeypatch.setattr(ops, "mlm_loss_reference", None)  # called, it would fail the run
    result = pretrain(config(tmp_path, data_dir, max_steps=3, eval_every=2, eval_batches=2))
    assert result.steps_done == 3
    assert fused_calls == [True] * 3
    assert decoder_calls and not any(decoder_calls)  # eval only: at step 2 and at the end
