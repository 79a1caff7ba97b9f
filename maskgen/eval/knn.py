"""Weighted k-nearest-neighbour classification of frozen features (InstDisc / DINO / solo-learn protocol).

Features are L2-normalised; for a test feature the k training features with the highest cosine similarity s_i
vote for their class with weight exp(s_i / T). Defaults k = 20, T = 0.07 (DINO, MAE community runs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError
from .linear_probe import check_features


@torch.no_grad()
def knn_classify(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, T: float = 0.07, chunk: int = 1024) -> dict:
    """train_x [N, D], train_y [N] int64, test_x [M, D], test_y [M] -> {"top1", "top5" (percent), "k", "T",
    "num_train", "num_test", "num_classes"}. Similarities are computed `chunk` test rows at a time."""
    num_classes = check_features(train_x, train_y, test_x, test_y)
    if k < 1 or T <= 0:
        raise UserError(f"kNN needs k >= 1 and T > 0, got k={k}, T={T}")
    k = min(k, len(train_x))
    bank = F.normalize(train_x.float(), dim=1)
    hits1 = hits5 = 0
    for start in range(0, len(test_x), chunk):
        q = F.normalize(test_x[start:start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # [m, k]
        votes = torch.zeros(len(q), num_classes).scatter_add_(1, train_y[idx], (sim / T).exp())
        top = votes.topk(min(5, num_classes), dim=1).indices
        truth = test_y[start:start + chunk, None]
        hits1 += int((top[:, :1] == truth).sum())
        hits5 += int((top == truth).any(1).sum())
    m = len(test_x)
    return {"top1": 100.0 * hits1 / m, "top5": 100.0 * hits5 / m, "k": k, "T": T, "num_train": len(train_x),
            "num_test": m, "num_classes": num_classes}
