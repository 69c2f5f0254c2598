"""On a CUDA GPU: the model under bf16 autocast matches the fp32 reference (run by scripts/gpu_check.sh)."""
import pytest
import torch

import fastbert
from tests.kernel_checks import assert_error_within

pytestmark = pytest.mark.gpu


def _batch(config, batch=8, seqlen=128):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, config.vocab_size, (batch, seqlen), generator=g)
    lengths = torch.randint(1, seqlen + 1, (batch,), generator=g)
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).long()
    return ids.cuda(), mask.cuda()


@pytest.fixture(scope="module")
def bert_base():
    """bert-base without dropout, a ragged batch, and the torch path's fp32 output (the reference) and
    bf16-autocast output (the same-precision yardstick)."""
    config = fastbert.BertConfig.from_pretrained("bert-base-uncased", hidden_dropout_prob=0.0,
                                                 attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = fastbert.BertForPreTraining(config).cuda().eval()
    ids, mask = _batch(config)
    with fastbert.backend.use("torch"), torch.no_grad():
        ref = model.bert(ids, mask).last_hidden_state
        with torch.autocast("cuda", dtype=torch.bfloat16):
            torch_bf16 = model.bert(ids, mask).last_hidden_state
    return model, ids, mask, ref, torch_bf16


def test_torch_bf16_autocast_is_close_to_fp32(bert_base):
    """The yardstick itself: PyTorch's bf16 autocast error against fp32 is a few bf16 ulps, and not zero."""
    _, _, mask, ref, torch_bf16 = bert_base
    real = mask.bool()
    assert torch.isfinite(torch_bf16[real]).all()
    rel = ((torch_bf16 - ref)[real].double().norm() / ref[real].double().norm()).item()
    # 0.7 eps measured on a CPU (bf16 autocast, bert-base, 4 x 128); 3 eps leaves room for GPU rounding.
    # Zero would mean autocast did not run.
    assert 0 < rel <= 3 * torch.finfo(torch.bfloat16).eps, rel


def test_fused_bf16_autocast_matches_fp32(bert_base):
    """The default path (fused kernels on CUDA) under bf16 autocast: error against the fp32 reference
    within 3x PyTorch's own bf16 error."""
    model, ids, mask, ref, torch_bf16 = bert_base
    real = mask.bool()
    with fastbert.backend.use("auto"), torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        got = model.bert(ids, mask).last_hidden_state
    assert_error_within("last_hidden_state", got[real], torch_bf16[real], ref[real])


def test_training_step_on_gpu_reduces_loss():
    config = fastbert.BertConfig.from_pretrained("bert-tiny")
    torch.manual_seed(0)
    model = fastbert.BertForPreTraining(config).cuda().train()
    ids, mask = _batch(config, 16, 64)
    labels = torch.where(torch.rand(ids.shape, device="cuda") < 0.15, ids, torch.full_like(ids, -100))
    nsp = torch.randint(0, 2, (16,), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, mask, labels=labels, next_sentence_label=nsp).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses
