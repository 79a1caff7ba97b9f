"""The Frechet distance between two Gaussians fitted to feature sets, in float64 without scipy.

FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).
tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(A S2 A)) with A = S1^(1/2): S1 S2 is similar to A S2 A (symmetric,
positive semi-definite), so both have the same eigenvalues. A comes from the eigen-decomposition of S1; eigenvalues
within round-off of 0 are set to 0 before square roots; for identical inputs the result is 0 up to float64 round-off.
"""
from __future__ import annotations

import torch


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """features [N, D] -> (mu [D], sigma [D, D]) in float64; sigma is the unbiased covariance (N - 1), as
    numpy.cov in pytorch-fid / torch-fidelity."""
    if features.dim() != 2 or len(features) < 2:
        raise ValueError(f"need features [N >= 2, D], got {list(features.shape)}")
    f = features.double()
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (len(f) - 1)


def _psd_eigenvalues(e: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a PSD matrix with round-off noise (|e| < D x eps x max e) set to 0 before any sqrt."""
    noise = e.abs().max() * len(e) * torch.finfo(e.dtype).eps
    return torch.where(e > noise, e, torch.zeros_like(e))


def _sqrt_psd(sigma: torch.Tensor) -> torch.Tensor:
    e, v = torch.linalg.eigh((sigma + sigma.T) / 2)
    return (v * _psd_eigenvalues(e).sqrt()) @ v.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """FD between N(mu1 [D], sigma1 [D, D]) and N(mu2, sigma2), computed in float64."""
    mu1, mu2, sigma1, sigma2 = mu1.double(), mu2.double(), sigma1.double(), sigma2.double()
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: {list(mu1.shape)} vs {list(mu2.shape)}")
    a = _sqrt_psd(sigma1)
    m = a @ sigma2 @ a
    cross = _psd_eigenvalues(torch.linalg.eigvalsh((m + m.T) / 2)).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(sigma1) + torch.trace(sigma2) - 2 * cross)


def frechet_distance_features(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """FD between Gaussians fitted to features1 [N1, D] and features2 [N2, D]."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))
