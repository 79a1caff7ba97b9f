"""Image metrics logged during training."""
from __future__ import annotations

import torch


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean PSNR (dB) of images in [0,1], [B,3,H,W] (x is clamped to [0, 1] first)."""
    mse = (x.clamp(0, 1) - y).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (-10 * torch.log10(mse)).mean()
