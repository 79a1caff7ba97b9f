"""Evaluation maths on synthetic data: Frechet distance, kNN, few-shot ridge, LARS, the linear probe."""
import math

import pytest
import torch

from maskgen.engine.optim import LARS
from maskgen.errors import UserError
from maskgen.eval.fewshot import fewshot_eval, ridge_solve
from maskgen.eval.frechet import feature_statistics, frechet_distance, frechet_distance_features
from maskgen.eval.knn import knn_classify
from maskgen.eval.linear_probe import train_linear_probe


def exact_gaussian_set(n, mu, chol, seed):
    """n samples whose sample mean is exactly mu [D] and sample covariance exactly chol @ chol.T."""
    z = torch.randn(n, len(mu), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / (n - 1))).T  # whitened: sample cov = I
    return z @ chol.T + mu


def test_frechet_matches_closed_form_diagonal():
    d = 6
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.arange(d, dtype=torch.float64) / 3
    s1, s2 = torch.linspace(0.5, 3, d, dtype=torch.float64), torch.linspace(2, 0.2, d, dtype=torch.float64)
    x1 = exact_gaussian_set(200, mu1, torch.diag(s1.sqrt()), 0)
    x2 = exact_gaussian_set(300, mu2, torch.diag(s2.sqrt()), 1)
    closed = float(((mu1 - mu2) ** 2).sum() + ((s1.sqrt() - s2.sqrt()) ** 2).sum())
    assert frechet_distance_features(x1, x2) == pytest.approx(closed, rel=1e-9)


def test_frechet_matches_closed_form_full_covariance():
    # S2 = 4 S1 commutes with S1: tr sqrt(S1 S2) = 2 tr S1, so FD = |dmu|^2 + tr S1 + 4 tr S1 - 4 tr S1
    g = torch.Generator().manual_seed(3)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    s1 = a @ a.T + 0.1 * torch.eye(5, dtype=torch.float64)
    mu1, mu2 = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    expected = float(((mu1 - mu2) ** 2).sum() + torch.trace(s1))
    assert frechet_distance(mu1, s1, mu2, 4 * s1) == pytest.approx(expected, rel=1e-9)
    x = exact_gaussian_set(100, mu1, torch.linalg.cholesky(s1), 4)
    mu, sigma = feature_statistics(x)
    assert torch.allclose(mu, mu1) and torch.allclose(sigma, s1)


def test_frechet_identical_rank_deficient_sets_is_zero():
    x = torch.randn(50, 300, generator=torch.Generator().manual_seed(0))  # N < D, as 300 images vs 1280-d lite0
    assert abs(frechet_distance_features(x, x)) < 1e-9
    assert frechet_distance_features(x, x + 0.5 * torch.randn(50, 300)) > 1.0


def clusters(n_per_class, num_classes, dim, seed, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)) * 2
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[y] + spread * torch.randn(len(y), dim, generator=g), y


def test_knn_recovers_separable_labels_and_weights_votes():
    train_x, train_y = clusters(30, 5, 16, 0)
    test_x, test_y = clusters(10, 5, 16, 1)
    r = knn_classify(train_x, train_y, test_x, test_y, k=20, T=0.07)
    assert r["top1"] == 100.0 and r["top5"] == 100.0
    # weighted vote: one very close neighbour of class 1 outweighs two far ones of class 0
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.05, 1.0]])
    r = knn_classify(bank, torch.tensor([1, 0, 0]), torch.tensor([[1.0, 0.02]]), torch.tensor([1]), k=3, T=0.07)
    assert r["top1"] == 100.0


def test_ridge_solve_primal_equals_dual_and_normal_equations():
    g = torch.Generator().manual_seed(0)
    for n, d in ((40, 8), (8, 40)):
        x, y = torch.randn(n, d, generator=g), torch.randn(n, 3, generator=g)
        w = ridge_solve(x, y, 2.0)
        direct = torch.linalg.solve(x.double().T @ x.double() + 2.0 * torch.eye(d, dtype=torch.float64),
                                    x.double().T @ y.double())
        assert torch.allclose(w, direct, atol=1e-9)


