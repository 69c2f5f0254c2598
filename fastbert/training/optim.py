"""Optimizers for pre-training and fine-tuning: LAMB (NVIDIA FusedLAMB semantics, written with
torch._foreach_*) and AdamW, with BERT's parameter groups (no weight decay on biases and LayerNorm)."""
from __future__ import annotations

import math

import torch
from torch import nn

OPTIMIZERS = ("lamb", "adamw")


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2019, "Large Batch Optimization for Deep Learning"), as NVIDIA's FusedLAMB:

    m ← β₁m + (1-β₁)g,  v ← β₂v + (1-β₂)g²,  u = m̂ / (√v̂ + ε) + λ·w   (m̂, v̂ bias-corrected)
    w ← w - lr · r · u,  r = ‖w‖ / ‖u‖ (1 where either norm is 0).

    The trust ratio r applies to tensors of groups with weight decay only (FusedLAMB's default,
    ``use_nvlamb=False``): biases and LayerNorm weights (decay 0) take a plain Adam step. Global
    gradient clipping is left to the caller (``clip_grad_norm_``), as FusedLAMB's max_grad_norm does.
    Every tensor op is a fused ``torch._foreach_*`` over the group; there is no host sync.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, always_adapt: bool = False):
        if not lr > 0:
            raise ValueError(f"LAMB lr must be positive, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"LAMB betas must be in [0, 1), got {betas}")
        if not eps > 0 or weight_decay < 0:
            raise ValueError(f"LAMB needs eps > 0 and weight_decay >= 0, got eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      always_adapt=always_adapt))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise ValueError("LAMB does not support sparse gradients")
            beta1, beta2 = group["betas"]
            grads, exp_avgs, exp_avg_sqs = [], [], []
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
            step = self.state[params[0]]["step"]
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step

            torch._foreach_mul_(exp_avgs, beta1)
            torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)

            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denom, math.sqrt(bias_correction2))
            torch._foreach_add_(denom, group["eps"])
            updates = torch._foreach_div(exp_avgs, denom)
            torch._foreach_div_(updates, bias_correction1)
            if group["weight_decay"] != 0:
                torch._foreach_add_(updates, params, alpha=group["weight_decay"])
            if group["weight_decay"] != 0 or group["always_adapt"]:
                weight_norms = torch._foreach_norm(params)
                update_norms = torch._foreach_norm(updates)
                ratios = [torch.where((w > 0) & (u > 0), w / u, torch.ones_like(w))
                          for w, u in zip(weight_norms, update_norms)]
                torch._foreach_mul_(updates, ratios)
            torch._foreach_add_(params, updates, alpha=-group["lr"])
        return loss


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and LayerNorm weights take no weight decay (BERT's recipe)."""
    return param.dim() < 2 or name.endswith(".bias") or "LayerNorm" in name


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6) -> torch.optim.Optimizer:
    groups = parameter_groups(model, weight_decay)
    if name == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=eps)
    if name == "adamw":
        on_cuda = next(model.parameters()).is_cuda
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=on_cuda, foreach=None if on_cuda else True)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def state_keys(optimizer: torch.optim.Optimizer) -> tuple[str, ...] | None:
    """The per-parameter state an optimizer built here keeps (what a checkpoint of it must hold);
    None for one this module does not know."""
    if isinstance(optimizer, Lamb):
        return ("step", "exp_avg", "exp_avg_sq")
    if isinstance(optimizer, torch.optim.AdamW) and not any(g.get("amsgrad") for g in optimizer.param_groups):
        return ("step", "exp_avg", "exp_avg_sq")
    return None
