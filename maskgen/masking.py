"""Masking-ratio samplers and token masks, in torch with explicit generators.

- `TruncatedNormalRatio`: MAGE's variable masking ratio, a normal(mu, std) truncated to [low, high]
  (official: scipy.stats.truncnorm with mu 0.55, std 0.25 on [0.5, 1.0]; mean 0.694, std 0.129),
  drawn by inverse-CDF sampling with `torch.special.ndtr` / `ndtri` in float64.
- `token_masks`: which tokens are masked and which of those are dropped from the encoder, from one
  uniform-noise draw per row ranked by argsort (official: threshold on sorted noise plus a re-draw loop on
  ties; ranking gives the same distribution with exact counts and no loop).
- `random_masking`: MAE's fixed-ratio masking that removes tokens from the sequence (argsort of noise).
"""
from __future__ import annotations

import math

import torch


class TruncatedNormalRatio:
    """Normal(mu, std) truncated to [low, high]. `sample(n)` -> float64 Tensor [n] in [low, high]."""

    def __init__(self, mu: float = 0.55, std: float = 0.25, low: float = 0.5, high: float = 1.0):
        if not low <= high:
            raise ValueError(f"need low <= high, got low={low}, high={high}")
        if std < 0:
            raise ValueError(f"std must be >= 0, got {std}")
        self.mu, self.std, self.low, self.high = float(mu), float(std), float(low), float(high)

    def __repr__(self) -> str:
        return f"TruncatedNormalRatio(mu={self.mu}, std={self.std}, low={self.low}, high={self.high})"

    def _standard_bounds(self) -> tuple[float, float]:
        return (self.low - self.mu) / self.std, (self.high - self.mu) / self.std

    def _degenerate(self) -> bool:
        return self.std == 0 or self.low == self.high

    def sample(self, n: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        """n ratios, float64 [n]; `generator` (or torch's global RNG) drives one uniform draw per ratio.
        On `device` (default: the generator's device, else CPU)."""
        if device is None:
            device = generator.device if generator is not None else "cpu"
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        if self._degenerate():
            return torch.full_like(u, min(max(self.mu, self.low), self.high))
        a, b = self._standard_bounds()
        ca, cb = (torch.special.ndtr(torch.tensor(v, dtype=torch.float64, device=device)) for v in (a, b))
        x = self.mu + self.std * torch.special.ndtri(ca + u * (cb - ca))
        return x.clamp(self.low, self.high)

    def mean(self) -> float:
        """Closed form: mu + std * (phi(a) - phi(b)) / (Phi(b) - Phi(a)), a, b the standardised bounds."""
        if self._degenerate():
            return min(max(self.mu, self.low), self.high)
        a, b = self._standard_bounds()
        z = _Phi(b) - _Phi(a)
        return self.mu + self.std * (_phi(a) - _phi(b)) / z

    def stddev(self) -> float:
        """Closed-form standard deviation of the truncated distribution."""
        if self._degenerate():
            return 0.0
        a, b = self._standard_bounds()
        z = _Phi(b) - _Phi(a)
        d = (_phi(a) - _phi(b)) / z
        var = 1.0 + (a * _phi(a) - b * _phi(b)) / z - d * d
        return self.std * math.sqrt(max(var, 0.0))


def _phi(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi) if math.isfinite(x) else 0.0


def _Phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def num_masked(length: int, mask_ratio: float | torch.Tensor) -> torch.Tensor:
    """ceil(length * ratio) as a long tensor (float64 arithmetic, as the official numpy code)."""
    r = torch.as_tensor(mask_ratio, dtype=torch.float64)
    return torch.ceil(r * length).long()


def token_masks(batch: int, length: int, mask_ratio: float | torch.Tensor, drop_count: int,
                generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token masks: (drop_mask, mask), both bool [batch, length].

    Row i masks exactly ceil(length * ratio_i) tokens (`mask_ratio`: a float or a Tensor [batch]) and drops
    exactly `drop_count` of them, so dropped ⊂ masked. Both come from one uniform-noise draw per row: the
    tokens with the lowest noise ranks are dropped, then masked. `device`: default the generator's, else CPU.
    """
    if device is None:
        device = generator.device if generator is not None else "cpu"
    ratio = torch.as_tensor(mask_ratio, dtype=torch.float64)
    if ratio.dim() > 1 or (ratio.dim() == 1 and ratio.numel() not in (1, batch)):
        raise ValueError(f"mask_ratio must be a float or a Tensor [{batch}], got shape {list(ratio.shape)}")
    if ratio.numel() and (bool((ratio < 0).any()) or bool((ratio > 1).any())):
        raise ValueError(f"mask ratios must lie in [0, 1], got {ratio.tolist()}")
    counts = num_masked(length, ratio).to(device).expand(batch)
    if not 0 <= drop_count <= length:
        raise ValueError(f"drop_count must lie in [0, {length}], got {drop_count}")
    if batch and int(counts.min()) < drop_count:
        raise ValueError(f"cannot drop {drop_count} tokens when only {int(counts.min())} are masked "
                         f"(dropped tokens must be masked)")
    noise = torch.rand(batch, length, generator=generator, device=device)
    rank = torch.empty(batch, length, dtype=torch.long, device=device)
    rank.scatter_(1, noise.argsort(dim=1, stable=True),
                  torch.arange(length, device=device).expand(batch, length))
    mask = rank < counts[:, None]
    drop_mask = rank < drop_count
    return drop_mask, mask


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None):
    """MAE's per-sample random masking (official `random_masking`): x [B, L, D] -> (x_kept [B, K, D], mask
    [B, L] float (0 = kept, 1 = removed), ids_restore [B, L] long, ids_keep [B, K] long), K = int(L x (1 - ratio)).

    Each row keeps the K tokens of lowest `noise` [B, L] (default: uniform from `generator` or torch's global
    RNG), in the order of increasing noise; `x_kept.gather` with ids_restore after padding to L undoes it."""
    b, length, d = x.shape
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
    keep = int(length * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(b, length, generator=generator, device=x.device)
    elif tuple(noise.shape) != (b, length):
        raise ValueError(f"noise must have shape [{b}, {length}], got {list(noise.shape)}")
    ids_shuffle = noise.argsort(dim=1, stable=True)
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :keep]
    x_kept = x.gather(1, ids_keep[..., None].expand(b, keep, d))
    mask = torch.ones(b, length, device=x.device)
    mask[:, :keep] = 0
    return x_kept, mask.gather(1, ids_restore), ids_restore, ids_keep
