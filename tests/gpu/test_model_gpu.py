"""On a CUDA GPU: the model under bf16 autocast matches its fp32 self (run by scripts/gpu_check.sh)."""
import pytest
import torch

import fastbert

pytestmark = pytest.mark.gpu


def _batch(config, batch=8, seqlen=128):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, config.vocab_size, (batch, seqlen), generator=g)
    lengths = torch.randint(1, seqlen + 1, (batch,), generator=g)
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).long()
    return ids.cuda(), mask.cuda()


@pytest.mark.parametrize("backend_name", ["torch", "auto"])
def test_bf16_autocast_matches_fp32(backend_name):
    config = fastbert.BertConfig.from_pretrained("bert-base-uncased", hidden_dropout_prob=0.0,
                                                 attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = fastbert.BertForPreTraining(config).cuda().eval()
    ids, mask = _batch(config)
    real = mask.bool()
    with fastbert.backend.use(backend_name), torch.no_grad():
        ref = model.bert(ids, mask).last_hidden_state.double()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = model.bert(ids, mask).last_hidden_state.double()
    # A pure-PyTorch bf16 run of the same model defines the error budget.
    with fastbert.backend.use("torch"), torch.no_grad():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            torch_bf16 = model.bert(ids, mask).last_hidden_state.double()
    err = (got - ref)[real].abs().max().item()
    budget = (torch_bf16 - ref)[real].abs().max().item()
    assert torch.isfinite(got[real]).all()
    assert err <= 3 * budget + 1e-3, (err, budget)
    # and bf16 is not an exact copy of fp32 (autocast really ran)
    assert budget > 0


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
