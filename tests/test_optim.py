"""LAMB against a plain per-parameter implementation of the paper / FusedLAMB; schedules; groups."""
import math

import pytest
import torch
from torch import nn

from fastbert.training.optim import Lamb, build_optimizer, parameter_groups
from fastbert.training.schedule import build_scheduler, lr_factor, warmup_steps


def reference_lamb_step(p, g, state, lr, beta1, beta2, eps, wd, adapt):
    """One step for one tensor, in float64, written out term by term."""
    state["t"] = state.get("t", 0) + 1
    t = state["t"]
    m = state["m"] = beta1 * state.get("m", torch.zeros_like(p)) + (1 - beta1) * g
    v = state["v"] = beta2 * state.get("v", torch.zeros_like(p)) + (1 - beta2) * g * g
    m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
    update = m_hat / (v_hat.sqrt() + eps) + wd * p
    ratio = 1.0
    if adapt:
        w_norm, u_norm = p.norm().item(), update.norm().item()
        ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
    return p - lr * ratio * update


def test_lamb_matches_reference():
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2), (6,)]
    params = [nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    params[3].data.zero_()  # a zero weight: trust ratio falls back to 1
    decay, plain = params[:3], params[3:]
    opt = Lamb([{"params": decay, "weight_decay": 0.05}, {"params": plain, "weight_decay": 0.0}],
               lr=0.01, betas=(0.8, 0.95), eps=1e-6)
    expected = [p.detach().clone() for p in params]
    states = [{} for _ in params]
    for _ in range(5):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            wd = 0.05 if i < 3 else 0.0
            expected[i] = reference_lamb_step(expected[i], g, states[i], 0.01, 0.8, 0.95, 1e-6, wd, adapt=wd != 0)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)


def test_lamb_trust_ratio_changes_the_step():
    # With weight decay the step is scaled by ||w|| / ||u||: a large weight takes a larger step.
    small, large = nn.Parameter(torch.ones(4) * 0.1), nn.Parameter(torch.ones(4) * 10.0)
    opt = Lamb([small, large], lr=0.1, weight_decay=1e-9)
    small.grad, large.grad = torch.ones(4), torch.ones(4)
    opt.step()
    assert (10.0 - large.detach()).abs().mean() > 50 * (0.1 - small.detach()).abs().mean()


def test_lamb_rejects_bad_hyperparameters():
    p = [nn.Parameter(torch.zeros(2))]
    for kwargs in (dict(lr=0.0), dict(betas=(1.0, 0.9)), dict(eps=0.0), dict(weight_decay=-1.0)):
        with pytest.raises(ValueError, match="LAMB"):
            Lamb(p, **kwargs)


def test_parameter_groups_exclude_bias_and_layernorm():
    import fastbert

    model = fastbert.BertForPreTraining(fastbert.BertConfig.from_pretrained("bert-tiny", vocab_size=64))
    decay, plain = parameter_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(not names[id(p)].endswith("bias") and "LayerNorm" not in names[id(p)] for p in decay["params"])
    assert all(names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)] for p in plain["params"])
    assert len(decay["params"]) + len(plain["params"]) == len(list(model.parameters()))
    assert isinstance(build_optimizer(model, "adamw", 1e-4, 0.01), torch.optim.AdamW)
    with pytest.raises(ValueError, match="lamb"):
        build_optimizer(model, "sgd", 1e-4, 0.01)


def test_schedules():
    assert warmup_steps(0.1, 1000) == 100 and warmup_steps(50, 1000) == 50
    with pytest.raises(ValueError):
        warmup_steps(2000, 1000)
    factors = [lr_factor(s, warmup=10, max_steps=100, schedule="linear") for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:])) and factors[-1] == pytest.approx(1 / 90)
    assert lr_factor(55, warmup=10, max_steps=100, schedule="poly", power=0.5) == pytest.approx(math.sqrt(0.5))
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(opt, warmup=2, max_steps=4, schedule="linear")
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 2.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="schedule"):
        build_scheduler(opt, warmup=0, max_steps=4, schedule="cosine")
