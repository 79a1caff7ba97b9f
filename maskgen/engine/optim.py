"""AdamW with MAE-style parameter groups and the per-step warm-up + half-cosine schedule."""
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
    groups = [g for g in param_groups(model, optim_cfg.weight_decay) if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)


def effective_lr(optim_cfg, effective_batch: int) -> float:
    """`optim.lr` when given, else the MAE rule lr = blr x effective_batch / 256."""
    return optim_cfg.lr if optim_cfg.lr is not None else optim_cfg.blr * effective_batch / 256


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
