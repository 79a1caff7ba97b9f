"""Few-shot linear classification by closed-form ridge regression (UMD's `fewshot_lsr`, after big_vision).

For each number of shots N and each seed: N training images per class are drawn; their features are whitened
per dimension with the shots' mean and std; a constant 1 is appended (bias); targets are one-hot encoded as
+1 / -1; W = argmin ||X W - Y||^2 + l2 ||W||^2 (l2 = 1024) in closed form; a test image gets argmax(x W).
The solve goes through the eigen-decomposition of the smaller Gram matrix (X^T X [D+1, D+1] or X X^T
[n, n]; the two give the same W), in float64.
"""
from __future__ import annotations

import statistics

import torch

from ..errors import UserError
from .linear_probe import check_features

L2_REG = 1024.0


def ridge_solve(x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """x [n, d], y [n, c] -> W [d, c] = (x^T x + l2 I)^-1 x^T y, float64, via an eigen-decomposition."""
    x, y = x.double(), y.double()
    if x.shape[0] >= x.shape[1]:
        e, v = torch.linalg.eigh(x.T @ x)
        return v @ ((v.T @ (x.T @ y)) / (e + l2)[:, None])
    e, v = torch.linalg.eigh(x @ x.T)  # push-through identity: x^T (x x^T + l2 I)^-1 y
    return x.T @ (v @ ((v.T @ y) / (e + l2)[:, None]))


def sample_shots(labels: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """Indices of `shots` random samples of every class present in labels [N] (a generator seeded by `seed`)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        if len(idx) < shots:
            raise UserError(f"class {c} has only {len(idx)} training images, fewer than {shots} shots")
        out.append(idx[torch.randperm(len(idx), generator=g)[:shots]])
    return torch.cat(out)


def fewshot_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                     shots: int, seed: int = 0, l2: float = L2_REG) -> float:
    """Top-1 accuracy (percent) on test_x [M, D] / test_y [M] of the ridge classifier fit on `shots` samples per
    class of train_x [N, D] / train_y [N]."""
    num_classes = check_features(train_x, train_y, test_x, test_y)
    idx = sample_shots(train_y, shots, seed)
    x = train_x[idx].double()
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))  # a dimension constant over the shots is not scaled

    def prepare(f):
        f = (f.double() - mean) / std
        return torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1)

    targets = 2.0 * torch.nn.functional.one_hot(train_y[idx], num_classes).double() - 1.0
    w = ridge_solve(prepare(train_x[idx]), targets, l2)
    pred = (prepare(test_x) @ w).argmax(1)
    return 100.0 * (pred == test_y).double().mean().item()


def fewshot_eval(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 shots=(1, 5, 10), seeds=(0, 1, 2), l2: float = L2_REG) -> dict:
    """{"l2": l2, "results": {str(N): {"mean", "std" (population std over seeds), "runs": [...]}}} in percent."""
    if not shots or any(n < 1 for n in shots) or not seeds:
        raise UserError("--shots needs positive numbers and --seeds at least one seed")
    results = {}
    for n in shots:
        runs = [fewshot_accuracy(train_x, train_y, test_x, test_y, n, s, l2) for s in seeds]
        results[str(n)] = {"mean": statistics.fmean(runs), "std": statistics.pstdev(runs), "runs": runs}
    return {"l2": l2, "seeds": list(seeds), "results": results}
