"""Gaussian diffusion schedules (UMD's `gaussian_diffusion.py`, after guided-diffusion), float64 tables.

T steps, index t in 0..T-1. `alphas_cumprod[t]` = ᾱ_t = prod_{s <= t} (1 - β_s), and the forward process is
q_sample(x0, t, ε) = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε.

- cosine (pixel space, UMD's default): ᾱ(u) = cos²((u + 0.008) / 1.008 · π/2) for u in [0, 1],
  β_t = min(1 - ᾱ((t+1)/T) / ᾱ(t/T), 0.999) (Nichol & Dhariwal; guided-diffusion `betas_for_alpha_bar`).
- linear (latents, the DiT / Stable Diffusion convention): β = linspace(1e-4 · 1000/T, 0.02 · 1000/T, T).

UMD's network is told `t + 1` for a noised sample (1..T): time input 0 is reserved for the clean (noise-free)
representation step and for feature extraction (`network_time`).
"""
from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "linear")
MAX_BETA = 0.999


def cosine_betas(num_timesteps: int, s: float = 0.008) -> torch.Tensor:
    """β [T] float64 of the cosine schedule (see the module docstring)."""
    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return torch.tensor([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), MAX_BETA)
                         for i in range(num_timesteps)], dtype=torch.float64)


def linear_betas(num_timesteps: int) -> torch.Tensor:
    """β [T] float64 of the linear schedule, scaled by 1000/T as guided-diffusion."""
    scale = 1000 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def network_time(t: torch.Tensor) -> torch.Tensor:
    """Diffusion index t (0..T-1) -> the time input of UMD's network, t + 1 (0 is the clean step)."""
    return t + 1


class DiffusionSchedule:
    """The tables of one schedule: `betas`, `alphas_cumprod` [T] float64 (CPU), and the conversions between
    x_t, x0 and ε. `t` is a LongTensor [B] of indices (or an int); results are in the dtype of the inputs."""

    def __init__(self, name: str = "cosine", num_timesteps: int = 1000):
        if name not in SCHEDULES:
            raise ValueError(f"unknown diffusion schedule {name!r} (choose {', '.join(SCHEDULES)})")
        self.name, self.num_timesteps = name, num_timesteps
        self.betas = cosine_betas(num_timesteps) if name == "cosine" else linear_betas(num_timesteps)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, 0)

    def __repr__(self) -> str:
        return f"DiffusionSchedule({self.name!r}, T={self.num_timesteps})"

    def _coef(self, table: torch.Tensor, t, like: torch.Tensor) -> torch.Tensor:
        """table[t] broadcast to `like` [B, ...] (t: int or [B])."""
        t = torch.as_tensor(t, device="cpu").long()
        v = table[t].to(device=like.device, dtype=like.dtype)
        return v.view(-1, *([1] * (like.dim() - 1))) if v.dim() else v

    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε; x0, noise [B, ...], t [B] or int."""
        a = self.alphas_cumprod
        return self._coef(a.sqrt(), t, x0) * x0 + self._coef((1 - a).sqrt(), t, x0) * noise

    def x0_from_eps(self, x_t: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t)."""
        a = self.alphas_cumprod
        return self._coef((1 / a).sqrt(), t, x_t) * x_t - self._coef((1 / a - 1).sqrt(), t, x_t) * eps

    def eps_from_x0(self, x_t: torch.Tensor, t, x0: torch.Tensor) -> torch.Tensor:
        """ε = (x_t / sqrt(ᾱ_t) - x0) / sqrt(1/ᾱ_t - 1) (guided-diffusion `_predict_eps_from_xstart`)."""
        a = self.alphas_cumprod
        return (self._coef((1 / a).sqrt(), t, x_t) * x_t - x0) / self._coef((1 / a - 1).sqrt(), t, x_t)