def test_fewshot_recovers_separable_labels():
    train_x, train_y = clusters(20, 4, 32, 0)
    test_x, test_y = clusters(10, 4, 32, 1)
    r = fewshot_eval(train_x, train_y, test_x, test_y, shots=(1, 5), seeds=(0, 1))
    assert r["results"]["5"]["mean"] == 100.0 and r["results"]["1"]["mean"] > 90
    assert len(r["results"]["1"]["runs"]) == 2 and r["l2"] == 1024.0
    with pytest.raises(UserError, match="fewer than 50 shots"):
        fewshot_eval(train_x, train_y, test_x, test_y, shots=(50,))


def test_lars_step_matches_formula():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    w.grad, b.grad = torch.tensor([[0.6, -0.8]]), torch.tensor([2.0])
    opt.step()
    d = torch.tensor([[0.6, -0.8]]) + 0.1 * torch.tensor([[3.0, 4.0]])
    d = d * 0.001 * 5.0 / d.norm()
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.5 * d)
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.5 * 2.0]))  # 1-D: no decay, no trust ratio
    w.grad, b.grad = torch.zeros(1, 2), torch.zeros(1)
    before = w.detach().clone()
    opt.step()  # zero gradient: the update is the decayed-and-scaled momentum alone
    d2 = 0.1 * before
    d2 = d2 * 0.001 * before.norm() / d2.norm()
    assert torch.allclose(w.detach(), before - 0.5 * (0.9 * d + d2))


def test_linear_probe_learns_separable_features_and_checks_inputs():
    train_x, train_y = clusters(40, 4, 16, 0, spread=1.0)
    test_x, test_y = clusters(20, 4, 16, 1, spread=1.0)
    # LARS moves a weight by ~lr x 0.001 x its norm per step: few steps need a large lr (MAE: 6.4 at batch 16k)
    for opt, lr in (("lars", 2.0), ("sgd", 0.5), ("adamw", 0.01)):
        r = train_linear_probe(train_x, train_y, test_x, test_y, epochs=30, batch_size=32, optimizer=opt, lr=lr,
                               progress=False)
        assert r["top1"] > 95 and r["top5"] == 100.0 and r["num_classes"] == 4, (opt, r)
    a = train_linear_probe(train_x, train_y, test_x, test_y, epochs=3, batch_size=32, progress=False)
    b = train_linear_probe(train_x, train_y, test_x, test_y, epochs=3, batch_size=32, progress=False)
    assert a == b and math.isclose(a["lr"], 0.1 * 32 / 256)  # seeded; blr rule
    with pytest.raises(UserError, match="16 dimensions but test features 8"):
        train_linear_probe(train_x, train_y, test_x[:, :8], test_y, epochs=1, progress=False)
    with pytest.raises(UserError, match="unlabeled"):
        train_linear_probe(train_x, torch.full_like(train_y, -1), test_x, test_y, epochs=1, progress=False)


def test_linear_probe_warns_when_its_head_stays_at_chance(caplog):
    """LARS at its default blr moves a head by ~lr x 0.001 x |w| per step: on a small set it stays near chance
    (ln 4 = 1.386) and the probe says so; SGD on the same features leaves chance and says nothing."""
    train_x, train_y = clusters(40, 4, 16, 0, spread=1.0)
    test_x, test_y = clusters(20, 4, 16, 1, spread=1.0)
    with caplog.at_level("WARNING", logger="maskgen"):
        r = train_linear_probe(train_x, train_y, test_x, test_y, epochs=3, batch_size=32, progress=False)
    assert r["train_loss"] > 0.9 * math.log(4) and "stayed near chance" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="maskgen"):
        r = train_linear_probe(train_x, train_y, test_x, test_y, epochs=30, batch_size=32, optimizer="sgd", lr=0.5,
                               progress=False)
    assert r["train_loss"] < 0.5 and "stayed near chance" not in caplog.text
