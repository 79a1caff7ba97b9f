"""AdamW with MAE-style parameter groups (or a method's own, e.g. layer-wise lr decay), LARS for linear probes,
and the per-step warm-up + half-cosine schedule."""
from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed (≥2-D weights) and not decayed (1-D params, biases, and names the model lists in
    `no_weight_decay()`, e.g. embeddings). Frozen parameters are left out."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flagged = name in skip or any(name.startswith(s + ".") for s in skip)
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or flagged else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim_cfg, lr: float) -> torch.optim.Optimizer:
    """AdamW over `model.optim_groups(weight_decay)` when the model defines it (groups may carry an `lr_scale`,
    which `set_lr` applies), else over `param_groups`."""
    groups = model.optim_groups(optim_cfg.weight_decay) if hasattr(model, "optim_groups") else \
        param_groups(model, optim_cfg.weight_decay)
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)


def scaled_lr(blr: float, batch_size: int) -> float:
    """The MAE rule: lr = blr x batch_size / 256."""
    return blr * batch_size / 256


def effective_lr(optim_cfg, effective_batch: int) -> float:
    """`optim.lr` when given, else the MAE rule on the effective batch."""
    return optim_cfg.lr if optim_cfg.lr is not None else scaled_lr(optim_cfg.blr, effective_batch)


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0,
          name: str = "cosine") -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up from 0, then half-cosine to min_lr
    (or constant). As in MAE's `adjust_learning_rate`, evaluated per step."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if name == "constant":
        return base_lr
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


class LARS(torch.optim.Optimizer):
    """LARS as in MAE's linear probe (`util/lars.py`; You et al. 2017), for parameters p with gradient g:

        d = g + weight_decay * p                                   (ndim > 1 only)
        d = d * trust_coefficient * ||p|| / ||d||                  (ndim > 1, both norms > 0; else d unchanged)
        buf = momentum * buf + d ;  p = p - lr * buf

    1-D parameters (biases, norms) get neither weight decay nor trust scaling."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    p_norm, d_norm = torch.norm(p), torch.norm(d)
                    one = torch.ones_like(p_norm)
                    q = torch.where(p_norm > 0, torch.where(d_norm > 0, group["trust_coefficient"] * p_norm / d_norm,
                                                            one), one)
                    d = d.mul(q)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])
        return loss
